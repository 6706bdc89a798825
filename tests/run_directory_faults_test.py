"""Faults of the run directory (issue 24's table), through the entry point in this process.

They are the job's (trainer/job): the entry point runs here with the stand-in task
(tests/stand_in_task.py) in place of the multitask problem, which costs seconds a start
instead of a second, and tens of seconds a resume (the real problem's resumes are
tests/faults_test.py's and train_test's). Each case works on a copy of this module's finished
stand-in run (2 epochs of 16 steps, checkpoints ckpt-16 and ckpt-32) and ends either in an
exact resume (exit 0) or in one `error:` line (exit 2) with the copy left byte for byte as it
was.
"""

import json
import os
import shutil

import pytest

from absl import flags

from tests import helpers, stand_in_task
# The entry point run in this process.
from tests.faults_test import BASE_FLAGS, _run_task
from trainer import cli, task
from trainer.job import lease as lease_lib
from trainer.multitask import problem

STEPS_PER_EPOCH = 16
# The stand-in run's flags: epochs end at the checkpoints, ckpt-16 and ckpt-32. (--dataset is
# the stand-in's to ignore.)
STAND_IN_FLAGS = ("--dataset=mnist_sample", "--epochs=2", "--steps_per_loop=5")


MULTITASK = problem.make_task


@pytest.fixture(autouse=True)
def stand_in(monkeypatch):
  """The entry point's problem replaced by the stand-in task, for each test."""
  monkeypatch.setattr(problem, "make_task",
                      stand_in_task.factory(steps_per_epoch=STEPS_PER_EPOCH))


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
  """A finished stand-in run, started as the tests below run it: (model_dir, --dataset value).
  Only read: a test that runs the job works on a copy (`_copy`)."""
  model_dir = tmp_path_factory.mktemp("stand_in") / "run"
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(problem, "make_task", stand_in_task.factory(steps_per_epoch=STEPS_PER_EPOCH))
    flags.FLAGS.unparse_flags()
    argv = cli.parse_flags(["trainer.task", *STAND_IN_FLAGS, f"--model_dir={model_dir}"])
    try:
      task.main(argv)
    except SystemExit as e:
      assert not e.code, e.code
  assert (model_dir / "metrics.json").exists()
  return str(model_dir), "mnist_sample"


def _copy(finished_run, tmp_path):
  """A copy of the module's finished run: the original must never change."""
  shutil.copytree(finished_run[0], tmp_path / "run")
  return tmp_path / "run"


def _without_results(run):
  """Removes what only `finalize` writes (it re-exports and redraws the report anyway)."""
  (run / "metrics.json").unlink()
  shutil.rmtree(run / "export")
  shutil.rmtree(run / "report")
  return run


def _killed_after_epoch_1(finished_run, tmp_path):
  """P: the run as a kill right after ckpt-16, at epoch 1's end, leaves it."""
  run = _without_results(_copy(finished_run, tmp_path))
  for path in (run / "checkpoints").glob("ckpt-32.*"):
    path.unlink()
  # The epoch's record is written before its checkpoint: epoch 2 never got one.
  history = json.loads((run / "history.json").read_text())
  history["epochs"] = [entry for entry in history["epochs"] if entry["epoch"] == 1]
  (run / "history.json").write_text(json.dumps(history, indent=2, sort_keys=True))
  return run


def _argv(finished_run, run, *changes):
  """The finished run's own command line on `run`, with `changes` in place of its flags."""
  # absl's INFO lines (the resume's), which `python -m trainer.task` shows, reach caplog too.
  return list(helpers.with_flags((*STAND_IN_FLAGS, f"--model_dir={run}", "--verbosity=0"),
                                 *changes))


def _finished_metrics(finished_run):
  return helpers.without_timing(helpers.read_metrics(finished_run[0]))


@pytest.fixture
def log(caplog):
  """The job's INFO lines, as caplog.text."""
  caplog.set_level("INFO")
  return caplog


def _assert_resumed_exactly(result, run, finished_run):
  assert result.returncode == 0, result.stderr[-3000:]
  assert helpers.without_timing(helpers.read_metrics(str(run))) == _finished_metrics(finished_run)


def _assert_already_trained(result, log):
  assert result.returncode == 0, result.stderr[-3000:]
  assert "This job has already trained its 2 epochs; its results:" in log.text


def _set_state_file(run, variant):
  state = run / "checkpoints" / "checkpoint"
  if variant == "deleted":
    state.unlink()
  elif variant == "empty":  # What a crash between its creation and its write leaves.
    state.write_bytes(b"")
  elif variant == "garbage-text":
    state.write_text("not a CheckpointState {{{\n")
  elif variant == "garbage-bytes":  # What a failed disk may hold: not even UTF-8.
    state.write_bytes(bytes(range(256)))
  else:  # "stale": the finished run's, naming ckpt-32 as the latest.
    assert 'model_checkpoint_path: "ckpt-32"' in state.read_text()


# Deleted, or not a CheckpointState: TensorFlow's CheckpointManager stops on an empty one or one
# that is not text, so the controller makes it only at its first save, after rewriting the file.
LOST_STATE_FILES = ["deleted", "garbage-text", "empty", "garbage-bytes"]


# 1 and 12: a kill at an epoch's end resumes exactly, whatever the state file says.
# Two of the variants train (the others' files are read alike, and the finished run's test below
# takes every variant through start-up).
@pytest.mark.parametrize("state_file", ["stale", "garbage-bytes"])
def test_killed_after_epoch_1_resumes_from_ckpt_16_whatever_the_state_file_says(
    state_file, finished_run, tmp_path, capsys, log):
  run = _killed_after_epoch_1(finished_run, tmp_path)
  _set_state_file(run, state_file)
  result = _run_task(_argv(finished_run, run), capsys)
  _assert_resumed_exactly(result, run, finished_run)
  assert (f"Resuming from {run}/checkpoints/ckpt-16: epoch 2 of 2, step 0 of "
          f"{STEPS_PER_EPOCH}.") in log.text
  assert "cannot be read" not in log.text  # Missing is not damaged: nothing to set aside.
  assert not (run / "checkpoints" / "unreadable").exists()


# 2: a finished run is its metrics.json, whatever its state file says.
@pytest.mark.parametrize("state_file", LOST_STATE_FILES)
def test_a_finished_run_with_a_lost_state_file_says_it_has_trained_and_writes_nothing(
    state_file, finished_run, tmp_path, capsys, log):
  run = _copy(finished_run, tmp_path)
  _set_state_file(run, state_file)
  before = helpers.directory_state(run)
  _assert_already_trained(_run_task(_argv(finished_run, run), capsys), log)
  assert helpers.directory_state(run) == before


def _truncate(length):
  def damage(path):
    os.truncate(path, length)
  return damage


def _flip_64_bytes_in_the_middle(path):
  raw = bytearray(path.read_bytes())
  middle = len(raw) // 2
  raw[middle:middle + 64] = bytes(byte ^ 0xFF for byte in raw[middle:middle + 64])
  path.write_bytes(bytes(raw))


# Each damage: the file it hits, how, and the cause the warning names (TF 2.21's words).
DAMAGE = {
    "data-truncated": ("data-00000-of-00001", _truncate(100),
                       "IndexError: Read less bytes than requested"),
    "index-truncated": ("index", _truncate(30), "file is too short to be an sstable"),
    "data-overwritten": ("data-00000-of-00001", _flip_64_bytes_in_the_middle,
                         "Checksum does not match"),
}


def _damage(run, checkpoint, case):
  suffix, damage, _ = DAMAGE[case]
  damage(run / "checkpoints" / f"{checkpoint}.{suffix}")


# 3: a damaged newest checkpoint is passed over with a warning and set aside, kept.
# One kind of damage (the finished run's test below reads all three).
@pytest.mark.parametrize("case", ["data-overwritten"])
def test_a_damaged_newest_checkpoint_is_named_passed_over_and_set_aside(
    case, finished_run, tmp_path, capsys, log):
  run = _without_results(_copy(finished_run, tmp_path))
  _damage(run, "ckpt-32", case)
  damaged = helpers.directory_state(run / "checkpoints")
  result = _run_task(_argv(finished_run, run), capsys)
  _assert_resumed_exactly(result, run, finished_run)
  checkpoints = run / "checkpoints"
  (warning,) = [record.getMessage() for record in log.records
                if "cannot be read" in record.getMessage()]
  assert warning.startswith(f"The checkpoint {checkpoints}/ckpt-32 cannot be read ("), warning
  assert DAMAGE[case][2] in warning and "trying the one before it" in warning, warning
  assert f"Resuming from {checkpoints}/ckpt-16: epoch 2 of 2, step 0 of 16." in log.text
  # Set aside as it was, byte for byte, and a new ckpt-32 saved in its place.
  aside = helpers.directory_state(checkpoints / "unreadable")
  assert aside == {name: digest for name, digest in damaged.items()
                   if name.startswith("ckpt-32.")}
  assert (checkpoints / "unreadable" / "ckpt-32.index").exists()
  assert (checkpoints / "ckpt-32.index").exists()


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_a_finished_run_with_a_damaged_newest_checkpoint_says_it_has_trained(
    case, finished_run, tmp_path, capsys, log):
  run = _copy(finished_run, tmp_path)
  _damage(run, "ckpt-32", case)
  before = helpers.directory_state(run)
  _assert_already_trained(_run_task(_argv(finished_run, run), capsys), log)
  assert helpers.directory_state(run) == before  # Nothing set aside: it trains no more.


# 4: a run that has trained never starts over from step 0 in silence.
def _damage_every_checkpoint(run):
  for checkpoint in ("ckpt-16", "ckpt-32"):
    _damage(run, checkpoint, "data-truncated")
  return "none of the 2 checkpoints in {} can be read"


def _empty_the_checkpoints(run):
  for path in (run / "checkpoints").iterdir():
    path.unlink()
  return "there is no checkpoint in {}"


@pytest.mark.parametrize("fault", [_damage_every_checkpoint, _empty_the_checkpoints],
                         ids=["every-checkpoint-damaged", "checkpoints-emptied"])
def test_a_trained_run_without_a_readable_checkpoint_is_refused(fault, finished_run, tmp_path,
                                                               capsys):
  run = _without_results(_copy(finished_run, tmp_path))
  state = fault(run).format(run / "checkpoints")
  before = helpers.directory_state(run)
  result = _run_task(_argv(finished_run, run), capsys)
  line = helpers.assert_one_error_line(result, "this run has trained (")
  assert f"but {state};" in line, line
  assert helpers.directory_state(run) == before


# 5: --checkpoint_dir where there are none: refused, naming where they were saved.
@pytest.mark.parametrize("exists", [False, True], ids=["missing", "empty"])
def test_checkpoint_dir_without_checkpoints_is_refused_naming_the_runs_own(
    exists, finished_run, tmp_path, capsys):
  run = _killed_after_epoch_1(finished_run, tmp_path)
  elsewhere = tmp_path / "elsewhere"
  if exists:
    elsewhere.mkdir()
  before = helpers.directory_state(run)
  result = _run_task(_argv(finished_run, run, f"--checkpoint_dir={elsewhere}"), capsys)
  helpers.assert_one_error_line(
      result, f"there is no checkpoint in {elsewhere} (it saved them in {run}/checkpoints)")
  assert helpers.directory_state(run) == before
  assert elsewhere.exists() == exists  # A missing one is not created, an empty one stays so.
  assert helpers.directory_state(elsewhere) == {}


# 6: one job per run directory.
def test_a_live_lease_refuses_the_job_and_once_released_the_job_runs(finished_run, tmp_path,
                                                                     capsys, log):
  run = _copy(finished_run, tmp_path)
  original = helpers.directory_state(run)
  # Renewed hourly: no renewal rewrites lease.json between the states compared.
  held = lease_lib.Lease.acquire(str(run), renew_every=3600, stale_after=7200)
  try:
    before = helpers.directory_state(run)
    assert "lease.json" in before
    result = _run_task(_argv(finished_run, run), capsys)
    line = helpers.assert_one_error_line(result, "another job holds the run directory")
    assert f"pid {os.getpid()}" in line, line
    assert helpers.directory_state(run) == before
  finally:
    held.release()
  _assert_already_trained(_run_task(_argv(finished_run, run), capsys), log)
  assert helpers.directory_state(run) == original  # Its own lease is gone with it.


# 7: an output location that cannot be written is refused before anything is written.
def test_an_unwritable_tensorboard_dir_is_refused_and_nothing_is_written(finished_run, tmp_path,
                                                                        capsys):
  run = _killed_after_epoch_1(finished_run, tmp_path)
  blocker = tmp_path / "a-file"
  blocker.write_text("in the way")
  before = helpers.directory_state(run)
  result = _run_task(_argv(finished_run, run, f"--tensorboard_dir={blocker}/logs"), capsys)
  helpers.assert_one_error_line(result, f"cannot write to --tensorboard_dir={blocker}/logs")
  assert helpers.directory_state(run) == before
  assert blocker.read_text() == "in the way"


def _with(name, value):
  def edit(text):
    return json.dumps({**json.loads(text), name: value})
  return edit


# 8 and 9: a damaged file of the run is named, never taken for a change of flags.
DAMAGED_CONFIG = {
    "epochs-a-string": (_with("epochs", "2"), ()),
    "epochs-null": (_with("epochs", None), ()),
    # Asked for as it is saved: a type mismatch must not read as a change of value.
    "batch_size-a-string": (_with("batch_size", "64"), ("--batch_size=64",)),
    "a-list": (lambda _: "[]", ()),
    "cut-short": (lambda _: "{", ()),
}


@pytest.mark.parametrize("case", sorted(DAMAGED_CONFIG))
def test_a_damaged_config_json_is_refused_untouched(case, finished_run, tmp_path, capsys):
  run = _copy(finished_run, tmp_path)
  edit, changes = DAMAGED_CONFIG[case]
  (run / "config.json").write_text(edit((run / "config.json").read_text()))
  before = helpers.directory_state(run)
  result = _run_task(_argv(finished_run, run, *changes), capsys)
  helpers.assert_one_error_line(result, f"{run}/config.json is damaged: ")
  assert "was trained with" not in result.stderr
  assert helpers.directory_state(run) == before


DAMAGED_METRICS = {
    "a-list": lambda _: "[]",
    "epochs-only": lambda _: '{"epochs": 2}',
    "cut-short": lambda _: "{",
    "epochs-a-string": _with("epochs", "2"),
}


@pytest.mark.parametrize("case", sorted(DAMAGED_METRICS))
def test_a_damaged_metrics_json_is_refused_untouched(case, finished_run, tmp_path, capsys):
  run = _copy(finished_run, tmp_path)
  (run / "metrics.json").write_text(DAMAGED_METRICS[case]((run / "metrics.json").read_text()))
  before = helpers.directory_state(run)
  result = _run_task(_argv(finished_run, run), capsys)
  helpers.assert_one_error_line(result, f"{run}/metrics.json is damaged: ")
  assert helpers.directory_state(run) == before


DAMAGED_HISTORY = {
    "cut-short": "{",
    "epochs-not-a-list": '{"epochs": 1}',
    "epoch-a-string": '{"epochs": [{"epoch": "1"}]}',
}


@pytest.mark.parametrize("case", sorted(DAMAGED_HISTORY))
def test_a_damaged_history_json_is_refused_untouched(case, finished_run, tmp_path, capsys):
  run = _killed_after_epoch_1(finished_run, tmp_path)
  (run / "history.json").write_text(DAMAGED_HISTORY[case])
  before = helpers.directory_state(run)
  result = _run_task(_argv(finished_run, run), capsys)
  helpers.assert_one_error_line(result, f"{run}/history.json is damaged: ")
  assert helpers.directory_state(run) == before


# 10: bad input found before the run directory exists creates none.
def test_an_npz_dataset_that_is_a_directory_is_refused_creating_nothing(tmp_path, capsys,
                                                                        monkeypatch):
  monkeypatch.setattr(problem, "make_task", MULTITASK)  # The data is the problem's to refuse.
  data = tmp_path / "data"
  data.mkdir()
  model_dir = tmp_path / "new-run"
  result = _run_task([f"--dataset=npz:{data}", f"--model_dir={model_dir}", *BASE_FLAGS], capsys)
  helpers.assert_one_error_line(result, f"a directory at {data}")
  assert not model_dir.exists()
  assert helpers.directory_state(data) == {}


def test_epochs_out_of_range_is_refused_creating_nothing(finished_run, tmp_path, capsys):
  model_dir = tmp_path / "new-run"
  result = _run_task(_argv(finished_run, model_dir, "--epochs=99999999999999999999"), capsys)
  helpers.assert_one_error_line(result, "--epochs=99999999999999999999 is out of range")
  assert not model_dir.exists()


# 11: what an interrupted save left is removed at the next job's first save.
def test_a_stale_temporary_save_is_removed_when_the_job_resumes(finished_run, tmp_path, capsys):
  run = _killed_after_epoch_1(finished_run, tmp_path)
  stale = run / "checkpoints" / "ckpt-40_temp"
  stale.mkdir()
  (stale / "part-00000-of-00001.data-00000-of-00001").write_bytes(b"\x01" * 100)
  result = _run_task(_argv(finished_run, run), capsys)
  _assert_resumed_exactly(result, run, finished_run)
  assert not stale.exists()


# 12: a run whose training is done but not exported only evaluates and exports.
def test_a_run_trained_but_not_exported_evaluates_and_exports_without_training(
    finished_run, tmp_path, capsys, log):
  run = _copy(finished_run, tmp_path)
  (run / "metrics.json").unlink()
  checkpoints = helpers.directory_state(run / "checkpoints")
  result = _run_task(_argv(finished_run, run), capsys)
  _assert_resumed_exactly(result, run, finished_run)
  assert (f"Resuming from {run}/checkpoints/ckpt-32: all 2 epochs are trained; evaluating and "
          "exporting.") in log.text
  assert "epoch 3 of 2" not in log.text
  assert helpers.directory_state(run / "checkpoints") == checkpoints  # Nothing trained again.
