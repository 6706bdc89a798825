"""Tests of trainer.job.tuning: inside a tuning trial every evaluation reaches cloudml-hypertune's
file, through one HyperTune object, once per step, and a resumed trial reports its earlier ones
again first; elsewhere, or without the library, nothing happens."""

import json
import sys

import pytest
import tensorflow as tf

from trainer.job import run_directory, tuning

STEPS_PER_EPOCH = 16


def _validation(step: int) -> dict:
  """Validation metrics that tell the evaluation at `step` apart."""
  return {"accuracy": 0.5 + step / 100, "reconstruction_mse": 1 / step, "classifier_loss": 0.1}


def _lines(path) -> list:
  """The reports in cloudml-hypertune's file, as (global step, the line's JSON)."""
  reports = [json.loads(line) for line in path.read_text().splitlines()]
  return [(int(report["global_step"]), report) for report in reports]


@pytest.fixture
def trial(tmp_path, monkeypatch):
  """A tuning trial's environment; its metrics file's path."""
  metrics_file = tmp_path / "hypertune" / "output.metrics"
  monkeypatch.setenv("CLOUD_ML_HP_METRIC_FILE", str(metrics_file))
  monkeypatch.setenv("CLOUD_ML_TRIAL_ID", "3")
  return metrics_file


def test_every_evaluation_is_a_line_of_its_step_and_a_step_is_reported_once(trial, tmp_path):
  reporter = tuning.trial_reporter("validation_accuracy", str(tmp_path / "run"), STEPS_PER_EPOCH)
  for step in (5, 10, 15, 16, 20):
    assert reporter.report(step, _validation(step))
  assert not reporter.report(16, _validation(99))  # The final metrics, at the last epoch's end.
  lines = _lines(trial)
  assert [step for step, _ in lines] == [5, 10, 15, 16, 20]
  assert all(float(report["validation_accuracy"]) == _validation(step)["accuracy"]
             and report["trial"] == "3" for step, report in lines)


def test_the_reconstruction_mse_is_reported_when_it_is_the_metric(trial, tmp_path):
  reporter = tuning.trial_reporter("validation_reconstruction_mse", str(tmp_path / "run"),
                                   STEPS_PER_EPOCH)
  reporter.report(16, _validation(16))
  ((step, report),) = _lines(trial)
  assert step == 16 and float(report["validation_reconstruction_mse"]) == 1 / 16
  assert "validation_accuracy" not in report


def test_a_resumed_trial_reports_its_earlier_evaluations_first_and_each_step_once(trial):
  """As a process killed at step 27 and resumed from its checkpoint at step 21: its second
  process's HyperTune object rewrites the file, with every evaluation of the first 21 steps
  (history.json's epoch, the record's others), then the new ones; the record's evaluation at
  step 25, after the checkpoint, is trained and reported again, once. The record is written
  through tf.io.gfile (ram:// is reached by nothing else) after the lease check."""
  model_dir = "ram://tuning-run"
  lease_checks = []
  first = tuning.trial_reporter("validation_accuracy", model_dir, STEPS_PER_EPOCH)
  for step in (5, 10, 15, 16, 20, 25):
    first.report(step, _validation(step))
  history = [{"epoch": 1, "validation": _validation(16)}]

  second = tuning.trial_reporter("validation_accuracy", model_dir, STEPS_PER_EPOCH,
                                 before_write=lambda: lease_checks.append(True))
  assert second.resume(history, trained_steps=21) == 5
  assert [step for step, _ in _lines(trial)] == [5, 10, 15, 16, 20]
  for step in (25, 30, 32):
    second.report(step, _validation(step))
  lines = _lines(trial)
  assert [step for step, _ in lines] == [5, 10, 15, 16, 20, 25, 30, 32]
  assert all(float(report["validation_accuracy"]) == _validation(step)["accuracy"]
             for step, report in lines)
  with tf.io.gfile.GFile(f"{model_dir}/{run_directory.TUNING_RECORD}") as f:
    assert [entry["step"] for entry in json.load(f)["evaluations"]] == [5, 10, 15, 20, 25, 30]
  assert len(lease_checks) == 2  # Before each write of the record: 25 and 30.


def test_a_damaged_record_costs_only_its_evaluations_with_a_warning(trial, tmp_path, caplog):
  (tmp_path / "run").mkdir()
  (tmp_path / "run" / run_directory.TUNING_RECORD).write_text('{"evaluations": [{"ste')
  caplog.set_level("WARNING")
  reporter = tuning.trial_reporter("validation_accuracy", str(tmp_path / "run"), STEPS_PER_EPOCH)
  assert reporter.resume([{"epoch": 1, "validation": _validation(16)}], trained_steps=20) == 1
  assert [step for step, _ in _lines(trial)] == [16]
  assert f"{run_directory.TUNING_RECORD} is damaged: not JSON" in caplog.text
  assert "the evaluations between epoch ends before this restart are not reported" in caplog.text


def test_outside_a_tuning_trial_nothing_is_written(tmp_path, monkeypatch):
  monkeypatch.delenv("CLOUD_ML_TRIAL_ID", raising=False)
  # Where cloudml-hypertune would write (by default a file in the system temp folder).
  monkeypatch.setenv("CLOUD_ML_HP_METRIC_FILE", str(tmp_path / "hypertune" / "output.metrics"))
  assert tuning.trial_reporter("validation_accuracy", str(tmp_path / "run"), 16) is None
  assert not list(tmp_path.iterdir())


def test_a_trial_without_cloudml_hypertune_says_so_in_its_log(tmp_path, monkeypatch, caplog):
  monkeypatch.setenv("CLOUD_ML_HP_METRIC_FILE", str(tmp_path / "output.metrics"))
  monkeypatch.setenv("CLOUD_ML_TRIAL_ID", "3")
  monkeypatch.setitem(sys.modules, "hypertune", None)  # As if it were not installed.
  caplog.set_level("WARNING")
  assert tuning.trial_reporter("validation_accuracy", str(tmp_path / "run"), 16) is None
  assert not (tmp_path / "output.metrics").exists()
  assert "tuning trial 3, but cloudml-hypertune is not installed" in caplog.text
