"""Tests of `python -m trainer.evaluate`, run as a user runs it."""

import json

import pytest

from tests import helpers


def _evaluate(*args):
  return helpers.run_module("trainer.evaluate", *args)


def test_evaluate_agrees_with_the_jobs_metrics_json(finished_run):
  model_dir, dataset = finished_run
  result = _evaluate(f"--model_dir={model_dir}", f"--dataset={dataset}")
  assert result.returncode == 0, result.stderr[-2000:]
  printed = json.loads(result.stdout)
  written = helpers.read_metrics(model_dir)
  assert printed["split"] == "test" and printed["examples"] == written["train_examples"] // 8
  assert printed["accuracy"] == pytest.approx(written["test_accuracy"], abs=1e-6)
  assert printed["reconstruction_mse"] == pytest.approx(written["test_reconstruction_mse"],
                                                        rel=1e-4)
  # Near zero on these easy classes, where float32 rounding is relatively large.
  assert printed["classifier_loss"] == pytest.approx(written["test_classifier_loss"], rel=1e-3,
                                                     abs=1e-6)


# Another TensorFlow start-up (6-7 s) for a refusal: the slow tier. The fast tier runs the
# command once (above), and export_test checks this message where export.load raises it.
@pytest.mark.slow
def test_evaluate_without_an_export_says_so(tmp_path):
  result = _evaluate(f"--model_dir={tmp_path}", "--dataset=mnist_sample")
  helpers.assert_one_error_line(
      result, f"no exported model at {tmp_path}/export; train one first with python -m "
      "trainer.task --model_dir=... or point --model_dir at a finished job's directory",
      whole=True)
