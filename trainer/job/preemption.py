"""Stop signals: SIGTERM (preemption) and SIGINT (Ctrl-C), and how a job stops on each.

Vertex AI, Compute Engine and Kubernetes announce preemption with SIGTERM and a short grace
period; a user at a terminal presses Ctrl-C. While training, either only raises a flag: the
training loop reads it between calls into the device, every worker agrees on it there, saves
one checkpoint at the same step, and exits (`Preempted`). A second Ctrl-C stops at once. Outside
the loop (start-up, the export), a signal ends the job at once, saying what that stage leaves
(`Stopped`, from `stage`).

We do not use `tf.distribute.experimental.PreemptionCheckpointHandler`: on Google Cloud
machines it watches the maintenance-event metadata instead of SIGTERM (and on CPU VMs does
nothing), which misses Vertex AI's SIGTERM, and it restores checkpoints itself, around our
check that a checkpoint fits the model.
"""

import contextlib
import signal
import threading
from typing import Optional

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_NAMES = {signal.SIGTERM: "SIGTERM", signal.SIGINT: "Ctrl-C (SIGINT)"}


class Stopped(BaseException):
  """A stop signal ended the job; `exit_code` is 128 + its number, `verb` what to call it.

  A BaseException, as KeyboardInterrupt is: code that catches every Exception (the report's
  drawing, say) must not swallow a stop."""

  def __init__(self, message: str, signal_number: int = signal.SIGTERM):
    super().__init__(message)
    self.signal_number = signal_number
    self.exit_code = 128 + signal_number
    self.verb = "interrupted" if signal_number == signal.SIGINT else "stopped"


class Preempted(Stopped):
  """Training stopped on a stop signal after saving a checkpoint; the same command resumes."""

  def __init__(self, message: str, signal_number: int = signal.SIGTERM):
    super().__init__(message, signal_number)
    self.verb = "interrupted" if signal_number == signal.SIGINT else "preempted"


def stop_behind(error: BaseException) -> Optional[Stopped]:
  """The `Stopped` that `error` was raised from, if any. A stop raised inside a C extension's
  initialisation (TensorFlow's, while it is imported) comes out as that module's ImportError,
  with the stop as its cause or context."""
  seen = set()
  while error is not None and id(error) not in seen:
    if isinstance(error, Stopped):
      return error
    seen.add(id(error))
    error = error.__cause__ or error.__context__
  return None


class TerminationFlag:
  """Set when this process has been asked to stop; `signal_number` says by which signal."""

  def __init__(self):
    self._event = threading.Event()
    self.signal_number = signal.SIGTERM

  def set(self, signal_number: int = signal.SIGTERM, unused_frame=None) -> None:
    if signal_number == signal.SIGINT and self._event.is_set():
      _raise(Stopped("Ctrl-C again: stopped at once, without saving; the latest checkpoint is "
                     "kept", signal.SIGINT))
    self.signal_number = signal_number
    self._event.set()

  @property
  def requested(self) -> bool:
    return self._event.is_set()


@contextlib.contextmanager
def _handlers(handler):
  """Installs `handler` for the stop signals while the block runs (on the main thread only:
  Python installs signal handlers nowhere else), then the previous ones again."""
  if threading.current_thread() is not threading.main_thread():
    yield
    return
  previous = {number: signal.signal(number, handler) for number in STOP_SIGNALS}
  try:
    yield
  finally:
    for number, old in previous.items():
      signal.signal(number, old)


@contextlib.contextmanager
def stop_flag():
  """Yields a `TerminationFlag` that the first SIGTERM or SIGINT sets while the block runs; a
  second SIGINT raises `Stopped` at once. Off the main thread the flag is never set. Set from
  the start where a stage's stop was raised and lost (see `raise_if_stopped`)."""
  global _raised
  flag = TerminationFlag()
  if _raised is not None:
    flag.set(_raised.signal_number)
  try:
    with _handlers(flag.set):
      yield flag
  finally:
    if not _stages:  # As a stage's end (see there).
      _raised = None


# The stages open, innermost last, each [doing, leaves]: a signal names the innermost.
_stages = []
# The stop a signal handler raised in the open stages, if any. An exception raised by a signal
# handler can be lost: C code that calls back into Python (an attribute lookup, a hash) may
# clear it, or a library may catch everything; so the stop is also kept here, to be acted on.
_raised = None


def _raise(stop: Stopped) -> None:
  """Raises `stop` from a signal handler, and keeps it (see `_raised`)."""
  global _raised
  _raised = stop
  raise stop


def _stop_now(signal_number, unused_frame):
  doing, leaves = _stages[-1]
  _raise(Stopped(f"{_NAMES.get(signal_number, signal_number)} while {doing}: {leaves}",
                 signal_number))


def raise_if_stopped() -> None:
  """Raises the stop a stage's signal raised, if one did and it was lost on its way up; where it
  was not lost, it has ended the stages already. Called before each step that commits the
  job's work (a stage's next part, metrics.json); `stop_flag` does the same for the loop."""
  if _raised is not None:
    raise _raised


@contextlib.contextmanager
def stage(doing: str, leaves: str):
  """While the block runs, a stop signal raises `Stopped` at once, with the message
  "<signal> while <doing>: <leaves>" (`leaves`: what is kept and how to go on).

  Yields `now(doing, leaves)`, which renames the stage in place: moving from one stage to the
  next leaves no moment in which a signal has no handler (and raises a stop that was lost, see
  `raise_if_stopped`). Stages nest (the innermost names the stop); `stop_flag` inside one takes
  over the signals, and gives them back, for its block. An error that leaves a stage after a
  stop was raised in it leaves as that stop: the error is the stop's doing (TensorFlow's nest,
  its stop cleared, once went on to fail with a ValueError).
  """
  global _raised
  _stages.append([doing, leaves])

  def now(next_doing: str, next_leaves: str) -> None:
    raise_if_stopped()
    _stages[-1][:] = [next_doing, next_leaves]

  try:
    if len(_stages) == 1:
      with _handlers(_stop_now):
        yield now
    else:
      yield now
  except BaseException as error:
    if _raised is not None and stop_behind(error) is None:
      raise _raised from error
    raise
  finally:
    _stages.pop()
    if not _stages:  # Whatever was raised has left the stages: the next job starts afresh.
      _raised = None
