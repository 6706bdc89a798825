"""Tests of trainer.job.train: the multitask task wired to the controller and the run directory.

The loop itself (alignment of calls, resume from any step, preemption, divergence) is tested
with a stand-in task in tests/controller_test.py; these prove the wiring, on the narrow model.
Restarts of one trained run share it (the session's `finished_run`): each test copies it.
"""

import functools
import io
import json
import os
import pathlib
import re
import shutil
import signal
import time

import numpy as np
import pytest
import keras
import tensorflow as tf
from absl import logging

from tests import helpers, stand_in_task
from trainer import config, errors
from trainer.job import controller, preemption, run_directory, train
from trainer.job import lease as lease_lib
from trainer.multitask import CLASSIFIER, DECODER, losses, problem


_FROM_DATASET = "the splits --dataset names"


def _run(settings, strategy=None, splits=None, **kwargs):
  """train.run after the process-wide settings, as the entry point makes them; on the
  learnable splits unless `splits` is given (_FROM_DATASET: those the configuration names)."""
  strategy = strategy or tf.distribute.get_strategy()
  train.configure_process(settings, strategy)
  splits = None if splits is _FROM_DATASET else splits or helpers.learnable_splits()
  return train.run(settings, strategy, _tasks(splits), **kwargs)


def _fit(settings, strategy=None, splits=None):
  """`_run` less `train.finalize`'s export and metrics.json (seconds of a narrow run): trains as
  the job does (checkpoints, history.json, the epochs' log lines), then evaluates. Returns the
  metrics the task computes, as metrics.json names them (test_, validation_, NAME_final), and
  the precision the job resolved: for tests of what the task learns and checkpoints."""
  strategy = strategy or tf.distribute.get_strategy()
  train.configure_process(settings, strategy)
  job = train.prepare(settings, strategy, _tasks(splits or helpers.learnable_splits()))
  try:
    validation = train.fit(job) or job.task.evaluate("validation")
    return {**{f"test_{name}": value for name, value in job.task.evaluate("test").items()},
            **{f"validation_{name}": value for name, value in validation.items()},
            **{f"{name}_final": value for name, value in job.task.epoch_state().items()},
            "precision": job.precision.policy, "precision_reason": job.precision.reason}
  finally:
    job.close()


def _tasks(splits=None):
  """The multitask task's factory, on `splits` (None: those the configuration names)."""
  return functools.partial(problem.make_task, splits=splits)


def _config(model_dir, **changes):
  # The splits are passed in; the dataset name is only recorded. No report unless it is under
  # test: drawing it takes a second or two (tests/report_test.py tests it). A narrow model at a
  # high rate, without warm-up: 32 steps learn the learnable splits.
  settings = dict(dataset="npz:injected-by-the-test", model_dir=str(model_dir), epochs=2,
                  batch_size=32, steps_per_loop=5, latent_dim=16, width=8, learning_rate=1e-2,
                  warmup_steps=0, report=False)
  settings.update(changes)
  return config.TrainConfig(**settings)


def _copy(finished_run, tmp_path):
  """A copy of the session's finished two-epoch run (tests/conftest.py), 16 steps an epoch."""
  shutil.copytree(finished_run[0], tmp_path / "run")
  return tmp_path / "run"


def _rerun(run, finished_run, **changes):
  """Runs the job again on `run`, a copy of `finished_run`, with its own data and `changes`."""
  return _run(_config(run, dataset=finished_run[1], **changes), splits=_FROM_DATASET)


def _logged(caplog):
  logging.set_verbosity(logging.INFO)
  caplog.set_level("INFO")


# The job with the stand-in task (tests/stand_in_task.py): the job's own behaviour, apart from
# the multitask problem.


def _stand_in_run(model_dir, on_evaluation=None, **changes):
  settings = stand_in_task.config(str(model_dir), **changes)
  train.configure_process(settings, tf.distribute.get_strategy())
  return train.run(settings, tf.distribute.get_strategy(), stand_in_task.factory(),
                   on_evaluation=on_evaluation)


def _stand_in_files(model_dir):
  return {name: json.loads((model_dir / name).read_text())
          for name in (run_directory.HISTORY, run_directory.METRICS)}


def test_the_job_trains_a_stand_in_task_stopped_and_resumed_as_uninterrupted(tmp_path, caplog):
  uninterrupted = _stand_in_run(tmp_path / "a")
  assert uninterrupted["test_distance"] < 0.5  # It learned: from about 2 at zero weights.
  assert {"test_largest_miss", "validation_distance", "stand_in", "first_weight_final"} <= set(
      uninterrupted)
  history = json.loads((tmp_path / "a" / run_directory.HISTORY).read_text())["epochs"]
  assert [sorted(entry) for entry in history] == [
      ["epoch", "first_weight", "train", "validation"]] * 3
  assert json.loads((tmp_path / "a" / run_directory.EXPORT / stand_in_task.EXPORT_FILE)
                    .read_text()) == pytest.approx(stand_in_task.TRUE_WEIGHTS, abs=0.3)
  assert (tmp_path / "a" / run_directory.REPORT / "stand_in.txt").exists()

  def interrupt_at_step_8(step, evaluate):  # Ctrl-C, as a user presses it: the next call ends
    if step == 8:                             # at step 10, mid epoch 2, and saves there.
      os.kill(os.getpid(), signal.SIGINT)
  with pytest.raises(preemption.Preempted, match="ckpt-10 saved at epoch 2, step 4"):
    _stand_in_run(tmp_path / "b", on_evaluation=interrupt_at_step_8, eval_every_steps=4)
  _logged(caplog)
  resumed = _stand_in_run(tmp_path / "b", eval_every_steps=4)
  assert "Resuming from " in caplog.text and "ckpt-10: epoch 2 of 3, step 4 of 6" in caplog.text
  assert helpers.without_timing(resumed) == helpers.without_timing(uninterrupted)
  written = {run: _stand_in_files(tmp_path / run) for run in "ab"}
  assert written["b"][run_directory.HISTORY] == written["a"][run_directory.HISTORY]
  assert helpers.without_timing(written["b"][run_directory.METRICS]) == helpers.without_timing(
      written["a"][run_directory.METRICS])


def test_a_sigterm_lost_in_the_tasks_export_still_stops_the_job_before_metrics_json(
    tmp_path, monkeypatch):
  export = stand_in_task.StandInTask.export

  def export_losing_a_sigterm(self, path):
    helpers.signal_swallowed(signal.SIGTERM)
    export(self, path)

  monkeypatch.setattr(stand_in_task.StandInTask, "export", export_losing_a_sigterm)
  with pytest.raises(preemption.Stopped, match="^SIGTERM while evaluating and exporting: "):
    _stand_in_run(tmp_path)
  assert not (tmp_path / run_directory.METRICS).exists()
  monkeypatch.setattr(stand_in_task.StandInTask, "export", export)
  assert _stand_in_run(tmp_path)["test_distance"] < 0.5  # The same command finishes it.


def test_a_sigterm_inside_the_tasks_export_lets_it_finish_and_stops_before_metrics_json(
    tmp_path, monkeypatch):
  export = stand_in_task.StandInTask.export
  finished = []

  def export_receiving_a_sigterm(self, path):  # Not the job's code: the stop waits for the job's.
    os.kill(os.getpid(), signal.SIGTERM)
    export(self, path)
    finished.append(path)

  monkeypatch.setattr(stand_in_task.StandInTask, "export", export_receiving_a_sigterm)
  with pytest.raises(preemption.Stopped, match="^SIGTERM while evaluating and exporting: "):
    _stand_in_run(tmp_path)
  assert finished and (tmp_path / run_directory.EXPORT / stand_in_task.EXPORT_FILE).exists()
  assert not (tmp_path / run_directory.METRICS).exists()


@pytest.mark.slow  # Three job processes, forked from one that has imported TensorFlow: 3 s.
def test_the_job_killed_with_sigkill_resumes_its_stand_in_task_exactly(tmp_path):
  uninterrupted = helpers.run_command_forked("tests.stand_in_task", str(tmp_path / "a"),
                                             timeout=300)
  assert uninterrupted.returncode == 0, uninterrupted.stderr[-3000:]
  killed = helpers.start_command_forked(tmp_path / "killed.log", "tests.stand_in_task",
                                        str(tmp_path / "b"), "0.1")
  deadline = time.monotonic() + 300
  while not list((tmp_path / "b" / run_directory.CHECKPOINTS).glob("ckpt-8.index")):
    assert killed.poll() is None and time.monotonic() < deadline, "no ckpt-8 while it ran"
    time.sleep(0.05)
  killed.kill()  # SIGKILL: nothing of the job's own runs.
  assert killed.wait(timeout=60) == -signal.SIGKILL
  assert not (tmp_path / "b" / run_directory.METRICS).exists()
  resumed = helpers.run_command_forked("tests.stand_in_task", str(tmp_path / "b"), timeout=300)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert re.search(r"Resuming from \S+ckpt-(8|1[02]): epoch 2 of 3", resumed.stderr), (
      resumed.stderr[-3000:])
  for name in (run_directory.HISTORY, run_directory.METRICS):
    a, b = (json.loads((tmp_path / run / name).read_text()) for run in "ab")
    assert helpers.without_timing(a) == helpers.without_timing(b), name


def test_trains_and_writes_every_output(finished_run):
  from tensorboard.backend.event_processing import event_multiplexer
  run = pathlib.Path(finished_run[0])
  metrics = helpers.read_metrics(str(run))
  assert metrics["test_accuracy"] > 0.9 and metrics["test_reconstruction_mse"] < 0.1
  assert metrics["strategy"] == "default" and metrics["num_replicas"] == 1
  # Numbered by global step: 512 // 32 steps an epoch.
  assert tf.train.latest_checkpoint(str(run / "checkpoints")).endswith("ckpt-32")
  assert (run / "export" / "saved_model.pb").exists() and (run / "report" / "report.md").exists()
  assert json.loads((run / "config.json").read_text())["width"] == 8
  assert [e["epoch"] for e in json.loads((run / "history.json").read_text())["epochs"]] == [
      1, 2]
  # TensorBoard: training scalars at every call's global step, validation at each epoch's
  # end, both runs under the same tags so that they share a chart.
  logs = event_multiplexer.EventMultiplexer().AddRunsFromDirectory(str(run / "logs"))
  logs.Reload()
  assert set(logs.Runs()) == {"train", "validation", "report"}
  scalars = {name: set(tags["tensors"]) for name, tags in logs.Runs().items()}
  metric_tags = {"accuracy", "classifier_loss", "reconstruction_mse"}
  assert metric_tags <= scalars["train"] and metric_tags == scalars["validation"]
  assert {"loss", "learning_rate", "steps_per_second", "loss_weight/decoder"} <= scalars["train"]
  assert [event.step for event in logs.Tensors("train", "loss")] == [5, 10, 15, 16, 21, 26, 31,
                                                                     32]
  assert [event.step for event in logs.Tensors("validation", "accuracy")] == [16, 32]


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["float32", "mixed_bfloat16"])
def test_resuming_mid_epoch_gives_the_uninterrupted_result(tmp_path, caplog, precision):
  # Semi-supervised with denoising: every stream of the pipeline (order, labelled slots, shifts,
  # noise, strong views) must resume exactly; supervised resume is its subset.
  settings = dict(epochs=2, checkpoint_every_steps=3, deterministic=True, shift_pixels=1,
                  labeled_examples=40, input_noise=0.2, unlabeled_loss="pseudo_label",
                  pseudo_label_threshold=0.5, precision=precision)
  splits = helpers.learnable_splits(train=256)  # 8 steps an epoch.
  uninterrupted = _fit(_config(tmp_path / "a", **settings), splits=splits)
  checkpoints = tmp_path / "a" / "checkpoints"
  # Saved at global steps ..., 12, 15 and 16 (the end); go back to 12: epoch 2, step 4 of 8,
  # as if the job had been killed there.
  assert tf.train.get_checkpoint_state(str(checkpoints)).all_model_checkpoint_paths[0].endswith(
      "ckpt-12")
  for later in ("ckpt-15", "ckpt-16"):
    for path in checkpoints.glob(later + ".*"):
      path.unlink()
  _logged(caplog)
  history = (tmp_path / "a" / "history.json").read_text()
  resumed = _fit(_config(tmp_path / "a", **settings), splits=splits)
  assert "ckpt-12: epoch 2 of 2, step 4 of 8" in caplog.text
  assert resumed == uninterrupted
  # The resumed epoch's train metrics are the whole epoch's, steps before the resume included.
  assert (tmp_path / "a" / "history.json").read_text() == history


def test_a_finished_job_run_again_rewrites_nothing_and_says_where_its_results_are(
    finished_run, tmp_path, caplog):
  run = _copy(finished_run, tmp_path)
  before = helpers.directory_state(run)
  _logged(caplog)
  assert _rerun(run, finished_run) == helpers.read_metrics(str(run))
  assert helpers.directory_state(run) == before
  assert "already trained its 2 epochs; its results: test accuracy" in caplog.text
  assert str(run / "metrics.json") in caplog.text


@pytest.mark.slow  # The job's part, on the stand-in task, in the fast tier: the next test.
def test_a_larger_epochs_extends_the_job_and_a_lower_rate_is_logged_and_kept(
    finished_run, tmp_path, caplog):
  run = _copy(finished_run, tmp_path)
  _logged(caplog)
  metrics = _rerun(run, finished_run, epochs=3, learning_rate=1e-3)
  assert "Resuming from" in caplog.text and "epoch 3 of 3, step 0 of 16" in caplog.text
  # The old schedule had decayed to 0 at step 32; stretched over 48 steps, a quarter of the
  # new peak (cos(pi * 2/3) = -1/2).
  assert ("Extending this run from 2 to 3 epochs (32 to 48 steps): the learning rate's cosine "
          "schedule is stretched over the new total, so at step 32 it is 0.00025 instead of 0 "
          "(peak 0.001).") in caplog.text
  assert "Changed since this run was last started: --learning_rate: 0.01 -> 0.001" in caplog.text
  assert json.loads((run / "config.json").read_text())["learning_rate"] == 1e-3
  assert metrics["epochs"] == 3 and helpers.read_metrics(str(run))["epochs"] == 3
  history = json.loads((run / "history.json").read_text())["epochs"]
  assert [entry["epoch"] for entry in history] == [1, 2, 3]  # The curves cover the whole run.
  reader = tf.train.load_checkpoint(tf.train.latest_checkpoint(str(run / "checkpoints")))
  assert reader.get_tensor("global_step/.ATTRIBUTES/VARIABLE_VALUE") == 3 * 16
  assert reader.get_tensor("optimizer/_iterations/.ATTRIBUTES/VARIABLE_VALUE") == 3 * 16
  # Fewer epochs than a finished job trained: finished, where its results are; nothing written.
  before = helpers.directory_state(run)
  _logged(caplog)
  assert _rerun(run, finished_run, epochs=2) == helpers.read_metrics(str(run))
  assert "This job has already trained 3 epochs (more than --epochs=2); its results:" in (
      caplog.text)
  assert helpers.directory_state(run) == before
  (run / "metrics.json").unlink()  # Not finished: fewer epochs than its checkpoint are refused.
  with pytest.raises(errors.UserInputError, match=r"--epochs=2 is fewer than the 3 epochs"):
    _rerun(run, finished_run, epochs=2)


@pytest.mark.parametrize("changes, message", [
    ({"epochs": 3, "batch_size": 64, "seed": 3, "shift_pixels": 0},
     r"^this run was trained with --batch_size=32 --seed=0 --shift_pixels=1, not "
     r"--batch_size=64 --seed=3 --shift_pixels=0; "),
    ({"loss_weighting": "uncertainty"},
     "trained with --loss_weighting=fixed, not --loss_weighting=uncertainty; "),
    ({"epochs": 3, "latent_dim": 32}, "trained with --latent_dim=16, not "),
])
def test_a_restart_that_changes_what_the_run_computes_is_refused_untouched(
    finished_run, tmp_path, changes, message):
  run = _copy(finished_run, tmp_path)
  before = helpers.directory_state(run)
  with pytest.raises(errors.UserInputError, match=message):
    _rerun(run, finished_run, **changes)
  assert helpers.directory_state(run) == before


def test_without_its_config_json_a_checkpoint_of_another_shape_refuses_itself(finished_run,
                                                                             tmp_path):
  run = _copy(finished_run, tmp_path)
  (run / "config.json").unlink()  # Deleted by hand: the command's flags are adopted.
  before = helpers.directory_state(run)
  with pytest.raises(errors.UserInputError, match="holds another model.*--latent_dim"):
    _rerun(run, finished_run, epochs=3, latent_dim=32)
  assert helpers.directory_state(run) == before


def test_a_larger_epochs_extends_the_stand_in_job_and_fewer_are_finished_or_refused(
    tmp_path, caplog):
  # The job's behaviour, on the stand-in task (6 steps an epoch); the multitask task's
  # stretched schedule and optimizer are the test above's.
  run = tmp_path / "run"
  _stand_in_run(run, epochs=2)
  _logged(caplog)
  metrics = _stand_in_run(run, epochs=3, learning_rate=1e-4)
  assert "Resuming from" in caplog.text and "epoch 3 of 3, step 0 of 6" in caplog.text
  assert "Extending this run from 2 to 3 epochs (12 to 18 steps)" in caplog.text
  assert "Changed since this run was last started: --learning_rate: " in caplog.text
  assert json.loads((run / "config.json").read_text())["learning_rate"] == 1e-4
  assert metrics["epochs"] == 3 and helpers.read_metrics(str(run))["epochs"] == 3
  history = json.loads((run / "history.json").read_text())["epochs"]
  assert [entry["epoch"] for entry in history] == [1, 2, 3]  # The curves cover the whole run.
  reader = tf.train.load_checkpoint(tf.train.latest_checkpoint(str(run / "checkpoints")))
  assert reader.get_tensor("global_step/.ATTRIBUTES/VARIABLE_VALUE") == 3 * 6
  # Fewer epochs than a finished job trained: finished, where its results are; nothing written.
  before = helpers.directory_state(run)
  _logged(caplog)
  assert _stand_in_run(run, epochs=2, learning_rate=1e-4) == helpers.read_metrics(str(run))
  assert "This job has already trained 3 epochs (more than --epochs=2); its results:" in (
      caplog.text)
  assert helpers.directory_state(run) == before
  (run / "metrics.json").unlink()  # Not finished: fewer epochs than its checkpoint are refused.
  with pytest.raises(errors.UserInputError, match=r"--epochs=2 is fewer than the 3 epochs"):
    _stand_in_run(run, epochs=2, learning_rate=1e-4)


def test_a_job_stopped_after_its_last_checkpoint_completes_its_export(tmp_path, caplog):
  # The job's behaviour, on the stand-in task.
  run = tmp_path / "run"
  metrics = _stand_in_run(run)
  # As if killed between the last checkpoint and metrics.json: no metrics, half an export.
  (run / run_directory.METRICS).unlink()
  (run / run_directory.EXPORT / stand_in_task.EXPORT_FILE).unlink()
  checkpoints = helpers.directory_state(run / run_directory.CHECKPOINTS)
  completed = _stand_in_run(run)
  assert helpers.without_timing(completed) == helpers.without_timing(metrics)
  assert (run / run_directory.EXPORT / stand_in_task.EXPORT_FILE).exists()
  assert (run / run_directory.METRICS).exists()
  assert helpers.directory_state(run / run_directory.CHECKPOINTS) == checkpoints  # Not trained.
  # Finished, its export deleted since: exported again, from the last checkpoint.
  shutil.rmtree(run / run_directory.EXPORT)
  _logged(caplog)
  again = _stand_in_run(run)
  assert "says this run has finished, but" in caplog.text
  assert helpers.without_timing(again) == helpers.without_timing(metrics)
  exported = json.loads((run / run_directory.EXPORT / stand_in_task.EXPORT_FILE).read_text())
  assert exported[0] == pytest.approx(again["first_weight_final"]["value"])  # The trained one.
  assert helpers.directory_state(run / run_directory.CHECKPOINTS) == checkpoints


@pytest.mark.slow  # 8 s. A deleted export, the job's part, is the stand-in's test above;
# tests/export_test.py tests what counts as a whole export, each damage, in the fast tier.
def test_a_finished_run_whose_export_is_damaged_exports_again_from_its_last_checkpoint(
    finished_run, tmp_path, caplog):
  _logged(caplog)
  run = _copy(finished_run, tmp_path)
  metrics = helpers.read_metrics(str(run))
  keras_file = run / "export" / "model.keras"
  keras_file.write_bytes(keras_file.read_bytes()[:100])
  checkpoints = helpers.directory_state(run / "checkpoints")
  completed = _rerun(run, finished_run, report=False)
  assert "says this run has finished, but" in caplog.text
  assert completed["test_accuracy"] == metrics["test_accuracy"]
  assert keras.models.load_model(run / "export" / "model.keras") is not None
  assert (run / "export" / "saved_model.pb").exists() and (run / "metrics.json").exists()
  assert helpers.directory_state(run / "checkpoints") == checkpoints  # Nothing trained again.


def test_a_job_whose_lease_was_deleted_and_taken_writes_nothing_more(tmp_path):
  # A user (or a cleanup script) deletes lease.json from a live run, and a second job takes
  # the directory: the first must stop before its next write, however soon it would end. The
  # job's behaviour, on the stand-in task (lease_test and controller_test test its parts).
  settings = stand_in_task.config(str(tmp_path / "run"), epochs=1)
  train.configure_process(settings, tf.distribute.get_strategy())
  job = train.prepare(settings, tf.distribute.get_strategy(), stand_in_task.factory())
  try:
    (tmp_path / "run" / run_directory.LEASE).unlink()
    second = lease_lib.Lease.acquire(str(tmp_path / "run"))
    with pytest.raises(lease_lib.LeaseLost, match="another job took over the run directory"):
      train.fit(job)
  finally:
    job.close()
  assert os.listdir(tmp_path / "run") == [run_directory.LEASE]  # The second job's only.
  assert json.loads((tmp_path / "run" / run_directory.LEASE).read_text())["token"] == (
      second.token)
  second.release()


def test_on_a_terminal_calls_are_capped_short_so_that_the_bar_moves_smoothly(tmp_path,
                                                                            monkeypatch):
  # A call of 10 s moved a 15 s epoch's bar in two jumps.
  monkeypatch.setattr(train.progress, "on_terminal", lambda: True)
  settings = _config(tmp_path / "run", steps_per_loop=0)  # Not given: the job picks.
  train.configure_process(settings, tf.distribute.get_strategy())
  job = train.prepare(settings, tf.distribute.get_strategy(), _tasks(helpers.learnable_splits()))
  job.close()
  assert job.controller.schedule.max_call_seconds == train.BAR_CALL_SECONDS == 1.0


@pytest.mark.slow  # The job's stop is tests/controller_test.py's, on its stand-in, in the fast tier.
@pytest.mark.parametrize("precision", ["float32", "mixed_bfloat16"])
def test_a_diverging_job_stops_at_its_step_and_writes_nothing(tmp_path, precision):
  # A step this large takes the weights to about 1e30: the next step's activations overflow and
  # its gradients are not finite, whatever the CPU's kernels do with the NaNs in its loss
  # (bfloat16 has float32's range: it overflows at the same step).
  with pytest.raises(controller.Diverged,
                     match=r"training diverged: non-finite (gradients|weights) at step 2 \(epoch "
                           r"1, step 2\); stopped without saving; the last good checkpoint is "
                           r"none"):
    _run(_config(tmp_path, epochs=1, learning_rate=1e30, precision=precision))
  # Not even an empty directory: the first call diverged, so no scalars either.
  assert os.listdir(tmp_path) == []


class _FiniteLossNonFiniteGradients(losses.FixedWeighting):
  """Adds sqrt(w - w) = 0 to the loss: the loss stays finite, its gradient (inf x 0) does not."""

  def __init__(self, variable):
    super().__init__({CLASSIFIER: 1.0, DECODER: 0.2})
    self._variable = variable

  def total(self, task_losses, num_replicas):
    weight = self._variable[0, 0]
    return super().total(task_losses, num_replicas) + tf.sqrt(weight - weight)


def _task(settings, strategy=None):
  strategy = strategy or tf.distribute.get_strategy()
  splits = helpers.learnable_splits()
  plan = problem.plan_batches(settings, strategy.num_replicas_in_sync, splits.train)
  return problem.MultitaskTask(settings, strategy, splits, plan, settings.precision
                                 if settings.precision != "auto" else "float32")


@pytest.mark.slow
def test_the_task_reports_non_finite_gradients_while_its_loss_is_finite(tmp_path):
  task = _task(_config(tmp_path, epochs=1))
  task.weighting = _FiniteLossNonFiniteGradients(
      task.model.get_layer("encoder").get_layer("latent").kernel)
  loop = controller.make_train_loop(tf.distribute.get_strategy(), task)
  step_outputs, _ = loop(iter(task.train_dataset(0)), tf.constant(1), tf.constant(0.0))
  sums = dict(zip(task.train_outputs, step_outputs.numpy()[0].tolist()))
  assert controller.first_unhealthy(step_outputs.numpy(), task.train_outputs) == 0
  assert np.isfinite(sums["loss"])
  assert controller.divergence(sums) == "non-finite gradients"


@pytest.mark.slow  # 13 s; the fast tier's two replicas are the controller's stand-in's.
def test_the_task_steps_under_two_replicas_as_under_one(tmp_path, two_replicas):
  # The same global batches (unshifted: shifts are keyed by each replica's batch): the global
  # means, synchronised batch normalisation and summed gradients make two replicas' steps
  # those of one, up to rounding.
  settings = _config(tmp_path, shift_pixels=0)
  sums = {}
  for name, strategy in (("one", tf.distribute.get_strategy()), ("two", two_replicas)):
    keras.utils.set_random_seed(0)
    task = _task(settings, strategy)
    loop = controller.make_train_loop(strategy, task)
    step_outputs, _ = loop(iter(task.train_dataset(0)), tf.constant(3), tf.constant(0.0))
    sums[name] = step_outputs.numpy().sum(axis=0)
    assert controller.first_unhealthy(step_outputs.numpy(), task.train_outputs) == -1
  np.testing.assert_allclose(sums["two"], sums["one"], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_semi_supervised_over_two_replicas_learns_from_few_labels(tmp_path, two_replicas):
  metrics = _run(_config(tmp_path, labeled_examples=40, epochs=2, input_noise=0.2,
                         unlabeled_loss="pseudo_label", pseudo_label_threshold=0.8),
                 two_replicas)
  assert metrics["labeled_examples"] == 40 and metrics["train_examples"] == 512
  assert metrics["test_accuracy"] > 0.9  # Four of each class teach these easy classes.
  assert metrics["test_reconstruction_mse"] < 0.1
  assert metrics["num_replicas"] == 2 and metrics["strategy"] == "mirrored"
  assert (tmp_path / "export" / "saved_model.pb").exists()


def test_global_batch_that_does_not_divide_fails_before_training(tmp_path, two_replicas):
  with pytest.raises(errors.UserInputError, match="multiple of the 2 replicas"):
    _run(_config(tmp_path, batch_size=33), two_replicas)
  assert not os.listdir(tmp_path)


@pytest.mark.parametrize("flag", ["checkpoint_dir", "model_dir"])
def test_an_unwritable_directory_fails_before_training(tmp_path, flag):
  blocker = tmp_path / "file"
  blocker.write_text("not a directory")
  settings = ({"checkpoint_dir": str(blocker / "ckpt")} if flag == "checkpoint_dir" else {})
  model_dir = blocker / "run" if flag == "model_dir" else tmp_path / "run"
  with pytest.raises(errors.UserInputError, match=f"cannot write to --{flag}"):
    _run(_config(model_dir, **settings))
  assert blocker.read_text() == "not a directory"


def test_one_replicas_overflow_reaches_every_replica(two_replicas):
  gradients = two_replicas.experimental_distribute_values_from_function(
      lambda context: tf.constant([1.0, float("inf") if context.replica_id_in_sync_group else 2.0]))
  agreed = two_replicas.run(lambda g: problem.agree_on_overflow([g])[0], args=(gradients,))
  for values in two_replicas.experimental_local_results(agreed):
    assert np.isnan(values.numpy()).all()


def test_run_checks_the_process_wide_policy_matches_its_configuration(tmp_path):
  # The policy is float32 here (conftest); the configuration asks for bfloat16.
  with pytest.raises(RuntimeError, match="call train.configure_process"):
    train.run(_config(tmp_path, precision="mixed_bfloat16"), tf.distribute.get_strategy(),
              _tasks(helpers.learnable_splits()))
  assert not os.listdir(tmp_path)


def test_xla_and_determinism_together_are_refused(tmp_path):
  with pytest.raises(errors.UserInputError, match="--jit_compile and --deterministic"):
    _config(tmp_path, jit_compile=True, deterministic=True)


# The slow tier: what the fast tests above leave to the end-to-end runs of other settings.


@pytest.mark.slow  # mixed_float16: on two replicas, below.
@pytest.mark.parametrize("precision", ["mixed_bfloat16"])
def test_mixed_precision_trains(tmp_path, precision):
  metrics = _run(_config(tmp_path, precision=precision, epochs=1),
                 splits=helpers.learnable_splits(train=128))  # 4 steps, then the export.
  assert metrics["precision"] == precision
  assert np.isfinite(metrics["test_reconstruction_mse"])


@pytest.mark.slow
def test_auto_precision_resolved_otherwise_on_restart_resumes_from_the_same_checkpoint(
    tmp_path, caplog, monkeypatch):
  # `auto` is bfloat16 on a CPU with avx512_bf16 and float32 on one without: a run moved
  # between such machines goes on from its checkpoint, and says so.
  from trainer.job import distribution
  monkeypatch.setattr(distribution.platform, "machine", lambda: "x86_64")
  monkeypatch.delenv("TF_ENABLE_ONEDNN_OPTS", raising=False)
  monkeypatch.setattr(distribution, "read_cpu_flags", lambda: ["avx2", "avx512_bf16"])
  # One epoch, trained but not exported by the first start: saved at steps 5, 10, 15 and 16.
  settings = _config(tmp_path, epochs=1, checkpoint_every_steps=5, checkpoints_to_keep=10)
  first = _fit(settings)
  assert first["precision"] == "mixed_bfloat16" and "avx512_bf16" in first["precision_reason"]
  saved = json.loads((tmp_path / "config.json").read_text())
  assert (saved["precision"], saved["resolved"]) == ("auto", {"precision": "mixed_bfloat16"})
  for path in (tmp_path / "checkpoints").glob("ckpt-16.*"):  # Back to step 15.
    path.unlink()
  monkeypatch.setattr(distribution, "read_cpu_flags", lambda: ["avx2"])
  _logged(caplog)
  second = _run(settings)
  assert "ckpt-15: epoch 1 of 1, step 15 of 16" in caplog.text
  assert ("Changed since this run was last started: precision mixed_bfloat16 -> float32 (a CPU "
          "without avx512_bf16 or amx_bf16" in caplog.text)
  assert (second["precision"], second["config"]["precision"]) == ("float32", "auto")
  saved = json.loads((tmp_path / "config.json").read_text())
  assert (saved["precision"], saved["resolved"]) == ("auto", {"precision": "float32"})
  # One step from scratch would leave it near chance (0.1).
  assert second["test_accuracy"] > 0.5  # It went on from the checkpoint's weights.


@pytest.mark.slow
def test_mixed_float16_on_two_replicas_checkpoints_its_loss_scale(tmp_path, two_replicas):
  # Trained, not exported: tests/export_test.py exports a mixed_float16 model.
  settings = _config(tmp_path, precision="mixed_float16", epochs=1)
  metrics = _fit(settings, two_replicas)
  assert metrics["precision"] == "mixed_float16"
  assert np.isfinite(metrics["test_reconstruction_mse"])
  # The loss scale and its growth counter are checkpointed: a GPU resume is exact too.
  reader = tf.train.load_checkpoint(tf.train.latest_checkpoint(str(tmp_path / "checkpoints")))
  scale = reader.get_tensor("loss_scale/scale/.ATTRIBUTES/VARIABLE_VALUE")
  counter = reader.get_tensor("loss_scale/growth_counter/.ATTRIBUTES/VARIABLE_VALUE")
  task = _task(settings, two_replicas)
  schedule = controller.Schedule(16, 16, 5, 100, 32)
  controller.Controller(two_replicas, task, schedule, str(tmp_path / "checkpoints"), 1).restore()
  assert float(task.optimizer.dynamic_scale.numpy()) == scale
  assert int(task.optimizer.step_counter.numpy()) == counter
  assert (scale, counter) != (2.0 ** 15, 0)  # Trained: the scale or its counter moved.


def test_checkpoint_dir_can_live_apart_from_model_dir(tmp_path):
  # The job's behaviour, on the stand-in task: 6 steps an epoch.
  _stand_in_run(tmp_path / "model", epochs=1, checkpoint_dir=str(tmp_path / "ckpt"))
  assert tf.train.latest_checkpoint(str(tmp_path / "ckpt")).endswith("ckpt-6")
  assert not (tmp_path / "model" / "checkpoints").exists()


@pytest.mark.slow
def test_consistency_on_two_replicas_learns_from_few_labels(tmp_path, two_replicas):
  metrics = _fit(_config(tmp_path, labeled_examples=40, epochs=2, unlabeled_loss="consistency"),
                 two_replicas)
  assert metrics["test_accuracy"] > 0.9 and metrics["test_reconstruction_mse"] < 0.1


@pytest.mark.slow
def test_uncertainty_weighting_on_two_replicas_learns_and_logs_the_weights(tmp_path, two_replicas,
                                                                            caplog):
  _logged(caplog)
  metrics = _fit(_config(tmp_path, loss_weighting="uncertainty"), two_replicas)
  learned = metrics["loss_weights_final"]
  # Both start at 1 / c (1 and 0.5); the reconstruction's small loss earns it a larger weight.
  assert learned["decoder"] > 0.51, learned
  assert metrics["test_accuracy"] > 0.9
  assert re.search(r"epoch 2/2: .* loss weights classifier [\d.]+, decoder [\d.]+", caplog.text)
  reader = tf.train.load_checkpoint(tf.train.latest_checkpoint(str(tmp_path / "checkpoints")))
  log_variances = reader.get_tensor("loss_weighting/log_variances/.ATTRIBUTES/VARIABLE_VALUE")
  np.testing.assert_allclose([learned["classifier"], learned["decoder"]],
                             np.exp(-log_variances) / [1.0, 2.0], rtol=1e-6)


def test_a_report_that_cannot_be_drawn_costs_a_warning_not_the_job(tmp_path, caplog):
  # The job's behaviour, on the stand-in task: its report, too, goes where the file is.
  _logged(caplog)
  (tmp_path / "report").write_text("a file where the report's directory goes")
  _stand_in_run(tmp_path, epochs=1, report=True)
  assert "the report could not be drawn (" in caplog.text
  assert (tmp_path / "metrics.json").exists()


def test_evaluation_every_n_steps_reaches_the_hook_with_both_splits(tmp_path):
  # The job's behaviour, on the stand-in task (16 steps an epoch here, calls of 2, and no
  # checkpoint but at the epochs' ends).
  seen = []

  def record(global_step, evaluate):
    seen.append((global_step, evaluate("test")["distance"], evaluate("validation")["distance"]))
    if global_step % 16 == 0:  # An epoch's end: its checkpoint is saved before the hook runs.
      assert tf.train.latest_checkpoint(str(tmp_path / "checkpoints")).endswith(
          f"ckpt-{global_step}")

  settings = stand_in_task.config(str(tmp_path), epochs=2, eval_every_steps=6,
                                  checkpoint_every_steps=1000)
  train.configure_process(settings, tf.distribute.get_strategy())
  metrics = train.run(settings, tf.distribute.get_strategy(),
                      stand_in_task.factory(steps_per_epoch=16), on_evaluation=record)
  # Every 6 steps, and at each epoch's end (16 steps an epoch).
  assert [step for step, _, _ in seen] == [6, 12, 16, 18, 24, 30, 32]
  # What the hook evaluates is the job's model at that step: at each epoch's end, the
  # validation distance history.json records; at the last step, the final test distance.
  history = json.loads((tmp_path / "history.json").read_text())["epochs"]
  validation_at = {step: validation for step, _, validation in seen}
  assert [validation_at[16], validation_at[32]] == [
      entry["validation"]["distance"] for entry in history]
  assert seen[-1][1] == metrics["test_distance"]
  assert len({validation for _, _, validation in seen}) == len(seen)  # The model moved between.


def test_sigterm_at_an_epochs_last_step_keeps_that_epochs_history(tmp_path):
  # The job's behaviour, on the stand-in task: 6 steps an epoch.
  def sigterm_midway(step, evaluate):
    if step == 3:  # Seen by the next call, which ends the epoch at step 6.
      os.kill(os.getpid(), signal.SIGTERM)

  with pytest.raises(preemption.Preempted, match=r"ckpt-6 saved at epoch 2, step 0"):
    _stand_in_run(tmp_path, epochs=2, eval_every_steps=3, steps_per_loop=3,
                  checkpoint_every_steps=1000, on_evaluation=sigterm_midway)
  history = json.loads((tmp_path / "history.json").read_text())["epochs"]
  assert [entry["epoch"] for entry in history] == [1]
  _stand_in_run(tmp_path, epochs=2)
  history = json.loads((tmp_path / "history.json").read_text())["epochs"]
  assert [entry["epoch"] for entry in history] == [1, 2]


@pytest.mark.slow
def test_a_non_finite_weight_stops_training_before_saving(tmp_path):
  settings = _config(tmp_path, epochs=1, eval_every_steps=4)
  train.configure_process(settings, tf.distribute.get_strategy())
  job = train.prepare(settings, tf.distribute.get_strategy(), _tasks(helpers.learnable_splits()))
  kernel = job.task.model.get_layer("encoder").get_layer("latent").kernel

  def break_a_weight(step, evaluate):
    # One bad weight, as a diverging update leaves it: the next call must stop, whatever the
    # CPU's kernels make of it in the loss (the weight stays non-finite after an update).
    if step == 4:
      kernel.assign(tf.tensor_scatter_nd_update(kernel, [[0, 0]], [float("nan")]))

  with pytest.raises(controller.Diverged,
                     match=r"training diverged: non-finite (weights|gradients) at step 5 \(epoch "
                           r"1, step 5\).*none: nothing was saved; lower"):
    try:
      train.fit(job, on_evaluation=break_a_weight)
    finally:
      job.close()
  assert tf.train.latest_checkpoint(str(tmp_path / "checkpoints")) is None
  assert not (tmp_path / "history.json").exists()


def test_metrics_of_a_shorter_run_do_not_make_an_extended_job_finished(tmp_path):
  # The job's behaviour, on the stand-in task.
  run = tmp_path / "run"
  _stand_in_run(run, epochs=2)
  # As if an --epochs=3 run was stopped at its last step: the checkpoint holds 3 epochs, and
  # metrics.json is still the 2-epoch run's.
  extended = _stand_in_run(tmp_path / "longer", epochs=3)
  for name in ("checkpoints", "history.json"):
    shutil.rmtree(run / name) if name == "checkpoints" else os.remove(run / name)
    os.rename(tmp_path / "longer" / name, run / name)
  metrics = _stand_in_run(run, epochs=3)
  assert metrics["epochs"] == 3 and helpers.read_metrics(str(run))["epochs"] == 3
  assert metrics["test_distance"] == extended["test_distance"]


@pytest.mark.slow
def test_leftovers_of_a_kill_during_saving_are_never_trusted(tmp_path, caplog):
  # The job's behaviour, on the stand-in task (6 steps an epoch, saved every 4 steps). The
  # multitask export's own leftovers (.export.partial, .export.previous) are
  # tests/export_test.py's.
  run = tmp_path / "run"
  _stand_in_run(run, epochs=2)
  # What a kill leaves mid-save: a checkpoint its state file does not name yet, a half-written
  # metrics file under its temporary name.
  (run / "checkpoints" / "ckpt-99_temp").mkdir()
  (run / "checkpoints" / "ckpt-99_temp" / "part-00000-of-00001.index").write_bytes(b"\0" * 7)
  (run / "checkpoints" / "ckpt-99.index").write_bytes(b"\0" * 7)
  (run / "metrics.json.tmp").write_text('{"test_dist')
  _logged(caplog)
  metrics = _stand_in_run(run, epochs=3)
  assert "checkpoints/ckpt-12: epoch 3 of 3, step 0 of 6" in caplog.text
  assert helpers.read_metrics(str(run))["test_distance"] == metrics["test_distance"]
  assert not (run / "metrics.json.tmp").exists()
  exported = json.loads((run / "export" / stand_in_task.EXPORT_FILE).read_text())
  assert len(exported) == 4 and all(np.isfinite(exported))


@pytest.mark.slow
def test_a_whole_job_on_tensorflows_file_systems_never_writes_with_plain_open(tmp_path,
                                                                              monkeypatch):
  # ram:// is TensorFlow's in-memory file system: only tf.io.gfile reaches it, as with gs://.
  split = helpers.learnable_split(400)
  buffer = io.BytesIO()
  np.savez(buffer, X=split.images.reshape(400, 784), y=split.labels)
  with tf.io.gfile.GFile("ram://data/train.npz", "wb") as f:
    f.write(buffer.getvalue())
  real_open = open
  # cloudml-hypertune's file is local by design: Vertex AI reads it inside the container.
  hypertune_file = str(tmp_path / "hypertune" / "output.metrics")
  monkeypatch.setenv("CLOUD_ML_HP_METRIC_FILE", hypertune_file)

  def open_for_reading_only(file, mode="r", *args, **kwargs):
    assert not set(mode) & set("wax+") or file == hypertune_file, f"plain open({file!r}, {mode!r})"
    return real_open(file, mode, *args, **kwargs)

  monkeypatch.setattr("builtins.open", open_for_reading_only)
  work = tmp_path / "work"
  work.mkdir()
  monkeypatch.chdir(work)
  settings = config.TrainConfig(dataset="npz:ram://data/train.npz", model_dir="ram://run",
                                epochs=1, batch_size=32, latent_dim=16, width=8)
  train.configure_process(settings, tf.distribute.get_strategy())
  metrics = train.run(settings, tf.distribute.get_strategy(), problem.make_task)
  monkeypatch.undo()
  assert sorted(tf.io.gfile.listdir("ram://run")) == [
      "checkpoints", "config.json", "export", "history.json", "logs", "metrics.json", "report"]
  with tf.io.gfile.GFile("ram://run/metrics.json") as f:
    assert json.load(f)["test_accuracy"] == metrics["test_accuracy"]
  assert not os.listdir(work)


def _tuning_trial(monkeypatch, metrics_file) -> None:
  """This process as the chief of a Vertex AI tuning trial, reporting to `metrics_file`."""
  monkeypatch.setenv("CLOUD_ML_TRIAL_ID", "1")
  monkeypatch.setenv("CLOUD_ML_HP_METRIC_FILE", str(metrics_file))


def _reported(metrics_file, metric="validation_accuracy") -> list:
  """The (global step, value) of each line of cloudml-hypertune's file, in order."""
  reports = [json.loads(line) for line in pathlib.Path(metrics_file).read_text().splitlines()]
  return [(int(report["global_step"]), float(report[metric])) for report in reports]


@pytest.mark.slow
def test_a_tuning_trial_reports_every_evaluation_the_hook_and_the_epochs_make(tmp_path,
                                                                               monkeypatch):
  _tuning_trial(monkeypatch, tmp_path / "hypertune.metrics")
  hooked = {}

  def validate_every_other(step, evaluate):  # The hook's evaluations are the job's between epochs.
    if step % 6 == 0:
      hooked[step] = evaluate("validation")["accuracy"]

  metrics = _run(_config(tmp_path / "run", eval_every_steps=3), on_evaluation=validate_every_other,
                 splits=helpers.learnable_splits(train=256))
  reported = _reported(tmp_path / "hypertune.metrics")
  # 8 steps an epoch: the epochs' ends, and the hook's validations between them, once each.
  assert [step for step, _ in reported] == [6, 8, 12, 16]
  assert reported[0][1] == pytest.approx(hooked[6])
  assert reported[-1][1] == pytest.approx(metrics["validation_accuracy"])


def test_a_finished_trial_run_again_reports_its_whole_curve_again(finished_run, tmp_path,
                                                                  monkeypatch):
  """A trial whose container starts again after the job finished (a preempted VM, say) has a
  new, empty metrics file: its evaluations come from history.json."""
  run = _copy(finished_run, tmp_path)
  _tuning_trial(monkeypatch, tmp_path / "hypertune.metrics")
  _rerun(run, finished_run, tuning_metric="validation_reconstruction_mse")
  history = json.loads((run / "history.json").read_text())["epochs"]
  assert _reported(tmp_path / "hypertune.metrics", "validation_reconstruction_mse") == [
      (16 * entry["epoch"], pytest.approx(entry["validation"]["reconstruction_mse"]))
      for entry in history]


@pytest.mark.slow  # Two trainer processes, forked from one that has imported TensorFlow.
def test_a_trial_killed_and_resumed_reports_every_evaluation_once(finished_run, tmp_path):
  """The trainer as Vertex AI runs a trial, on the narrow model: one line per evaluation (every
  5 steps, and at the ends of the 16-step epochs), in increasing steps. Killed after its
  evaluation at step 20, past the epoch's checkpoint at 16, and run again: the new process's
  file holds every evaluation once, the first epoch's value from history.json."""
  metrics_file, model_dir = tmp_path / "hypertune" / "output.metrics", tmp_path / "run"
  flags = (f"--dataset={finished_run[1]}", "--batch_size=32", "--epochs=2", "--width=8",
           "--latent_dim=16", "--warmup_steps=0", "--learning_rate=0.01", "--eval_every_steps=5",
           "--tuning_metric=validation_reconstruction_mse", "--noreport",
           f"--model_dir={model_dir}")
  env = {"CLOUD_ML_TRIAL_ID": "7", "CLOUD_ML_HP_METRIC_FILE": str(metrics_file)}

  def steps():
    reported = (_reported(metrics_file, "validation_reconstruction_mse")
                if metrics_file.exists() else [])
    return [step for step, _ in reported]

  process = helpers.start_command_forked(tmp_path / "first.log", "trainer.task", *flags, env=env)
  try:
    deadline = time.monotonic() + 120
    while 20 not in steps() and process.poll() is None and time.monotonic() < deadline:
      time.sleep(0.02)
    process.kill()
  finally:
    process.wait(timeout=60)
  assert process.returncode == -signal.SIGKILL, (tmp_path / "first.log").read_text()[-3000:]
  assert steps()[:5] == [5, 10, 15, 16, 20]

  result = helpers.run_command_forked("trainer.task", *flags, env=env, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "Reported the 4 evaluations of the first 16 steps to the tuning trial again" in (
      result.stderr)
  assert steps() == [5, 10, 15, 16, 20, 25, 30, 32]
  reported = dict(_reported(metrics_file, "validation_reconstruction_mse"))
  history = json.loads((model_dir / "history.json").read_text())["epochs"]
  assert [reported[16 * entry["epoch"]] for entry in history] == [
      pytest.approx(entry["validation"]["reconstruction_mse"]) for entry in history]


@pytest.mark.slow  # XLA compiles for seconds.
def test_xla_compiled_steps_train_as_well(finished_run, tmp_path):
  # In its own process (forked before any test ran): other tests turn on op determinism,
  # process-wide, and XLA has no deterministic max-pool gradient. On the finished run's data:
  # the narrow model learns it in one epoch of 16 steps.
  result = helpers.run_command_forked(
      "trainer.task", f"--dataset={finished_run[1]}", "--epochs=1", "--width=8",
      "--latent_dim=16", "--batch_size=32", "--warmup_steps=0", "--learning_rate=0.01",
      "--noreport", "--jit_compile", f"--model_dir={tmp_path}", timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert helpers.read_metrics(str(tmp_path))["test_accuracy"] > 0.85
