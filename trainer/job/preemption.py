"""Stop signals: SIGTERM (preemption) and SIGINT (Ctrl-C), and how a job stops on each.

Vertex AI, Compute Engine and Kubernetes announce preemption with SIGTERM and a short grace
period; a user at a terminal presses Ctrl-C. While training, either only raises a flag: the
training loop reads it between calls into the device, every worker agrees on it there, saves
one checkpoint at the same step, and exits (`Preempted`). A second Ctrl-C stops at once. Outside
the loop (start-up, the export), a signal ends the job, saying what that stage leaves
(`Stopped`, from `stage`): raised in the job's own code, or out of a library call as it returns
to it (within seconds), not inside the library, where C code calling back into Python can lose
the stop or print it as another error.

We do not use `tf.distribute.experimental.PreemptionCheckpointHandler`: on Google Cloud
machines it watches the maintenance-event metadata instead of SIGTERM (and on CPU VMs does
nothing), which misses Vertex AI's SIGTERM, and it restores checkpoints itself, around our
check that a checkpoint fits the model.
"""

import contextlib
import inspect
import os
import signal
import sys
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
  flag = TerminationFlag()
  if _raised is not None:
    _disarm()  # The flag takes it over.
    flag.set(_raised.signal_number)
  try:
    with _handlers(flag.set):
      yield flag
  finally:
    if not _stages:  # As a stage's end (see there).
      _forget()


# The stages open, innermost last, each [doing, leaves]: a signal names the innermost.
_stages = []
# The stop a signal handler raised or deferred (`_defer`) in the open stages, if any. Even raised
# in the job's code, a stop can be lost: C code that called it back (an attribute lookup, a hash)
# may clear it, or a library may catch everything; so the stop is also kept here, to be acted on.
_raised = None


def _raise(stop: Stopped) -> None:
  """Raises `stop` from a signal handler, and keeps it (see `_raised`)."""
  global _raised
  _raised = stop
  _disarm()
  raise stop


# The job's own code: the package this module is part of.
_OWN_CODE = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep
_own_files = {}
# Open `anywhere` blocks.
_anywhere = 0
# Whether the kept stop waits to be raised (`_defer`), and for how long at most: a grace
# period (Kubernetes' default: 30 s) must leave time to stop.
_pending = False
_PATIENCE_SECONDS = 5.0
_timer = None
# A generator or coroutine "returns" at each yield; a `with` block's methods must run whole.
_SUSPENDS = inspect.CO_GENERATOR | inspect.CO_COROUTINE | inspect.CO_ASYNC_GENERATOR
_WITH_METHODS = ("__enter__", "__exit__", "__aenter__", "__aexit__")


def _own(frame) -> bool:
  filename = frame.f_code.co_filename
  if filename not in _own_files:
    _own_files[filename] = os.path.abspath(filename).startswith(_OWN_CODE)
  return _own_files[filename]


def _stop_now(signal_number, frame):
  """A stage's handler: raises the stop where the interpreter is if that is the job's own code
  (or a second stop, or in an `anywhere` block), else as a library call returns (`_defer`)."""
  doing, leaves = _stages[-1]
  stop = Stopped(f"{_NAMES.get(signal_number, signal_number)} while {doing}: {leaves}",
                 signal_number)
  # Under a debugger or coverage the trace function is theirs: raised here, as Python would.
  if (_raised is not None or _anywhere or frame is None or _own(frame)
      or sys.gettrace() is not None):
    _raise(stop)
  _defer(stop, frame)


def _defer(stop: Stopped, frame) -> None:
  """Keeps `stop`, to come out of the next library call that returns to the job's own code, as
  if that call had raised it: inside the job's `try` and `with` blocks, whose clean-up runs. A
  trace function (as pdb's) watches the library calls on this thread's stack and those the
  job's code makes next. If none returns within _PATIENCE_SECONDS, the signal comes again and
  is raised at once, wherever the interpreter is."""
  global _raised, _pending, _timer
  _raised, _pending = stop, True
  _timer = threading.Timer(_PATIENCE_SECONDS, _signal_again, (stop,))
  _timer.daemon = True
  _timer.start()
  while frame is not None:
    if _library_call(frame):
      _watch(frame)
    frame = frame.f_back
  sys.settrace(_watch_library_calls)  # Last: from here on, a library call it makes would raise.


def _signal_again(stop: Stopped) -> None:
  if _pending and _raised is stop:
    os.kill(os.getpid(), stop.signal_number)


def _library_call(frame) -> bool:
  """Whether `frame` is a library's, called by the job's own code, and may raise as it returns:
  not a generator's, nor a `with` block's method."""
  caller = frame.f_back
  return (caller is not None and _own(caller) and not _own(frame)
          and not frame.f_code.co_flags & _SUSPENDS and frame.f_code.co_name not in _WITH_METHODS)


def _watch(frame):
  frame.f_trace_lines = False
  frame.f_trace = _raise_on_return
  return _raise_on_return


def _watch_library_calls(frame, unused_event, unused_arg):
  """The trace function: its "call" events watch each library call of the job's code."""
  return _watch(frame) if _library_call(frame) else None


def _raise_on_return(unused_frame, event, unused_arg):
  """A watched call's trace function: raises the kept stop as the call returns, or ends with an
  error (which the stop takes the place of). Raising unsets the trace function."""
  if event == "return" and _pending:
    _disarm()
    raise _raised
  return _raise_on_return


def _disarm() -> None:
  """Ends the wait of a deferred stop: its trace function and its timer."""
  global _pending
  _pending = False
  if _timer is not None:
    _timer.cancel()
  if sys.gettrace() is _watch_library_calls:
    sys.settrace(None)


def _forget() -> None:
  """Drops the kept stop, once no stage is open: the next job in this process starts afresh."""
  global _raised
  _raised = None
  _disarm()


def raise_if_stopped() -> None:
  """Raises the stop a stage's signal raised, if one did and it has not ended the stages yet:
  it may have been lost on its way up (C code that called the job's code cleared it), or still
  wait for a library call to return (`_defer`). Called before each step that commits the
  job's work (a stage's next part, metrics.json); `stop_flag` does the same for the loop."""
  if _raised is not None:
    _disarm()
    raise _raised


@contextlib.contextmanager
def anywhere():
  """In the block a stage's stop signal raises wherever the interpreter is, as Python's own
  Ctrl-C does: for an import of TensorFlow, which takes seconds of library code, and where a
  stop comes out as the import's error, found by `stop_behind`."""
  global _anywhere
  _anywhere += 1
  try:
    yield
  finally:
    _anywhere -= 1


@contextlib.contextmanager
def stage(doing: str, leaves: str):
  """While the block runs, a stop signal raises `Stopped`, with the message
  "<signal> while <doing>: <leaves>" (`leaves`: what is kept and how to go on): at once in the
  job's own code, else out of the library call under way as it returns (`_stop_now`), else at
  the block's end.

  Yields `now(doing, leaves)`, which renames the stage in place: moving from one stage to the
  next leaves no moment in which a signal has no handler (and raises a stop that was lost, see
  `raise_if_stopped`). Stages nest (the innermost names the stop); `stop_flag` inside one takes
  over the signals, and gives them back, for its block. An error that leaves a stage after a
  stop was raised in it leaves as that stop: the error is the stop's doing (TensorFlow's nest,
  its stop cleared, once went on to fail with a ValueError).
  """
  _stages.append([doing, leaves])

  def now(next_doing: str, next_leaves: str) -> None:
    raise_if_stopped()
    _stages[-1][:] = [next_doing, next_leaves]

  try:
    with _handlers(_stop_now) if len(_stages) == 1 else contextlib.nullcontext():
      yield now
      raise_if_stopped()  # One lost in the block ends it too.
  except BaseException as error:
    if _raised is not None and stop_behind(error) is None:
      raise _raised from error
    raise
  finally:
    _stages.pop()
    if not _stages:  # Whatever was raised has left the stages: the next job starts afresh.
      _forget()
