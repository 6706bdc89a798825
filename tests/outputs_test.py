"""Tests of trainer.job.outputs: what the chief writes under --model_dir, and what it reads back."""

import dataclasses
import json

import pytest

from trainer import config, errors
from trainer.job import outputs, train

ENTRY = {"epoch": 1, "train": {"loss": 0.5, "classifier_loss": 0.4, "reconstruction_mse": 0.05,
                               "accuracy": 0.9},
         "validation": {"classifier_loss": 0.3, "reconstruction_mse": 0.04, "accuracy": 0.92},
         "loss_weights": {"classifier": 1.0, "decoder": 0.2}}


HEADLINE = ("accuracy", "reconstruction_mse")  # The test metrics a finished run must hold.


def _config(model_dir, **changes):
  return config.TrainConfig(dataset="mnist_sample", model_dir=str(model_dir), **changes)


def _paths(model_dir, **changes):
  return train.run_directory_of(_config(model_dir, **changes))


def test_the_chief_records_epochs_in_history_and_validation_at_the_global_step(tmp_path):
  from tensorboard.backend.event_processing import event_multiplexer
  run = outputs.RunOutputs(_paths(tmp_path), chief=True)
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
  # The controller's train run goes through the same writers, beside it.
  run.summaries_of("train")([(5, {"loss": 1.5}), (10, {"loss": 0.5})])
  logs = event_multiplexer.EventMultiplexer().AddRunsFromDirectory(str(tmp_path / "logs"))
  logs.Reload()
  assert [event.step for event in logs.Tensors("train", "loss")] == [5, 10]


def test_other_workers_write_nothing_under_model_dir(tmp_path):
  run = outputs.RunOutputs(_paths(tmp_path / "shared"), chief=False)
  run.record_epoch([], ENTRY, 1, 16, 10.0)
  run.write_metrics({"test_accuracy": 1.0})
  assert not (tmp_path / "shared").exists() and run.summaries_of("train") is None
  assert not run.checkpoints.startswith(str(tmp_path))


def test_finished_means_metrics_of_these_epochs_whatever_the_checkpoints(tmp_path):
  run = outputs.RunOutputs(_paths(tmp_path), chief=True)
  assert run.finished_metrics(epochs=2, headline=HEADLINE) is None  # No file.
  done = {"epochs": 1, "test_accuracy": 0.9, "test_reconstruction_mse": 0.01}
  run.write_metrics(done)
  assert run.finished_metrics(epochs=2, headline=HEADLINE) is None  # A shorter run's do not finish a longer one.
  run.write_metrics({**done, "epochs": 2})
  assert run.finished_metrics(2, HEADLINE) == {**done, "epochs": 2}
  assert run.finished_metrics(3, HEADLINE) is None  # A larger --epochs extends it.
  assert run.finished_metrics(1, HEADLINE) == {**done, "epochs": 2}  # A smaller one finds it finished.


@pytest.mark.parametrize("content, problem", [
    ("{not json", "not JSON"), ("[]", "not a JSON object"),
    ('{"epochs": 2}', "no test_accuracy number"),
    ('{"epochs": "2", "test_accuracy": 0.9, "test_reconstruction_mse": 0.01}',
     "no epochs number"),
    ('{"epochs": 2, "test_accuracy": null, "test_reconstruction_mse": 0.01}',
     "no test_accuracy number")])
def test_damaged_metrics_are_one_line_naming_the_file_and_the_fix(tmp_path, content, problem):
  run = outputs.RunOutputs(_paths(tmp_path), chief=True)
  (tmp_path / "metrics.json").write_text(content)
  with pytest.raises(errors.UserInputError) as raised:
    run.finished_metrics(2, HEADLINE)
  message = str(raised.value)
  assert message.startswith(f"{tmp_path}/metrics.json is damaged: {problem}") and "\n" not in message
  assert message.endswith("delete it and run the same command again to evaluate and export the "
                          "trained model")


@pytest.mark.parametrize("content, problem", [
    ("{not json", "not JSON"), ("[]", "not a JSON object"),
    ('{"epochs": {"epoch": 1}}', "are not a list of epoch records"),
    ('{"epochs": [{"epoch": "1"}]}', "are not a list of epoch records"),
    ('{"epochs": [{"epoch": 1, "train": {"loss": "x"}, "validation": {}, "loss_weights": {}}]}',
     "are not a list of epoch records")])
def test_a_damaged_history_is_one_line_naming_the_file_and_the_fix(tmp_path, content, problem):
  run = outputs.RunOutputs(_paths(tmp_path), chief=True)
  (tmp_path / "history.json").write_text(content)
  with pytest.raises(errors.UserInputError, match=f"history.json is damaged: .*{problem}.*; delete "
                                                  "it"):
    run.read_history(1)


def test_the_closing_line_names_the_report_only_where_there_is_one(tmp_path):
  metrics = {"test_accuracy": 0.98, "test_reconstruction_mse": 0.0107}
  run = outputs.RunOutputs(_paths(tmp_path), chief=True)
  line = run.results_line(metrics, HEADLINE)
  assert line == (f"test accuracy 0.9800, reconstruction_mse 0.0107; metrics "
                  f"{tmp_path}/metrics.json, export {tmp_path}/export")
  (tmp_path / "report").mkdir()
  (tmp_path / "report" / "report.md").write_text("# report")
  assert run.results_line(metrics, HEADLINE).endswith(
      f", report {tmp_path}/report/report.md")


def test_an_unwritable_model_dir_is_refused_up_front(tmp_path):
  blocker = tmp_path / "a-file"
  blocker.write_text("in the way")
  with pytest.raises(errors.UserInputError, match=f"cannot write to --model_dir={blocker}/run"):
    outputs.RunOutputs(_paths(blocker / "run"), chief=True)


def test_the_configuration_is_saved_and_read_back(tmp_path):
  run = outputs.RunOutputs(_paths(tmp_path, loss_weights={"classifier": 1.0, "decoder": 0.5}),
                           chief=True)
  assert run.read_config() is None
  saved = _config(tmp_path, loss_weights={"classifier": 1.0, "decoder": 0.5})
  run.write_config(dataclasses.asdict(saved), "mixed_bfloat16")
  assert config.resume_changes(run.read_config(), saved) == []
  assert outputs.saved_precision(run.read_config()) == "mixed_bfloat16"  # Beside `auto`.
  assert outputs.saved_precision({"precision": "auto"}) is None  # Written before it was kept.
  for content, problem in (("[1, 2]", "not a JSON object"), ("{x", "not JSON (Expecting property name enclosed in double quotes: line 1 "
                                  "column 2 (char 1))"),
                           ('{"epochs": "2"}', 'epochs is "2", not an integer'),
                           ('{"epochs": null}', "epochs is null, not an integer"),
                           ('{"batch_size": 64.0}', "batch_size is 64.0, not an integer"),
                           ('{"deterministic": 1}', "deterministic is 1, not true or false"),
                           ('{"learning_rate": true}', "learning_rate is true, not a number"),
                           ('{"loss_weights": {"decoder": "8"}}',
                            'loss_weights is {"decoder": "8"}, not NAME: WEIGHT pairs')):
    (tmp_path / "config.json").write_text(content)
    with pytest.raises(errors.UserInputError) as raised:
      run.read_config()
    assert str(raised.value) == (f"{tmp_path}/config.json is damaged: {problem}; restore it, or "
                                 "delete it to adopt this command's flags")
  (tmp_path / "config.json").write_text('{"learning_rate": 1, "epochs": 3}')  # JSON's numbers.
  assert run.read_config() == {"learning_rate": 1, "epochs": 3}


def test_tensorboard_logs_go_where_the_configuration_says(tmp_path):
  run = outputs.RunOutputs(_paths(tmp_path / "run", tensorboard_dir=str(tmp_path / "tb")),
                           chief=True)
  run.record_epoch([], ENTRY, 1, 16, 10.0)
  run.summaries_of("train")([(16, {"loss": 0.5})])
  assert sorted(p.name for p in (tmp_path / "tb").iterdir()) == ["train", "validation"]
  assert not (tmp_path / "run" / "logs").exists()


