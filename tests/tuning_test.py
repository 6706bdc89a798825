"""Tests of trainer.tuning: inside a tuning trial reports reach cloudml-hypertune's file;
elsewhere, or without the library, nothing happens."""

import json
import sys

from trainer import tuning


def test_reports_the_metric_to_the_file_vertex_ai_reads(tmp_path, monkeypatch):
  metrics_file = tmp_path / "output.metrics"
  monkeypatch.setenv("CLOUD_ML_HP_METRIC_FILE", str(metrics_file))
  monkeypatch.setenv("CLOUD_ML_TRIAL_ID", "3")
  assert tuning.report(0.93, global_step=120)
  (line,) = metrics_file.read_text().splitlines()
  reported = json.loads(line)
  assert float(reported["validation_accuracy"]) == 0.93 and int(reported["global_step"]) == 120


def test_outside_a_tuning_trial_nothing_is_written(tmp_path, monkeypatch):
  monkeypatch.delenv("CLOUD_ML_TRIAL_ID", raising=False)
  # Where cloudml-hypertune would write (by default a file in the system temp folder).
  monkeypatch.setenv("CLOUD_ML_HP_METRIC_FILE", str(tmp_path / "hypertune" / "output.metrics"))
  assert not tuning.report(0.93, global_step=120)
  assert not list(tmp_path.iterdir())


def test_a_trial_without_cloudml_hypertune_says_so_in_its_log(tmp_path, monkeypatch, caplog):
  monkeypatch.setenv("CLOUD_ML_HP_METRIC_FILE", str(tmp_path / "output.metrics"))
  monkeypatch.setenv("CLOUD_ML_TRIAL_ID", "3")
  monkeypatch.setitem(sys.modules, "hypertune", None)  # As if it were not installed.
  caplog.set_level("WARNING")
  assert not tuning.report(0.93, global_step=120)
  assert not (tmp_path / "output.metrics").exists()
  assert "tuning trial 3, but cloudml-hypertune is not installed" in caplog.text
