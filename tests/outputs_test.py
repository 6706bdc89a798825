"""Tests of trainer.outputs: what the chief writes under --model_dir, and what it reads back."""

import json

import pytest

from trainer import config, outputs

ENTRY = {"epoch": 1, "train": {"loss": 0.5, "classifier_loss": 0.4, "reconstruction_mse": 0.05,
                               "accuracy": 0.9},
         "validation": {"classifier_loss": 0.3, "reconstruction_mse": 0.04, "accuracy": 0.92},
         "loss_weights": {"classifier": 1.0, "decoder": 0.2}}


def _config(model_dir, **changes):
  return config.TrainConfig(dataset="mnist_sample", model_dir=str(model_dir), **changes)


def test_the_chief_records_epochs_in_history_and_validation_at_the_global_step(tmp_path):
  from tensorboard.backend.event_processing import event_multiplexer
  run = outputs.RunOutputs(_config(tmp_path), chief=True)
  history = run.record_epoch([], ENTRY, epochs=2, global_step=16, images_per_second=100.0)
  history = run.record_epoch(history, {**ENTRY, "epoch": 2}, 2, 32, None)
  # A resumed job records an epoch again: its entry replaces the old one.
  history = run.record_epoch(history, {**ENTRY, "epoch": 2}, 2, 32, None)
  written = json.loads((tmp_path / "history.json").read_text())["epochs"]
  assert [entry["epoch"] for entry in written] == [1, 2] and written == history
  assert run.read_history(epochs_done=1) == history[:1]
  logs = event_multiplexer.EventMultiplexer().AddRunsFromDirectory(str(tmp_path / "logs"))
  logs.Reload()
  assert set(logs.Runs()) == {"validation"}  # The controller writes the train run.
  assert [event.step for event in logs.Tensors("validation", "accuracy")] == [16, 32, 32]
  assert run.train_logs == str(tmp_path / "logs" / "train")


def test_other_workers_write_nothing_under_model_dir(tmp_path):
  run = outputs.RunOutputs(_config(tmp_path / "shared"), chief=False)
  run.record_epoch([], ENTRY, 1, 16, 10.0)
  run.write_metrics({"test_accuracy": 1.0})
  assert not (tmp_path / "shared").exists() and run.train_logs is None
  assert not run.checkpoints.startswith(str(tmp_path))


def test_finished_means_metrics_of_the_checkpoints_epochs(tmp_path):
  run = outputs.RunOutputs(_config(tmp_path), chief=True)
  assert run.finished_metrics(epochs=2, epochs_done=2, checkpoint="ckpt-32") is None  # No file.
  run.write_metrics({"epochs": 1, "test_accuracy": 0.9})
  # A shorter run's metrics do not finish a longer one.
  assert run.finished_metrics(epochs=2, epochs_done=2, checkpoint="ckpt-32") is None
  run.write_metrics({"epochs": 2, "test_accuracy": 0.95})
  assert run.finished_metrics(2, 2, "ckpt-32") == {"epochs": 2, "test_accuracy": 0.95}
  assert run.finished_metrics(3, 2, "ckpt-32") is None  # A larger --epochs extends it.
  with pytest.raises(config.UserInputError, match=r"--epochs=1 is fewer than the 2 epochs"):
    run.finished_metrics(1, 2, "ckpt-32")
  (tmp_path / "metrics.json").write_text("{not json")
  with pytest.raises(config.UserInputError, match="is not a job's metrics"):
    run.finished_metrics(2, 2, "ckpt-32")


def test_the_closing_line_names_the_report_only_where_there_is_one(tmp_path):
  metrics = {"test_accuracy": 0.98, "test_reconstruction_mse": 0.0107}
  line = outputs.results_line(metrics, str(tmp_path))
  assert line == (f"test accuracy 0.9800, reconstruction_mse 0.0107; metrics "
                  f"{tmp_path}/metrics.json, export {tmp_path}/export")
  (tmp_path / "report").mkdir()
  (tmp_path / "report" / "report.md").write_text("# report")
  assert outputs.results_line(metrics, str(tmp_path)).endswith(
      f", report {tmp_path}/report/report.md")


def test_an_unwritable_model_dir_is_refused_up_front(tmp_path):
  blocker = tmp_path / "a-file"
  blocker.write_text("in the way")
  with pytest.raises(config.UserInputError, match=f"cannot write to --model_dir={blocker}/run"):
    outputs.RunOutputs(_config(blocker / "run"), chief=True)


def test_the_configuration_is_saved_and_read_back(tmp_path):
  run = outputs.RunOutputs(_config(tmp_path, loss_weights={"classifier": 1.0, "decoder": 0.5}),
                           chief=True)
  assert run.read_config() is None
  saved = _config(tmp_path, loss_weights={"classifier": 1.0, "decoder": 0.5})
  run.write_config(saved)
  assert config.resume_changes(run.read_config(), saved) == []
  (tmp_path / "config.json").write_text("[1, 2]")
  with pytest.raises(config.UserInputError, match="is not a run's configuration .* delete it to "
                                                  "adopt this command's flags"):
    run.read_config()


def test_tensorboard_logs_go_where_the_configuration_says(tmp_path):
  run = outputs.RunOutputs(_config(tmp_path / "run", tensorboard_dir=str(tmp_path / "tb")),
                           chief=True)
  run.record_epoch([], ENTRY, 1, 16, 10.0)
  assert sorted(p.name for p in (tmp_path / "tb").iterdir()) == ["validation"]
  assert run.train_logs == str(tmp_path / "tb" / "train")
  assert not (tmp_path / "run" / "logs").exists()
