"""Progress through training, for a person reading the log, and the throughput it reports.

On a terminal: a Keras progress bar per epoch. Elsewhere (Vertex AI's log viewer, a file, a
pipe), a bar would print a line per update, so instead one line about every `every_seconds`,
with the step, the epoch's running loss and the speed. The epoch's summary line itself is
`outputs.RunOutputs.record_epoch`'s. Both show the epoch so far (the controller's running sums), not the last call:
the bar ends each epoch on the epoch line's numbers.

Lines come only between calls into the device, so `CallCap` keeps calls short where steps are
slow: a call of 50 slow CPU steps can last minutes.
"""

import math
import sys
import time
from typing import Callable, Dict, Optional, Tuple

import keras
from absl import logging

LOG_EVERY_SECONDS = 30.0


def on_terminal() -> bool:
  """Whether both output streams are a terminal: Keras's bar writes to stdout, logs to stderr."""
  return sys.stdout.isatty() and sys.stderr.isatty()


class Progress:
  """Reports the steps done in each epoch of a run: a bar on a terminal, else log lines.

  One for the whole run (of this process), so that an epoch's first call reports like any
  other; only the speed leaves out the process's first call (tracing).
  """

  def __init__(self, epochs: int, steps_per_epoch: int, batch_size: int,
               bar: Optional[bool] = None, every_seconds: float = LOG_EVERY_SECONDS,
               clock: Callable[[], float] = time.monotonic):
    self._epochs, self._steps, self._batch_size = epochs, steps_per_epoch, batch_size
    self._every, self._clock = every_seconds, clock
    self._use_bar = on_terminal() if bar is None else bar
    self._bar, self._bar_epoch = None, None
    self._started = self._last_line = clock()
    self._first_step = None  # The global step at the end of the process's first call.
    # Where the bar's step time is measured from: (time, global step) at the end of the
    # process's first call (tracing) or of the epoch before, whichever came last.
    self._timed_from: Optional[Tuple[float, int]] = None
    self._epoch_started = self._started  # In this process.

  def update(self, global_step: int, logs: Dict[str, float]) -> None:
    """`global_step` steps of the run are done; `logs` are the train logs of its epoch so far
    (all its steps, those before a resume included), with a "loss"."""
    epoch, step = (global_step - 1) // self._steps + 1, (global_step - 1) % self._steps + 1
    now = self._clock()
    if self._use_bar:
      self._update_bar(epoch, step, global_step, logs, now)
      return
    if self._first_step is None:  # The first call includes tracing: time from its end.
      self._first_step, self._started = global_step, now
    if step == self._steps:
      self._last_line = now  # The epoch's line follows at once, and stands for this one.
      return
    if now - self._last_line < self._every:
      return
    self._last_line = now
    seconds = now - self._started
    speed = ((global_step - self._first_step) * self._batch_size / seconds if seconds > 0
             else None)
    logging.info("epoch %d/%d: step %d/%d (%d%%), loss %.4f, %s images/s", epoch, self._epochs,
                 step, self._steps, 100 * step // self._steps, logs["loss"],
                 "-" if speed is None else f"{speed:.0f}")

  def _update_bar(self, epoch: int, step: int, global_step: int, logs: Dict[str, float],
                  now: float) -> None:
    if self._bar_epoch != epoch:
      print(f"Epoch {epoch}/{self._epochs}", flush=True)
      self._bar = _EpochBar(self._steps, list(logs))
      self._bar_epoch = epoch
    if self._timed_from is not None and global_step > self._timed_from[1]:
      seconds, steps = now - self._timed_from[0], global_step - self._timed_from[1]
    else:  # The process's first call: all there is to go by.
      seconds, steps = now - self._epoch_started, 1 + (global_step - 1) % self._steps
    self._bar.show(step, sorted(logs.items(), key=lambda item: item[0] != "loss"),
                   seconds / steps, now - self._epoch_started)
    if self._timed_from is None or step == self._steps:
      self._timed_from = (now, global_step)
    if step == self._steps:
      self._epoch_started = now


class _EpochBar(keras.utils.Progbar):
  """Keras's bar, shown with the step time and elapsed seconds its caller measured.

  Keras's own assume an update per step from the bar's creation: with many steps a call, and
  a bar made at its epoch's first update, they showed "0us/step" mid-epoch and 4 s for a 15 s
  epoch.
  """

  def __init__(self, steps: int, stateful_metrics):
    # Stateful: shown as given. Keras 3's bar does not average the others over calls (Keras
    # 2's did), and the epoch's running values are already the epoch's means.
    super().__init__(steps, stateful_metrics=stateful_metrics)
    self._seconds_per_step = 0.0

  def show(self, step: int, logs, seconds_per_step: float, elapsed_seconds: float) -> None:
    self._seconds_per_step = seconds_per_step
    self._start = time.time() - elapsed_seconds  # Keras's field (pinned 3.15): elapsed's origin.
    self.update(step, logs)

  def _estimate_step_duration(self, current, now):
    return self._seconds_per_step


class CallCap:
  """Caps the steps of a call into the device so that it lasts about `max_seconds` at most
  (0: no cap), at the speed of the latest call measured: progress, SIGTERM and checkpoints
  wait for a call's end.

  The process's first call (tracing) is not measured; until a call is, calls run one step, so
  that neither the first call nor the one measured runs a whole `steps_per_loop` of unknown
  length. Only for a single worker: every worker must run the same steps per call.
  """

  def __init__(self, max_seconds: float):
    self._max_seconds, self._calls, self._seconds_per_step = max_seconds, 0, None

  def steps(self, steps: int) -> int:
    """At most `steps`, at least 1: the steps to run in the next call."""
    if not self._max_seconds:
      return steps
    if self._seconds_per_step is None:
      return 1
    if self._seconds_per_step <= 0:
      return steps
    return max(1, min(steps, math.floor(self._max_seconds / self._seconds_per_step)))

  def add(self, steps: int, seconds: float) -> None:
    """A call of `steps` steps took `seconds`."""
    self._calls += 1
    if self._calls > 1:
      self._seconds_per_step = seconds / steps


class Throughput:
  """Examples per second inside training calls only: not evaluation, checkpoints, or a
  process's first call (tracing and compilation)."""

  def __init__(self):
    self._first_call_done = False
    self.run = [0, 0.0]  # Examples and seconds.
    self.epoch = [0, 0.0]

  def add(self, examples: int, seconds: float) -> None:
    if not self._first_call_done:
      self._first_call_done = True
      return
    for totals in (self.run, self.epoch):
      totals[0] += examples
      totals[1] += seconds

  def end_epoch(self) -> Optional[float]:
    """The epoch's examples/s (None if only its first call ran in this process)."""
    examples, seconds = self.epoch
    self.epoch = [0, 0.0]
    return examples / seconds if seconds else None

  def overall(self) -> Optional[float]:
    return self.run[0] / self.run[1] if self.run[1] else None
