"""Progress within an epoch, for a person reading the log, and the throughput it reports.

On a terminal: Keras's progress bar. Elsewhere (Vertex AI's log viewer, a file, a pipe), a bar
would print a line per update, so instead one line about every `every_seconds`, with the step,
the running loss and the speed. The epoch's summary line itself is `train.py`'s.
"""

import sys
import time
from typing import Callable, Optional

from absl import logging

LOG_EVERY_SECONDS = 30.0


def on_terminal() -> bool:
  """Whether both output streams are a terminal: Keras's bar writes to stdout, logs to stderr."""
  return sys.stdout.isatty() and sys.stderr.isatty()


class Progress:
  """Reports the steps done in one epoch as a bar on a terminal, else as periodic log lines."""

  def __init__(self, epoch: int, epochs: int, steps_per_epoch: int, batch_size: int,
               bar: Optional[bool] = None, every_seconds: float = LOG_EVERY_SECONDS,
               clock: Callable[[], float] = time.monotonic):
    self._epoch, self._epochs, self._steps = epoch, epochs, steps_per_epoch
    self._batch_size, self._every, self._clock = batch_size, every_seconds, clock
    self._bar = None
    if on_terminal() if bar is None else bar:
      import keras  # pylint: disable=import-outside-toplevel
      self._bar = keras.utils.Progbar(steps_per_epoch)
    self._started = self._last_line = clock()
    self._first_step = None

  def update(self, step: int, loss: float) -> None:
    """`step` steps of the epoch are done; `loss` is the mean training loss of the latest ones."""
    if self._bar is not None:
      self._bar.update(step, [("loss", loss)])
      return
    now = self._clock()
    if self._first_step is None:  # The first call includes tracing: time from its end.
      self._first_step, self._started, self._last_line = step, now, now
      return
    if now - self._last_line < self._every or step >= self._steps:
      return
    self._last_line = now
    images_per_second = (step - self._first_step) * self._batch_size / max(now - self._started,
                                                                          1e-9)
    logging.info("epoch %d/%d: step %d/%d (%d%%), loss %.4f, %.0f images/s", self._epoch,
                 self._epochs, step, self._steps, 100 * step // self._steps, loss,
                 images_per_second)


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
