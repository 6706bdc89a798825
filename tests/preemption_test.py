"""Tests of trainer.job.preemption: a first stop signal raises the flag while training, a second
Ctrl-C and any signal outside the loop stop at once, saying what the stage leaves."""

import os
import signal
import sys
import threading
import time

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


def test_outside_the_loop_a_signal_stops_at_once_saying_what_the_stage_leaves(job_code):
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


@pytest.fixture
def job_code(monkeypatch):
  """This module counts as the job's own code, and tests.helpers as a library's."""
  monkeypatch.setattr(preemption, "_OWN_CODE", os.path.abspath(__file__))
  monkeypatch.setattr(preemption, "_own_files", {})


class _Noting:
  """The job's own `with` block: notes its exit."""

  def __init__(self, seen):
    self.seen = seen

  def __enter__(self):
    return self

  def __exit__(self, *unused_exception):
    self.seen.append("exited")


def test_in_the_jobs_own_code_a_stop_is_raised_at_once(job_code):
  seen = []
  with pytest.raises(preemption.Stopped, match="^SIGTERM while exporting: run it again$"):
    with preemption.stage("exporting", "run it again"):
      os.kill(os.getpid(), signal.SIGTERM)
      seen.append("not reached")
  assert seen == []


def test_a_stop_in_a_library_call_comes_out_of_it_as_it_returns_with_the_jobs_clean_up(job_code):
  seen = []
  with pytest.raises(preemption.Stopped, match="^SIGTERM while exporting: run it again$"):
    with preemption.stage("exporting", "run it again"):
      with _Noting(seen):
        try:
          helpers.library_call(seen, signal.SIGTERM)  # It finishes, without seeing the stop.
        finally:
          seen.append("cleaned up")
      seen.append("not reached")
  assert seen == ["went on", "cleaned up", "exited"]
  assert sys.gettrace() is None  # Nothing is left watching.


def test_a_library_with_block_or_generator_runs_whole_and_the_stop_waits_for_the_next_call(
    job_code):
  seen = []
  with pytest.raises(preemption.Stopped, match="^Ctrl-C"):
    with preemption.stage("starting", "nothing written"):
      with helpers.LibraryContext(seen, signal.SIGINT):
        seen.append("inside")
      helpers.library_call(seen)
      seen.append("not reached")
  assert seen == ["entered", "inside", "exited", "went on"]
  seen.clear()
  with pytest.raises(preemption.Stopped, match="^SIGTERM"):
    with preemption.stage("starting", "nothing written"):
      for item in helpers.library_items(seen, signal.SIGTERM):  # A yield is no return.
        seen.append(item)
      helpers.library_call(seen)
  assert seen == [1, 2, "generator cleaned up", "went on"]


def test_a_second_stop_or_one_in_an_anywhere_block_is_raised_where_it_arrives(job_code):
  seen = []
  with pytest.raises(preemption.Stopped):
    with preemption.stage("starting", "nothing written"):
      helpers.library_call(seen, signal.SIGINT, signal.SIGINT)
  assert isinstance(seen[0], preemption.Stopped) and seen[1:] == ["went on"]
  seen.clear()
  with pytest.raises(preemption.Stopped, match="^SIGTERM while importing"):
    with preemption.stage("importing", "nothing done"):
      with preemption.anywhere():
        helpers.library_call(seen, signal.SIGTERM)
  assert isinstance(seen[0], preemption.Stopped) and seen[1:] == ["went on"]


def test_a_stop_that_no_library_call_brings_back_in_time_is_raised_where_it_is(job_code,
                                                                               monkeypatch):
  monkeypatch.setattr(preemption, "_PATIENCE_SECONDS", 0.2)
  seen = []
  began = time.monotonic()
  with pytest.raises(preemption.Stopped):
    with preemption.stage("exporting", "run it again"):
      helpers.library_call(seen, signal.SIGTERM, seconds=10)
  assert isinstance(seen[0], preemption.Stopped) and seen[1:] == ["went on"]
  assert time.monotonic() - began < 5
  assert sys.gettrace() is None


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
