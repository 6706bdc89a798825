"""Tests of trainer.job.preemption: a first stop signal raises the flag while training, a second
Ctrl-C and any signal outside the loop stop at once, saying what the stage leaves."""

import os
import signal
import threading

import pytest

from tests import helpers
from trainer.job import preemption


@pytest.mark.parametrize("number, exit_code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_stop_signal_sets_the_flag_instead_of_ending_the_process(number, exit_code):
  with preemption.stop_flag() as flag:
    assert not flag.requested
    os.kill(os.getpid(), number)
    assert flag.requested and flag.signal_number == number
  stop = preemption.Preempted("checkpoint saved", flag.signal_number)
  assert stop.exit_code == exit_code
  assert stop.verb == ("interrupted" if number == signal.SIGINT else "preempted")


def test_a_second_ctrl_c_stops_at_once():
  with preemption.stop_flag() as flag:
    os.kill(os.getpid(), signal.SIGINT)
    with pytest.raises(preemption.Stopped, match="Ctrl-C again: stopped at once") as raised:
      os.kill(os.getpid(), signal.SIGINT)
  assert flag.requested and raised.value.exit_code == 130


def test_outside_the_loop_a_signal_stops_at_once_saying_what_the_stage_leaves():
  with pytest.raises(preemption.Stopped) as raised:
    with preemption.stage("exporting", "the checkpoint is saved; run it again"):
      os.kill(os.getpid(), signal.SIGTERM)
  assert str(raised.value) == "SIGTERM while exporting: the checkpoint is saved; run it again"
  assert raised.value.exit_code == 143
  # Not an Exception: a broad `except Exception` (the report's) must not swallow a stop.
  assert not isinstance(raised.value, Exception)


def test_the_previous_handlers_come_back_after_the_context():
  previous = [signal.getsignal(number) for number in preemption.STOP_SIGNALS]
  with preemption.stage("starting", "nothing written"):
    with preemption.stop_flag():
      assert signal.getsignal(signal.SIGTERM) not in previous
    assert signal.getsignal(signal.SIGINT) not in previous
  assert [signal.getsignal(number) for number in preemption.STOP_SIGNALS] == previous


def test_off_the_main_thread_the_flag_is_inert():
  seen = []

  def body():
    with preemption.stop_flag() as flag:
      seen.append(flag.requested)

  thread = threading.Thread(target=body)
  thread.start()
  thread.join()
  assert seen == [False]


def _signal_then_the_jobs_code(number: int) -> None:
  """Sends `number` from here (to a stage, code not the job's), then runs the job's code."""
  os.kill(os.getpid(), number)
  preemption.raise_if_stopped()


def test_a_stage_renamed_in_place_names_the_new_stage_and_nested_ones_the_innermost():
  with pytest.raises(preemption.Stopped, match="^Ctrl-C \\(SIGINT\\) while exporting: run it again$"):
    with preemption.stage("starting", "nothing written") as now:
      now("exporting", "run it again")
      _signal_then_the_jobs_code(signal.SIGINT)
  with pytest.raises(preemption.Stopped, match="^SIGTERM while importing: nothing done$"):
    with preemption.stage("starting", "nothing written"):
      with preemption.stage("importing", "nothing done"):
        _signal_then_the_jobs_code(signal.SIGTERM)
  # The training loop's flag takes the signals over, then hands them back: no moment without.
  with pytest.raises(preemption.Stopped, match="^SIGTERM while exporting"):
    with preemption.stage("exporting", "run it again"):
      with preemption.stop_flag() as flag:
        os.kill(os.getpid(), signal.SIGTERM)
      assert flag.requested
      _signal_then_the_jobs_code(signal.SIGTERM)


def _library(seen: list, signals=(signal.SIGTERM,)) -> None:
  """Code that is not the job's, as TensorFlow's C++ calling back into Python: the stop signals
  `signals` arrive in it, and it swallows what they raise there (as nest's Flatten once did)."""
  for number in signals:
    try:
      os.kill(os.getpid(), number)
      seen.append("went on")
    except BaseException as error:  # pylint: disable=broad-except
      seen.append(error)


def test_a_stop_that_arrives_in_other_code_is_raised_at_the_jobs_next_line_instead():
  seen = []
  with pytest.raises(preemption.Stopped, match="^SIGTERM while exporting: run it again$"):
    with preemption.stage("exporting", "run it again"):
      _library(seen)
      seen.append("back")
      preemption.stop_behind(ValueError())  # The job's code: its first line raises the stop.
      seen.append("not reached")
  assert seen == ["went on", "back"]
  seen.clear()
  with pytest.raises(preemption.Stopped):  # With no more of the job's code, the stage's end.
    with preemption.stage("exporting", "run it again"):
      _library(seen)
  assert seen == ["went on"]
  with preemption.stage("starting", "nothing written"):  # Nothing is left armed after.
    _library(seen, signals=())
    preemption.raise_if_stopped()


def test_a_second_stop_or_one_in_an_anywhere_block_is_raised_where_it_arrives():
  seen = []
  with pytest.raises(preemption.Stopped):
    with preemption.stage("starting", "nothing written"):
      _library(seen, signals=(signal.SIGINT, signal.SIGINT))
  assert seen[0] == "went on" and isinstance(seen[1], preemption.Stopped)
  seen.clear()
  with pytest.raises(preemption.Stopped, match="^SIGTERM while importing"):
    with preemption.stage("importing", "nothing done"):
      with preemption.anywhere():
        _library(seen)
  assert len(seen) == 1 and isinstance(seen[0], preemption.Stopped)


def test_a_stop_lost_on_its_way_up_is_raised_at_the_stages_next_part():
  with pytest.raises(preemption.Stopped, match="^SIGTERM while starting: nothing written$"):
    with preemption.stage("starting", "nothing written") as now:
      helpers.signal_swallowed(signal.SIGTERM)
      now("training", "the checkpoint is kept")
  # It has left the stages: a job run again in this process starts afresh.
  with preemption.stage("starting", "nothing written") as now:
    now("training", "the checkpoint is kept")
    preemption.raise_if_stopped()
  with pytest.raises(preemption.Stopped, match="^SIGTERM while training"):  # With no next part,
    with preemption.stage("training", "the checkpoint is kept"):             # at the stage's end.
      helpers.signal_swallowed(signal.SIGTERM)


def test_an_error_that_a_lost_stop_caused_leaves_the_stage_as_that_stop():
  with pytest.raises(preemption.Stopped, match="^Ctrl-C \\(SIGINT\\) while starting: nothing") as raised:
    with preemption.stage("starting", "nothing written"):
      helpers.signal_swallowed(signal.SIGINT)
      raise ValueError("Argument `structure` is a scalar but `len(flat_sequence)`=0 > 1")
  assert isinstance(raised.value.__cause__, ValueError)
  with pytest.raises(ValueError):  # Without a stop, an error is itself.
    with preemption.stage("starting", "nothing written"):
      raise ValueError("bad data")


def test_an_error_that_a_lost_second_ctrl_c_caused_leaves_the_stage_as_that_stop():
  with pytest.raises(preemption.Stopped, match="^Ctrl-C again: stopped at once"):
    with preemption.stage("training", "the checkpoint is kept"):
      with preemption.stop_flag():
        os.kill(os.getpid(), signal.SIGINT)
        helpers.signal_swallowed(signal.SIGINT)
        raise ValueError("Argument `structure` is a scalar but `len(flat_sequence)`=0 > 1")


def test_a_stop_lost_before_the_loop_sets_the_loops_flag_from_its_start():
  with pytest.raises(preemption.Stopped):
    with preemption.stage("training", "the checkpoint is kept"):
      helpers.signal_swallowed(signal.SIGINT)
      with preemption.stop_flag() as flag:
        assert flag.requested and flag.signal_number == signal.SIGINT
      preemption.raise_if_stopped()
  with preemption.stop_flag() as flag:  # Outside the stages nothing is carried over.
    assert not flag.requested


def test_a_stop_behind_another_error_is_found_through_its_cause_or_context():
  stop = preemption.Stopped("SIGTERM while starting: nothing was written")
  # As a C extension's initialisation reports a stop raised inside it (TensorFlow's import).
  try:
    try:
      raise stop
    except preemption.Stopped as inner:
      raise ImportError("initialization failed") from inner
  except ImportError as caused:
    assert preemption.stop_behind(caused) is stop
  try:
    try:
      raise stop
    except preemption.Stopped:
      raise ImportError("initialization failed")  # Implicitly chained: the context.
  except ImportError as chained:
    assert preemption.stop_behind(chained) is stop
  assert preemption.stop_behind(ImportError("no module named x")) is None
