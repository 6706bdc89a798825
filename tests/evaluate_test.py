"""Tests of `python -m trainer.evaluate`, run as a user runs it."""

import json

import pytest

from tests import helpers


def _evaluate(*args):
  return helpers.run_module("trainer.evaluate", *args)


@pytest.mark.slow  # A TensorFlow start-up (6-7 s), as a user starts the command.
def test_evaluate_agrees_with_the_jobs_metrics_json_on_the_runs_own_dataset(finished_run):
  """No --dataset: the run's own, from its config.json; and nothing on standard error (no
  TensorFlow start-up lines)."""
  model_dir, dataset = finished_run
  result = _evaluate(f"--model_dir={model_dir}")
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stderr == ""
  printed = json.loads(result.stdout)
  assert printed["dataset"] == dataset
  written = helpers.read_metrics(model_dir)
  assert printed["split"] == "test" and printed["examples"] == written["train_examples"] // 8
  assert printed["accuracy"] == pytest.approx(written["test_accuracy"], abs=1e-6)
  assert printed["reconstruction_mse"] == pytest.approx(written["test_reconstruction_mse"],
                                                        rel=1e-4)
  # Near zero on these easy classes, where float32 rounding is relatively large.
  assert printed["classifier_loss"] == pytest.approx(written["test_classifier_loss"], rel=1e-3,
                                                     abs=1e-6)


def test_help_exits_0_with_the_commands_flags():
  result = _evaluate("--help")
  assert result.returncode == 0, result.stderr
  assert "usage: python -m trainer.evaluate" in result.stdout
  assert "--dataset=''" in result.stdout and "--split=test" in result.stdout


def test_an_empty_aip_model_dir_is_said_to_be_empty_before_tensorflow_starts(monkeypatch):
  monkeypatch.setenv("AIP_MODEL_DIR", "")
  result = helpers.run_module_without_tensorflow("trainer.evaluate")
  helpers.assert_one_error_line(
      result, "no --model_dir given and $AIP_MODEL_DIR is set but empty: pass a finished job's "
      "--model_dir, or set $AIP_MODEL_DIR to the job's directory (local or gs://)", whole=True)


def test_a_flag_given_twice_is_refused(tmp_path):
  result = helpers.run_module_without_tensorflow(
      "trainer.evaluate", f"--model_dir={tmp_path}", "--split=test", "--split", "validation")
  helpers.assert_one_error_line(
      result, "--split is given twice (--split=test, then --split validation): give it once",
      whole=True)


def _evaluate_forked(*args):
  """The command in a process forked from one that has imported TensorFlow
  (helpers.run_command_forked): its refusals, without a TensorFlow start-up each."""
  return helpers.run_command_forked("trainer.evaluate", *args)


# The slow tier: the forking process's TensorFlow start-up is paid there, as for the real
# start-up above; export_test checks this message where export.load raises it.
@pytest.mark.slow
def test_evaluate_without_an_export_says_so(tmp_path):
  result = _evaluate_forked(f"--model_dir={tmp_path}", "--dataset=mnist_sample")
  helpers.assert_one_error_line(
      result, f"no exported model at {tmp_path}/export; train one first with python -m "
      "trainer.task --model_dir=... or point --model_dir at a finished job's directory",
      whole=True)


@pytest.mark.slow
def test_evaluate_of_a_directory_without_config_json_asks_for_the_dataset(tmp_path):
  result = _evaluate_forked(f"--model_dir={tmp_path}")
  helpers.assert_one_error_line(
      result, f"no --dataset given and {tmp_path} holds no config.json naming the run's own: "
      "pass --dataset (and --data_dir for a TFDS set), or point --model_dir at a finished job",
      whole=True)
