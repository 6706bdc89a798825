"""Run directories written by an older trainer (commit a170b19, before the job was split from
the task and the run directory got its one owner) still work with today's: the finished one
reports as finished and rewrites nothing, and serves evaluate, predict and upload; the
unfinished one (preempted mid epoch 2) resumes from its checkpoint and finishes.

The directories are tests/data/old_runs/, made by tests/data/make_old_runs.py with that
commit's own `python -m trainer.task` (its README.md says how). This test goes through the
user-facing commands only (`python -m trainer.task`, `trainer.evaluate`, `trainer.predict`,
`launch.vertex upload`) and plain file reads, so that it holds across moves of the modules
behind them. Each test copies a directory to tmp_path first: the fixtures stay as written.

Times in the marks: measured with the whole file (66 s) on a busy two-core machine; the
fast tier holds only the check of the fixtures themselves (file reads).
"""

import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from tests import fake_vertex, helpers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OLD_RUNS = os.path.join(REPO, "tests", "data", "old_runs")
with open(os.path.join(OLD_RUNS, "flags.json")) as _f:
  RECORDED = json.load(_f)
STEPS_PER_EPOCH = RECORDED["steps_per_epoch"]
STOPPED_AT = RECORDED["unfinished_step"]  # The step of the unfinished run's checkpoint.


def _copy(name: str, tmp_path) -> str:
  """A copy of the old run directory `name` under tmp_path (modification times kept)."""
  target = str(tmp_path / name)
  shutil.copytree(os.path.join(OLD_RUNS, name), target)
  return target


def _read_json(*path):
  with open(os.path.join(*path)) as f:
    return json.load(f)


def _state(path) -> dict:
  """Every file under `path` (relative path -> its bytes and modification time) and every
  directory (-> None): equal before and after where nothing was written, rewritten or removed."""
  state = {}
  for root, directories, files in os.walk(path):
    relative = os.path.relpath(root, path)
    for name in directories:
      state[os.path.join(relative, name) + "/"] = None
    for name in files:
      full = os.path.join(root, name)
      with open(full, "rb") as f:
        state[os.path.join(relative, name)] = (f.read(), os.stat(full).st_mtime_ns)
  return state


def _latest_checkpoint(model_dir: str) -> str:
  """The checkpoint that checkpoints/checkpoint names latest, e.g. `ckpt-124`."""
  with open(os.path.join(model_dir, "checkpoints", "checkpoint")) as f:
    return re.search(r'^model_checkpoint_path: "([^"]+)"', f.read(), re.M).group(1)


def _command(module: str, *args, timeout=600) -> subprocess.CompletedProcess:
  """`python -m MODULE ARGS`, a process of its own forked from one that has imported
  TensorFlow (helpers.run_command_forked): the command as a user runs it, less the seconds of
  its start-up, which tests/cli_test.py, evaluate_test and predict_test run for real."""
  return helpers.run_command_forked(module, *args, timeout=timeout)


def _trainer(model_dir: str, name: str):
  """`python -m trainer.task` with the flags the old run was started with."""
  return _command("trainer.task", *RECORDED[name], f"--model_dir={model_dir}")


# Fast tier: the fixtures are what README.md says (plain file reads, well under a second), so
# that the slow tests below start from what they claim to.
def test_the_old_run_directories_are_a_finished_and_a_preempted_run_of_the_recorded_flags():
  for name in ("finished", "unfinished"):
    saved = _read_json(OLD_RUNS, name, "config.json")
    for flag in RECORDED[name]:
      key, value = flag[2:].split("=", 1) if "=" in flag else (flag[4:], False)
      assert str(saved[key]) == str(value), (name, flag, saved[key])
  finished = os.path.join(OLD_RUNS, "finished")
  assert _latest_checkpoint(finished) == f"ckpt-{2 * STEPS_PER_EPOCH}"
  assert os.path.exists(os.path.join(finished, "export", "saved_model.pb"))
  assert _read_json(finished, "metrics.json")["epochs"] == 2
  assert len(_read_json(finished, "history.json")["epochs"]) == 2
  unfinished = os.path.join(OLD_RUNS, "unfinished")
  assert STEPS_PER_EPOCH < STOPPED_AT < 2 * STEPS_PER_EPOCH  # Inside epoch 2.
  assert _latest_checkpoint(unfinished) == f"ckpt-{STOPPED_AT}"
  assert not os.path.exists(os.path.join(unfinished, "metrics.json"))
  assert not os.path.exists(os.path.join(unfinished, "export"))
  assert len(_read_json(unfinished, "history.json")["epochs"]) == 1


@pytest.mark.slow  # A trainer process (9 s).
def test_the_finished_run_reports_as_finished_and_rewrites_nothing(tmp_path):
  model_dir = _copy("finished", tmp_path)
  metrics = _read_json(model_dir, "metrics.json")
  before = _state(model_dir)
  result = _trainer(model_dir, "finished")
  assert result.returncode == 0, result.stderr[-3000:]
  log = result.stderr + result.stdout
  assert "already trained its 2 epochs" in log, log[-3000:]
  assert f"test accuracy {metrics['test_accuracy']:.4f}" in log, log[-3000:]
  assert "Resuming from" not in log
  assert _state(model_dir) == before


@pytest.mark.slow  # An evaluate process (9 s).
def test_evaluate_reads_the_finished_runs_export_and_agrees_with_its_metrics(tmp_path):
  model_dir = _copy("finished", tmp_path)
  metrics = _read_json(model_dir, "metrics.json")
  before = _state(model_dir)
  result = _command("trainer.evaluate", f"--model_dir={model_dir}")
  assert result.returncode == 0, result.stderr[-3000:]
  printed = json.loads(result.stdout)
  assert printed["dataset"] == "mnist_sample" and printed["split"] == "test"
  for name in ("accuracy", "classifier_loss", "reconstruction_mse"):
    assert printed[name] == pytest.approx(metrics[f"test_{name}"], rel=1e-5, abs=1e-6), name
  assert _state(model_dir) == before


@pytest.mark.slow  # A predict process (9 s).
def test_predict_answers_each_image_with_the_finished_runs_export(tmp_path):
  import tensorflow as tf  # For PNG encoding only.
  model_dir = _copy("finished", tmp_path)
  before = _state(model_dir)
  inputs = []
  for name, (row, col) in (("one.png", (4, 12)), ("two.png", (10, 6))):
    image = np.zeros((28, 28, 1), np.uint8)
    image[row:row + 14, col:col + 4] = 255  # A bright stroke on a dark background.
    (tmp_path / name).write_bytes(tf.io.encode_png(image).numpy())
    inputs.append(str(tmp_path / name))
  out = tmp_path / "out"
  result = _command("trainer.predict", f"--model_dir={model_dir}", f"--output_dir={out}",
                    *inputs)
  assert result.returncode == 0, result.stderr[-3000:]
  lines = result.stdout.splitlines()
  assert len(lines) == 2, result.stdout
  for line, path, name in zip(lines, inputs, ("one", "two")):
    assert re.fullmatch(rf"{re.escape(path)}: \d \(probability (0\.\d{{4}}|1\.0000)\), "
                        rf"reconstruction .*{name}_reconstruction\.png", line), line
    assert (out / f"{name}_reconstruction.png").exists()
  assert _state(model_dir) == before


# `python -m launch.vertex`, as a user runs it, but with Cloud Storage stood in for: upload
# takes only gs:// paths and reads them through tf.io.gfile, so every tf.io.gfile function is
# given BUCKET/... as the local ROOT/... . This file run as a module does it (see the end):
# `python -m tests.old_run_directories_test BUCKET ROOT ARGS` runs `python -m launch.vertex ARGS`.
def _launcher_with_local_bucket() -> None:
  import functools
  import runpy
  import tensorflow as tf
  bucket, root = sys.argv[1:3]
  del sys.argv[1:3]

  def local(value):
    if isinstance(value, str) and (value == bucket or value.startswith(bucket + "/")):
      return root + value[len(bucket):]
    return value

  def translated(function):
    @functools.wraps(function)
    def call(*args, **kwargs):
      return function(*map(local, args), **{key: local(v) for key, v in kwargs.items()})
    return call

  for name in dir(tf.io.gfile):
    if not name.startswith("_") and callable(getattr(tf.io.gfile, name)):
      setattr(tf.io.gfile, name, translated(getattr(tf.io.gfile, name)))
  sys.argv[0] = "launch.vertex"
  runpy.run_module("launch.vertex", run_name="__main__", alter_sys=True)


BUCKET = "gs://old-runs"


@pytest.mark.slow  # A launcher process (4 s).
def test_upload_registers_the_finished_runs_export(tmp_path):
  finished = _copy("finished", tmp_path)
  metrics = _read_json(finished, "metrics.json")
  before = _state(finished)
  server = fake_vertex.FakeVertex(upload_polls=0).start()  # Registered at once.
  try:
    # Forked from a process that has imported TensorFlow (helpers.run_command_forked): the
    # launcher's own start-up is tests/vertex_test.py's.
    result = _command("tests.old_run_directories_test", BUCKET, str(tmp_path), "upload",
                      "--project=p", "--region=r", f"--api_endpoint={server.endpoint}",
                      f"--model_dir={BUCKET}/finished", timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    name = f"projects/p/locations/r/models/{fake_vertex.MODEL_ID}"
    assert f"uploaded {name}" in result.stdout.splitlines(), result.stdout
    (request,) = server.requests_of("UploadModel")
  finally:
    server.stop()
  assert request.parent == "projects/p/locations/r"
  assert request.model.artifact_uri == f"{BUCKET}/finished/export"
  assert request.model.description == (
      f"test accuracy {metrics['test_accuracy']:.4f}, "
      f"reconstruction MSE {metrics['test_reconstruction_mse']:.4f}")
  assert _state(finished) == before


@pytest.mark.slow  # A trainer process that trains the rest of epoch 2 (28 s).
def test_the_unfinished_run_resumes_from_its_checkpoint_and_finishes(tmp_path):
  model_dir = _copy("unfinished", tmp_path)
  result = _trainer(model_dir, "unfinished")
  assert result.returncode == 0, result.stderr[-3000:]
  log = result.stderr + result.stdout
  checkpoint = os.path.join(model_dir, "checkpoints", f"ckpt-{STOPPED_AT}")
  assert (f"Resuming from {checkpoint}: epoch 2 of 2, step {STOPPED_AT - STEPS_PER_EPOCH} of "
          f"{STEPS_PER_EPOCH}.") in log, log[-3000:]
  assert log.count("epoch 1/2") == 0 and "epoch 2/2" in log  # Epoch 1 not trained again.
  metrics = _read_json(model_dir, "metrics.json")
  assert metrics["epochs"] == 2
  assert 0.0 < metrics["test_accuracy"] < 1.0
  history = _read_json(model_dir, "history.json")["epochs"]
  assert [entry["epoch"] for entry in history] == [1, 2]
  # Epoch 1's entry is the old run's, as it wrote it.
  assert history[0] == _read_json(OLD_RUNS, "unfinished", "history.json")["epochs"][0]
  assert _latest_checkpoint(model_dir) == f"ckpt-{2 * STEPS_PER_EPOCH}"
  assert os.path.exists(os.path.join(model_dir, "export", "saved_model.pb"))


if __name__ == "__main__":
  _launcher_with_local_bucket()
