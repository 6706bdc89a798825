"""Tests of trainer.tuning: reports reach cloudml-hypertune's file, or nothing happens."""

import json
import sys

from trainer import tuning


def test_reports_the_metric_to_the_file_vertex_ai_reads(tmp_path, monkeypatch):
  metrics_file = tmp_path / "output.metrics"
  monkeypatch.setenv("CLOUD_ML_HP_METRIC_FILE", str(metrics_file))
  assert tuning.report(0.93, global_step=120)
  (line,) = metrics_file.read_text().splitlines()
  reported = json.loads(line)
  assert float(reported["validation_accuracy"]) == 0.93 and int(reported["global_step"]) == 120


def test_without_cloudml_hypertune_nothing_is_reported(tmp_path, monkeypatch):
  monkeypatch.setenv("CLOUD_ML_HP_METRIC_FILE", str(tmp_path / "output.metrics"))
  monkeypatch.setitem(sys.modules, "hypertune", None)  # As if it were not installed.
  assert not tuning.report(0.93, global_step=120)
  assert not (tmp_path / "output.metrics").exists()
