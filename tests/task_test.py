"""End-to-end tests of `python -m trainer.task`, run as users run it: real data, real processes."""

import dataclasses
import os
import re
import subprocess
import sys
import time

import pytest
from absl import flags

from tests import helpers
from trainer import config as config_lib
from trainer import task
from trainer.job import preemption


def _assert_clear_error(result, message):
  assert result.returncode == 2, result.stderr[-3000:]
  errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
  assert len(errors) == 1 and message in errors[0], result.stderr[-3000:]
  assert result.stderr.count(message) == 1, result.stderr[-3000:]  # Not logged as well.
  assert "Traceback" not in result.stderr


@pytest.mark.parametrize("help_flag", ["-h", "--help"])
def test_help_prints_the_flags_by_group_and_exits_0(help_flag):
  started = time.monotonic()
  result = helpers.run_trainer(help_flag, timeout=60)
  assert result.returncode == 0, result.stderr
  assert time.monotonic() - started < 10  # No TensorFlow: about 0.1 s.
  assert result.stdout.startswith("Trains a multitask model")
  assert "Defines the flags" not in result.stdout
  headings = [line[:-1] for line in result.stdout.splitlines() if re.fullmatch(r"\S.*:", line)]
  assert headings == list(task.FLAG_GROUPS), result.stdout
  assert "\n  --batch_size=64\n      Global batch size" in result.stdout
  assert "--[no]verbose" in result.stdout


def test_every_flag_of_the_job_is_in_one_help_group():
  grouped = [name for names in task.FLAG_GROUPS.values() for name in names]
  defined = [flag.name for flag in flags.FLAGS.get_flags_for_module(task)]
  assert sorted(grouped) == sorted(defined)


def test_each_flag_has_its_fields_type_help_and_choices():
  from trainer import config
  flag_types = {str: "string", int: "int", float: "float", bool: "bool"}
  for field in dataclasses.fields(config.TrainConfig):
    flag, choices = flags.FLAGS[field.name], field.metadata["choices"]
    if choices:
      assert flag.flag_type() == "string enum" and flag.parser.enum_values == list(choices)
      assert flag.help == f"<{'|'.join(choices)}>: {field.metadata['help']}"
    else:
      assert flag.flag_type() == flag_types.get(field.type, "string"), field.name
      assert flag.help == field.metadata["help"]


def test_the_directory_flags_default_to_vertex_ais_variables():
  result = helpers.run_trainer("--help", timeout=60, env={
      "AIP_MODEL_DIR": "gs://b/model", "AIP_CHECKPOINT_DIR": "gs://b/checkpoints",
      "AIP_TENSORBOARD_LOG_DIR": "gs://b/logs"})
  assert result.returncode == 0, result.stderr
  for line in ("--model_dir=gs://b/model", "--checkpoint_dir=gs://b/checkpoints",
               "--tensorboard_dir=gs://b/logs"):
    assert f"\n  {line}\n" in result.stdout, result.stdout


def test_a_typo_in_the_dataset_is_refused_before_tensorflow_is_imported(tmp_path):
  started = time.monotonic()
  result = helpers.run_trainer("--dataset=mnist_smaple", f"--model_dir={tmp_path}", timeout=60)
  seconds = time.monotonic() - started
  _assert_clear_error(result, "unknown --dataset='mnist_smaple' (did you mean mnist_sample?)")
  assert result.stderr.splitlines() == [line for line in result.stderr.splitlines()
                                        if line.startswith("error: ")]
  assert seconds < 10, seconds  # Measured 0.06 s; importing TensorFlow alone takes 4 s.


def test_the_entry_point_modules_import_no_tensorflow():
  code = ("import sys, trainer.task, trainer.cli, trainer.config, trainer.job.preemption; "
          "print(sorted(m for m in sys.modules if m.split('.')[0] in "
          "('tensorflow', 'keras', 'numpy')))")
  result = subprocess.run([sys.executable, "-c", code], cwd=helpers.REPO, capture_output=True,
                          text=True, timeout=60, check=True)
  assert result.stdout.strip() == "[]"


# What a run logs: our lines, and the one CUDA line a CPU-only host's driver probe writes.
_OUR_LINE = re.compile(r"^[IWE]\d{4} [\d:.]+ +\d+ (\w+)\.py:\d+\] ")
# Every module of the package, its folders' (trainer/job, trainer/data, trainer/multitask) too:
# the job logs from trainer/job/train.py, outputs.py and distribution.py.
_OUR_MODULES = {name[:-3] for _, _, names in os.walk(os.path.join(helpers.REPO, "trainer"))
                for name in names if name.endswith(".py")}


@pytest.mark.slow
def test_a_run_logs_its_own_lines_and_not_tensorflows_chatter(tmp_path):
  env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
  # Small learnable data (8 steps): the lines come from start-up, training, evaluation, saving
  # and export, whatever the data's size.
  split = helpers.learnable_split(640, seed=5)
  dataset = helpers.write_npz(str(tmp_path / "data.npz"), X=split.images.reshape(-1, 784),
                              y=split.labels)
  result = subprocess.run(
      [sys.executable, "-m", "trainer.task", f"--dataset={dataset}", "--epochs=1",
       "--latent_dim=16", "--width=8", "--noreport", f"--model_dir={tmp_path / 'run'}"],
      cwd=helpers.REPO, env=env, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  lines = result.stderr.splitlines()
  assert any("epoch 1/1:" in line for line in lines), result.stderr
  others = [line for line in lines if not (
      (_OUR_LINE.match(line) and _OUR_LINE.match(line).group(1) in _OUR_MODULES)
      or "failed call to cuInit" in line)]
  assert not others, result.stderr


# One case per path an error takes to the user; tests/faults_test.py tries every bad input.
# These are refused before TensorFlow is imported: real processes, a tenth of a second each.
@pytest.mark.parametrize("flags, message", [
    (["--epochs=three"], "--epochs"),
    (["--latent_dim=16", "extra"], "unexpected arguments extra"),
    (["--loss_weights=classifier"], "write it as classifier=1.0,decoder=8.0"),
])
def test_bad_flags_get_one_clear_error_line(tmp_path, flags, message):
  result = helpers.run_trainer(*helpers.with_flags(
      ("--dataset=mnist_sample", f"--model_dir={tmp_path}"), *flags), timeout=120)
  _assert_clear_error(result, message)
  assert not os.listdir(tmp_path)


# Refused after TensorFlow is imported: in a process forked from one that has imported it
# (helpers.run_command_forked), its start-up paid once; the chatter test above starts the job
# for real. faults_test refuses both through task.main in this process, in the fast tier too.
@pytest.mark.slow
@pytest.mark.parametrize("flags, message", [
    (["--dataset=npz:/nonexistent/mnist.npz"], "no file at /nonexistent/mnist.npz"),
    (["--strategy=tpu"], "--strategy=tpu but no TPU is reachable"),
])
def test_bad_flags_after_tensorflow_starts_get_one_clear_error_line(tmp_path, flags, message):
  result = helpers.run_command_forked("trainer.task", *helpers.with_flags(
      ("--dataset=mnist_sample", f"--model_dir={tmp_path}"), *flags), timeout=120)
  _assert_clear_error(result, message)
  assert not os.listdir(tmp_path)


def test_a_flag_given_twice_is_refused_before_tensorflow_starts(tmp_path):
  result = helpers.run_module_without_tensorflow(
      "trainer.task", "--dataset=mnist_sample", f"--model_dir={tmp_path}", "--epochs=3",
      "--epochs=5")
  helpers.assert_one_error_line(
      result, "--epochs is given twice (--epochs=3, then --epochs=5): give it once", whole=True)
  assert not os.listdir(tmp_path)


def test_missing_model_dir_is_a_clear_error():
  result = helpers.run_trainer("--dataset=mnist_sample", env={"AIP_MODEL_DIR": ""}, timeout=120)
  _assert_clear_error(result, "$AIP_MODEL_DIR is set but empty: pass --model_dir")


def test_every_setting_is_a_flag_whose_default_is_the_configurations(monkeypatch):
  from absl import flags as absl_flags
  from trainer import config, task
  monkeypatch.delenv("AIP_MODEL_DIR", raising=False)
  monkeypatch.delenv("AIP_CHECKPOINT_DIR", raising=False)
  monkeypatch.delenv("AIP_TENSORBOARD_LOG_DIR", raising=False)
  absl_flags.FLAGS.unparse_flags()
  absl_flags.FLAGS(["trainer.task", "--model_dir=/runs/a"])
  try:
    assert task.config_from_flags() == config.TrainConfig(model_dir="/runs/a")
  finally:
    absl_flags.FLAGS.unparse_flags()
  grouped = {name for names in task.FLAG_GROUPS.values() for name in names}
  assert {f.name for f in dataclasses.fields(config.TrainConfig)} <= grouped


def test_a_stop_inside_tensorflows_import_is_the_stop_line_not_a_traceback(monkeypatch, capsys,
                                                                           tmp_path):
  """A SIGTERM while TensorFlow's C extensions initialise comes out of the import as their
  ImportError (seen in the chaos test). The signal's moment cannot be hit on purpose, so the
  import raises what it raised then: ImportError from the stage's Stopped."""
  config = config_lib.TrainConfig(model_dir=str(tmp_path / "run"))
  monkeypatch.setattr(task, "config_from_flags", lambda: config)

  def import_stopped(verbose, float16_op=True):
    raise ImportError("initialization failed") from preemption.Stopped(
        "SIGTERM while starting: nothing was trained or written; run the same command to start")

  monkeypatch.setattr(task.cli, "tensorflow_imported_quietly", import_stopped)
  result = helpers.run_in_process(capsys, task.main, ["task"])
  assert result.returncode == 143
  assert result.stderr == ("stopped: SIGTERM while starting: nothing was trained or written; "
                           "run the same command to start\n")
  assert not (tmp_path / "run").exists()
