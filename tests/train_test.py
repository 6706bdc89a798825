"""Tests of trainer.train: the loop under the default and mirrored strategies, outputs, resume."""

import io
import json
import os
import re
import shutil
import signal
import time

import numpy as np
import pytest
import tensorflow as tf
from absl import logging

from tests import helpers
from trainer import config, losses, train


def _run(settings, strategy, splits=None, **kwargs):
  """train.run after the process-wide settings, as the entry point makes them."""
  train.configure_process(settings, strategy)
  return train.run(settings, strategy, splits, **kwargs)


def _config(model_dir, **changes):
  # The splits are passed in; the dataset name is only recorded. No report unless it is under
  # test: drawing it takes a second or two (tests/report_test.py tests it). A narrow model at a
  # high rate, without warm-up: 32 steps learn the learnable splits.
  settings = dict(dataset="npz:injected-by-the-test", model_dir=str(model_dir), epochs=2,
                  batch_size=32, steps_per_loop=5, latent_dim=16, width=8, learning_rate=1e-2,
                  warmup_steps=0, report=False)
  settings.update(changes)
  return config.TrainConfig(**settings)


def test_trains_and_writes_every_output(tmp_path):
  metrics = _run(_config(tmp_path), tf.distribute.get_strategy(), helpers.learnable_splits())
  assert metrics["test_accuracy"] > 0.9
  assert metrics["test_reconstruction_mse"] < 0.1
  with open(tmp_path / "metrics.json") as f:
    written = json.load(f)
  for key in ("test_accuracy", "test_reconstruction_mse", "epochs", "global_batch_size",
              "num_replicas", "strategy", "precision", "train_images_per_second"):
    assert written[key] == metrics[key]
  assert written["strategy"] == "default" and written["num_replicas"] == 1
  # Numbered by global step: 2 epochs of 512 // 32 steps.
  assert tf.train.latest_checkpoint(str(tmp_path / "checkpoints")).endswith("ckpt-32")
  assert tf.io.gfile.exists(str(tmp_path / "export" / "saved_model.pb"))


def test_tensorboard_shows_train_and_validation_as_two_runs_of_the_same_tags(tmp_path):
  from tensorboard.backend.event_processing import event_multiplexer
  _run(_config(tmp_path, report=True), tf.distribute.get_strategy(),
            helpers.learnable_splits())
  logs = event_multiplexer.EventMultiplexer().AddRunsFromDirectory(str(tmp_path / "logs"))
  logs.Reload()
  assert set(logs.Runs()) == {"train", "validation", "report"}
  metrics = {"accuracy", "classifier_loss", "reconstruction_mse"}
  scalars = {run: set(tags["tensors"]) for run, tags in logs.Runs().items()}
  assert metrics <= scalars["train"] and metrics == scalars["validation"]
  assert {"loss", "learning_rate", "images_per_second"} <= scalars["train"]
  for run in ("train", "validation"):
    assert [event.step for event in logs.Tensors(run, "accuracy")] == [1, 2]


def _fingerprint(directory):
  """Every file under `directory` with its size and modification time."""
  return {str(path): (path.stat().st_size, path.stat().st_mtime_ns)
          for path in directory.rglob("*") if path.is_file()}


def test_a_finished_job_run_again_rewrites_nothing_and_says_where_its_results_are(tmp_path,
                                                                                   caplog):
  strategy, splits = tf.distribute.get_strategy(), helpers.learnable_splits()
  metrics = _run(_config(tmp_path, epochs=1), strategy, splits)
  before = _fingerprint(tmp_path)
  logging.set_verbosity(logging.INFO)
  caplog.set_level("INFO")
  assert _run(_config(tmp_path, epochs=1), strategy, splits) == json.loads(
      json.dumps(metrics))
  assert _fingerprint(tmp_path) == before
  assert "already trained its 1 epochs; its results: test accuracy" in caplog.text
  assert str(tmp_path / "metrics.json") in caplog.text
  # Fewer epochs than trained is refused; more extends the job.
  _run(_config(tmp_path, epochs=2), strategy, splits)
  with pytest.raises(config.UserInputError, match=r"--epochs=1 is fewer than the 2 epochs"):
    _run(_config(tmp_path, epochs=1), strategy, splits)
  assert json.loads((tmp_path / "history.json").read_text())["epochs"][-1]["epoch"] == 2


def test_metrics_of_a_shorter_run_do_not_make_an_extended_job_finished(tmp_path):
  strategy, splits = tf.distribute.get_strategy(), helpers.learnable_splits()
  _run(_config(tmp_path, epochs=1), strategy, splits)
  # As if an --epochs=2 run was stopped at its last step: the checkpoint holds 2 epochs, and
  # metrics.json is still the 1-epoch run's.
  extended = _run(_config(tmp_path / "longer", epochs=2), strategy, splits)
  for name in ("checkpoints", "history.json"):
    os.rename(tmp_path / "longer" / name, tmp_path / f"{name}.new")
    shutil.rmtree(tmp_path / name) if name == "checkpoints" else os.remove(tmp_path / name)
    os.rename(tmp_path / f"{name}.new", tmp_path / name)
  metrics = _run(_config(tmp_path, epochs=2), strategy, splits)
  assert metrics["epochs"] == 2 and helpers.read_metrics(str(tmp_path))["epochs"] == 2
  assert metrics["test_accuracy"] == extended["test_accuracy"]


def test_a_job_stopped_after_its_last_checkpoint_completes_its_export(tmp_path):
  strategy, splits = tf.distribute.get_strategy(), helpers.learnable_splits()
  metrics = _run(_config(tmp_path, epochs=1), strategy, splits)
  # As if killed between the last checkpoint and metrics.json: no metrics, half an export.
  (tmp_path / "metrics.json").unlink()
  (tmp_path / "export" / "saved_model.pb").unlink()
  checkpoints = _fingerprint(tmp_path / "checkpoints")
  completed = _run(_config(tmp_path, epochs=1), strategy, splits)
  assert completed["test_accuracy"] == metrics["test_accuracy"]
  assert (tmp_path / "export" / "saved_model.pb").exists() and (tmp_path / "metrics.json").exists()
  assert _fingerprint(tmp_path / "checkpoints") == checkpoints  # Nothing trained again.


def test_restart_resumes_from_the_latest_checkpoint(tmp_path, caplog):
  strategy = tf.distribute.get_strategy()
  splits = helpers.learnable_splits()
  _run(_config(tmp_path, epochs=1), strategy, splits)
  logging.set_verbosity(logging.INFO)
  caplog.set_level("INFO")
  _run(_config(tmp_path, epochs=3), strategy, splits)
  assert "Resuming from" in caplog.text and "epoch 2 of 3, step 0 of 16" in caplog.text
  reader = tf.train.load_checkpoint(tf.train.latest_checkpoint(str(tmp_path / "checkpoints")))
  # One step counter is the state; the epoch is derived from it.
  assert reader.get_tensor("global_step/.ATTRIBUTES/VARIABLE_VALUE") == 3 * 16
  assert not reader.get_tensor("epoch_sums/.ATTRIBUTES/VARIABLE_VALUE").any()  # Epoch done.
  assert reader.get_tensor("optimizer/_iterations/.ATTRIBUTES/VARIABLE_VALUE") == 3 * 16
  # The report's curves cover the whole run, the epochs before the restart included.
  history = json.loads((tmp_path / "history.json").read_text())["epochs"]
  assert [entry["epoch"] for entry in history] == [1, 2, 3]


@pytest.mark.parametrize("semi_supervised", [
    # Supervised resume is the semi-supervised case's subset: slow tier, for the fast one's budget.
    pytest.param({}, marks=pytest.mark.slow),
    {"labeled_examples": 40, "input_noise": 0.2, "unlabeled_loss": "pseudo_label",
     "pseudo_label_threshold": 0.5}], ids=["supervised", "denoising-pseudo-label"])
def test_resuming_mid_epoch_gives_the_uninterrupted_result(tmp_path, caplog, semi_supervised):
  strategy = tf.distribute.get_strategy()
  splits = helpers.learnable_splits()
  settings = dict(epochs=2, checkpoint_every_steps=5, deterministic=True, shift_pixels=1,
                  **semi_supervised)
  uninterrupted = _run(_config(tmp_path / "a", **settings), strategy, splits)
  checkpoints = tmp_path / "a" / "checkpoints"
  # Saved at global steps ..., 25, 30 and 32 (the end); go back to 25: epoch 2, step 9 of 16,
  # as if the job had been killed there.
  assert tf.train.get_checkpoint_state(str(checkpoints)).all_model_checkpoint_paths[0].endswith(
      "ckpt-25")
  tf.compat.v1.train.update_checkpoint_state(str(checkpoints), str(checkpoints / "ckpt-25"))
  logging.set_verbosity(logging.INFO)
  caplog.set_level("INFO")
  history = (tmp_path / "a" / "history.json").read_text()
  resumed = _run(_config(tmp_path / "a", **settings), strategy, splits)
  assert "ckpt-25: epoch 2 of 2, step 9 of 16" in caplog.text
  assert helpers.without_timing(resumed) == helpers.without_timing(uninterrupted)
  # The resumed epoch's train metrics are the whole epoch's, steps before the resume included.
  assert (tmp_path / "a" / "history.json").read_text() == history


def test_a_run_directory_of_the_older_trainer_is_refused_with_the_way_on(tmp_path):
  # The older trainer's state: an epoch and a step counter beside the model.
  old = tf.train.Checkpoint(epoch=tf.Variable(1, dtype=tf.int64),
                            step_in_epoch=tf.Variable(0, dtype=tf.int64))
  tf.train.CheckpointManager(old, str(tmp_path / "checkpoints"), max_to_keep=1).save(16)
  with pytest.raises(config.UserInputError, match=r"ckpt-16 was written by an older version of "
                                                  r"this trainer .* a new --model_dir"):
    _run(_config(tmp_path), tf.distribute.get_strategy(), helpers.learnable_splits())
  assert sorted(os.listdir(tmp_path / "checkpoints")) == [
      "checkpoint", "ckpt-16.data-00000-of-00001", "ckpt-16.index"]


def test_sigterm_at_an_epochs_last_step_keeps_that_epochs_history(tmp_path):
  strategy, splits = tf.distribute.get_strategy(), helpers.learnable_splits()

  def sigterm_midway(step, evaluate):
    if step == 8:  # Seen by the next call, which ends the epoch at step 16.
      os.kill(os.getpid(), signal.SIGTERM)

  with pytest.raises(train.preemption.Preempted, match=r"ckpt-16 saved at epoch 2, step 0"):
    _run(_config(tmp_path, epochs=2, eval_every_steps=8, steps_per_loop=8), strategy,
              splits, on_evaluation=sigterm_midway)
  history = json.loads((tmp_path / "history.json").read_text())["epochs"]
  assert [entry["epoch"] for entry in history] == [1]
  _run(_config(tmp_path, epochs=2), strategy, splits)
  history = json.loads((tmp_path / "history.json").read_text())["epochs"]
  assert [entry["epoch"] for entry in history] == [1, 2]


@pytest.mark.slow  # Eleven seconds of timed training; keeps the fast tier under five minutes.
def test_images_per_second_counts_only_time_inside_training_calls(tmp_path):
  # Evaluations that take a second each, four an epoch: counted, they would bring the
  # figure under 16 x 32 images / 4 s = 128 images/s.
  metrics = _run(_config(tmp_path, eval_every_steps=4), tf.distribute.get_strategy(),
                      helpers.learnable_splits(),
                      on_evaluation=lambda step, evaluate: time.sleep(1.0))
  assert metrics["train_images_per_second"] > 400


def test_saves_every_n_steps_and_at_each_epoch_end(tmp_path):
  _run(_config(tmp_path, epochs=2, checkpoint_every_steps=7, checkpoints_to_keep=10),
            tf.distribute.get_strategy(), helpers.learnable_splits())
  state = tf.train.get_checkpoint_state(str(tmp_path / "checkpoints"))
  numbers = [int(path.rsplit("-", 1)[1]) for path in state.all_model_checkpoint_paths]
  assert numbers == [7, 14, 16, 21, 28, 32]


def test_non_finite_loss_stops_before_saving_and_names_the_step(tmp_path):
  strategy = tf.distribute.get_strategy()
  splits = helpers.learnable_splits()
  _run(_config(tmp_path, epochs=1), strategy, splits)
  before = _snapshot(tmp_path / "checkpoints")
  # A step this large takes the weights to about 1e30: the next step's activations overflow and
  # its gradients are not finite, whatever the CPU's kernels do with the NaNs in its loss.
  with pytest.raises(config.UserInputError,
                     match=r"training diverged: non-finite (gradients|weights) at step 18 \(epoch "
                           r"2, step 2\); stopped without saving; the last good checkpoint is "
                           r".*ckpt-16"):
    _run(_config(tmp_path, epochs=2, learning_rate=1e30),
              strategy, splits)
  assert _snapshot(tmp_path / "checkpoints") == before


class _FiniteLossNonFiniteGradients(losses.FixedWeighting):
  """Adds sqrt(w - w) = 0 to the loss: the loss stays finite, its gradient (inf x 0) does not."""

  def __init__(self, variable):
    super().__init__({config.CLASSIFIER: 1.0, config.DECODER: 0.2})
    self._variable = variable

  def total(self, task_losses, num_replicas):
    weight = self._variable[0, 0]
    return super().total(task_losses, num_replicas) + tf.sqrt(weight - weight)


def test_non_finite_gradients_stop_training_while_the_loss_is_finite(tmp_path):
  strategy = tf.distribute.get_strategy()
  state = train.build_training_state(_config(tmp_path, epochs=1), strategy, "float32",
                                     steps_per_epoch=16)
  weighting = _FiniteLossNonFiniteGradients(
      state.model.get_layer("encoder").get_layer("latent").kernel)
  loop = train.make_train_loop(strategy, state.model, state.optimizer, weighting)
  batches = iter(train.data_lib.distribute_training(strategy, helpers.learnable_splits().train,
                                                    32, seed=0))
  sums, first_bad, _ = loop(batches, tf.constant(1), tf.constant(0.0))
  sums = {name: float(value) for name, value in sums.items()}
  assert int(first_bad) == 0 and np.isfinite(sums["loss"])
  assert train.divergence(sums) == "non-finite gradients"


def test_divergence_names_what_went_non_finite():
  healthy = dict.fromkeys(train.STEP_SUMS, 0.0)
  assert train.divergence(healthy) is None
  for name, value, problem in (("nonfinite_gradients", 1.0, "non-finite gradients"),
                               ("nonfinite_weights", 1.0, "non-finite weights"),
                               ("loss", np.nan, "a non-finite loss (nan)")):
    assert train.divergence({**healthy, name: value}) == problem


@pytest.mark.parametrize("bad_value", [float("nan"), float("inf")])
def test_a_non_finite_weight_stops_training_before_saving(tmp_path, bad_value):
  settings = _config(tmp_path, epochs=1, eval_every_steps=4)
  train.configure_process(settings, tf.distribute.get_strategy())
  job = train.setup(settings, tf.distribute.get_strategy(), helpers.learnable_splits())
  kernel = job.state.model.get_layer("encoder").get_layer("latent").kernel

  def break_a_weight(step, evaluate):
    # One bad weight, as a diverging update leaves it: the next call must stop, whatever the
    # CPU's kernels make of it in the loss (the weight stays non-finite after an update).
    if step == 4:
      kernel.assign(tf.tensor_scatter_nd_update(kernel, [[0, 0]], [bad_value]))

  with pytest.raises(config.UserInputError,
                     match=r"training diverged: non-finite (weights|gradients) at step 5 \(epoch "
                           r"1, step 5\).*none \(delete --model_dir to start over\)"):
    train.fit(job, on_evaluation=break_a_weight)
  assert tf.train.latest_checkpoint(str(tmp_path / "checkpoints")) is None
  assert not (tmp_path / "history.json").exists()


def test_checkpoint_dir_can_live_apart_from_model_dir(tmp_path):
  _run(_config(tmp_path / "model", epochs=1, checkpoint_dir=str(tmp_path / "ckpt")),
            tf.distribute.get_strategy(), helpers.learnable_splits())
  assert tf.train.latest_checkpoint(str(tmp_path / "ckpt")).endswith("ckpt-16")
  assert not (tmp_path / "model" / "checkpoints").exists()


def test_mirrored_over_two_replicas_trains_and_exports(tmp_path, two_replicas):
  strategy = two_replicas
  metrics = _run(_config(tmp_path), strategy, helpers.learnable_splits())
  assert metrics["num_replicas"] == 2 and metrics["strategy"] == "mirrored"
  assert metrics["test_accuracy"] > 0.9
  assert tf.io.gfile.exists(str(tmp_path / "export" / "saved_model.pb"))


@pytest.mark.parametrize("objectives", [
    {"input_noise": 0.2, "unlabeled_loss": "pseudo_label", "pseudo_label_threshold": 0.8},
    pytest.param({"unlabeled_loss": "consistency"}, marks=pytest.mark.slow)],
    ids=["denoising-pseudo-label", "consistency"])
def test_semi_supervised_on_two_replicas_learns_from_few_labels(tmp_path, two_replicas,
                                                                objectives):
  metrics = _run(_config(tmp_path, labeled_examples=40, epochs=3, **objectives), two_replicas,
                 helpers.learnable_splits())
  assert metrics["labeled_examples"] == 40 and metrics["train_examples"] == 512
  assert metrics["test_accuracy"] > 0.9  # Four of each class teach these easy classes.
  assert metrics["test_reconstruction_mse"] < 0.1


def test_uncertainty_weighting_on_two_replicas_learns_and_logs_the_weights(tmp_path, two_replicas,
                                                                            caplog):
  logging.set_verbosity(logging.INFO)
  caplog.set_level("INFO")
  metrics = _run(_config(tmp_path, loss_weighting="uncertainty"), two_replicas,
                      helpers.learnable_splits())
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
  logging.set_verbosity(logging.INFO)
  caplog.set_level("INFO")
  _run(_config(tmp_path, latent_dim=1, epochs=1, report=True),
            tf.distribute.get_strategy(),
            helpers.learnable_splits())  # One latent dimension has no 2-D projection.
  assert "the report could not be drawn (ValueError" in caplog.text
  assert (tmp_path / "metrics.json").exists()


@pytest.mark.parametrize("trained, restarted", [("fixed", "uncertainty"),
                                                 ("uncertainty", "fixed")])
def test_a_restart_may_not_change_the_loss_weighting(tmp_path, trained, restarted):
  strategy, splits = tf.distribute.get_strategy(), helpers.learnable_splits()
  _run(_config(tmp_path, epochs=1, loss_weighting=trained), strategy, splits)
  before = _snapshot(tmp_path)
  # Learned weights dropped under fixed ones went through without a word before config.json.
  with pytest.raises(config.UserInputError, match=f"trained with --loss_weighting={trained}, "
                                                  f"not --loss_weighting={restarted}; "):
    _run(_config(tmp_path, loss_weighting=restarted), strategy, splits)
  assert _snapshot(tmp_path) == before


def test_a_restart_that_changes_the_batch_or_the_data_order_is_refused(tmp_path, caplog):
  strategy, splits = tf.distribute.get_strategy(), helpers.learnable_splits()
  _run(_config(tmp_path, epochs=1), strategy, splits)
  before = _snapshot(tmp_path)
  # A larger batch used to resume past the new epoch's end and record a bogus epoch.
  with pytest.raises(config.UserInputError,
                     match=r"^this run was trained with --batch_size=32 --seed=0 "
                           r"--shift_pixels=1, not --batch_size=64 --seed=3 --shift_pixels=0; "):
    _run(_config(tmp_path, epochs=2, batch_size=64, seed=3, shift_pixels=0), strategy,
              splits)
  assert _snapshot(tmp_path) == before
  # A lower learning rate is allowed, logged, and saved with the run.
  logging.set_verbosity(logging.INFO)
  caplog.set_level("INFO")
  _run(_config(tmp_path, epochs=2, learning_rate=1e-3), strategy, splits)
  assert "Changed since this run was last started: --learning_rate: 0.01 -> 0.001" in caplog.text
  assert json.loads((tmp_path / "config.json").read_text())["learning_rate"] == 1e-3


def test_global_batch_that_does_not_divide_fails_before_training(tmp_path, two_replicas):
  strategy = two_replicas
  with pytest.raises(config.UserInputError, match="multiple of the 2 replicas"):
    _run(_config(tmp_path, batch_size=33), strategy, helpers.learnable_splits())
  assert not os.listdir(tmp_path)


@pytest.mark.parametrize("precision", ["mixed_bfloat16", "mixed_float16"])
def test_mixed_precision_trains(tmp_path, precision):
  metrics = _run(_config(tmp_path, precision=precision, epochs=1),
                      tf.distribute.get_strategy(), helpers.learnable_splits())
  assert metrics["precision"] == precision
  assert np.isfinite(metrics["test_reconstruction_mse"])


@pytest.mark.slow  # XLA compiles for twelve seconds; keeps the fast tier under five minutes.
def test_xla_compiled_steps_train_as_well(tmp_path):
  # In its own process: other tests turn on op determinism, process-wide, and XLA has no
  # deterministic max-pool gradient.
  result = helpers.run_trainer("--dataset=mnist_sample", "--epochs=1", "--width=16",
                               "--jit_compile", f"--model_dir={tmp_path}")
  assert result.returncode == 0, result.stderr[-3000:]
  assert helpers.read_metrics(str(tmp_path))["test_accuracy"] > 0.9


def test_xla_and_determinism_together_are_refused(tmp_path):
  with pytest.raises(config.UserInputError, match="--jit_compile and --deterministic"):
    _config(tmp_path, jit_compile=True, deterministic=True)


def test_evaluation_every_n_steps_reaches_the_hook_with_both_splits(tmp_path):
  seen = []

  def record(global_step, evaluate):
    seen.append((global_step, evaluate("test")["accuracy"], evaluate("validation")["accuracy"]))

  _run(_config(tmp_path, eval_every_steps=6), tf.distribute.get_strategy(),
            helpers.learnable_splits(), on_evaluation=record)
  # Every 6 steps, and at each epoch's end (16 steps an epoch).
  assert [step for step, _, _ in seen] == [6, 12, 16, 18, 24, 30, 32]
  assert all(0 <= test <= 1 and 0 <= validation <= 1 for _, test, validation in seen)


def test_mixed_float16_on_two_replicas_trains(tmp_path, two_replicas):
  strategy = two_replicas
  metrics = _run(_config(tmp_path, precision="mixed_float16", epochs=1), strategy,
                      helpers.learnable_splits())
  assert metrics["num_replicas"] == 2 and np.isfinite(metrics["test_reconstruction_mse"])
  # The loss scale and its growth counter are checkpointed: a GPU resume is exact too.
  reader = tf.train.load_checkpoint(tf.train.latest_checkpoint(str(tmp_path / "checkpoints")))
  scale = reader.get_tensor("loss_scale/scale/.ATTRIBUTES/VARIABLE_VALUE")
  counter = reader.get_tensor("loss_scale/growth_counter/.ATTRIBUTES/VARIABLE_VALUE")
  state = train.build_training_state(_config(tmp_path, precision="mixed_float16", epochs=1),
                                     strategy, "mixed_float16", steps_per_epoch=16)
  train.restore_latest(state.checkpoint, str(tmp_path / "checkpoints"))
  assert float(state.optimizer.dynamic_scale.numpy()) == scale
  assert int(state.optimizer.step_counter.numpy()) == counter
  assert (scale, counter) != (2.0 ** 15, 0)  # Trained: the scale or its counter moved.


def test_one_replicas_overflow_reaches_every_replica(two_replicas):
  strategy = two_replicas
  gradients = strategy.experimental_distribute_values_from_function(
      lambda context: tf.constant([1.0, float("inf") if context.replica_id_in_sync_group else 2.0]))
  agreed = strategy.run(lambda g: train._agree_on_overflow([g])[0], args=(gradients,))
  for values in strategy.experimental_local_results(agreed):
    assert np.isnan(values.numpy()).all()


def _snapshot(directory):
  return {path: os.path.getmtime(path) for path in tf.io.gfile.glob(f"{directory}/**/*")}


def test_checkpoint_of_another_model_shape_is_refused_untouched(tmp_path):
  strategy = tf.distribute.get_strategy()
  _run(_config(tmp_path, epochs=1, latent_dim=16), strategy, helpers.learnable_splits())
  before = _snapshot(tmp_path)
  with pytest.raises(config.UserInputError, match="trained with --latent_dim=16, not "):
    _run(_config(tmp_path, epochs=2, latent_dim=32), strategy, helpers.learnable_splits())
  assert _snapshot(tmp_path) == before
  # Without its config.json (deleted by hand, adopted), the checkpoint itself refuses it.
  (tmp_path / "config.json").unlink()
  before = _snapshot(tmp_path)
  with pytest.raises(config.UserInputError, match="does not fit this model.*--latent_dim"):
    _run(_config(tmp_path, epochs=2, latent_dim=32), strategy, helpers.learnable_splits())
  assert _snapshot(tmp_path) == before


def test_unwritable_checkpoint_dir_fails_before_training(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("not a directory")
  with pytest.raises(config.UserInputError, match="cannot write to --checkpoint_dir"):
    _run(_config(tmp_path / "run", checkpoint_dir=str(blocker / "ckpt")),
              tf.distribute.get_strategy(), helpers.learnable_splits())
  assert blocker.read_text() == "not a directory"


def test_unwritable_model_dir_fails_before_training(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("not a directory")
  with pytest.raises(config.UserInputError, match="cannot write to --model_dir"):
    _run(_config(blocker / "run"), tf.distribute.get_strategy(), helpers.learnable_splits())


def test_leftovers_of_a_kill_during_saving_are_never_trusted(tmp_path, caplog):
  strategy = tf.distribute.get_strategy()
  splits = helpers.learnable_splits()
  _run(_config(tmp_path, epochs=1), strategy, splits)
  # What a kill leaves mid-save: a checkpoint its state file does not name yet, a half-written
  # export under its temporary name, a half-written metrics file under its temporary name.
  (tmp_path / "checkpoints" / "ckpt-99_temp").mkdir()
  (tmp_path / "checkpoints" / "ckpt-99_temp" / "part-00000-of-00001.index").write_bytes(b"\0" * 7)
  (tmp_path / "checkpoints" / "ckpt-99.index").write_bytes(b"\0" * 7)
  (tmp_path / ".export.partial").mkdir()
  (tmp_path / ".export.partial" / "saved_model.pb").write_bytes(b"half")
  (tmp_path / "metrics.json.tmp").write_text('{"test_accu')
  logging.set_verbosity(logging.INFO)
  caplog.set_level("INFO")
  metrics = _run(_config(tmp_path, epochs=2), strategy, splits)
  assert "checkpoints/ckpt-16: epoch 2 of 2, step 0 of 16" in caplog.text
  assert helpers.read_metrics(str(tmp_path))["test_accuracy"] == metrics["test_accuracy"]
  assert not (tmp_path / ".export.partial").exists()
  assert not (tmp_path / "metrics.json.tmp").exists()
  serve = tf.saved_model.load(str(tmp_path / "export")).signatures["serving_default"]
  assert serve(images=tf.zeros([1, 28, 28], tf.uint8))["classifier"].shape == (1, 10)


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
  metrics = _run(config.TrainConfig(dataset="npz:ram://data/train.npz",
                                         model_dir="ram://run", epochs=1, batch_size=32,
                                         latent_dim=16), tf.distribute.get_strategy())
  monkeypatch.undo()
  assert sorted(tf.io.gfile.listdir("ram://run")) == [
      "checkpoints", "config.json", "export", "history.json", "logs", "metrics.json", "report"]
  with tf.io.gfile.GFile("ram://run/metrics.json") as f:
    assert json.load(f)["test_accuracy"] == metrics["test_accuracy"]
  assert not os.listdir(work)


def test_reports_validation_accuracy_to_hyperparameter_tuning(tmp_path, monkeypatch):
  monkeypatch.setenv("CLOUD_ML_TRIAL_ID", "1")  # As in a Vertex AI tuning trial.
  monkeypatch.setenv("CLOUD_ML_HP_METRIC_FILE", str(tmp_path / "hypertune.metrics"))
  metrics = _run(_config(tmp_path / "run", epochs=1), tf.distribute.get_strategy(),
                      helpers.learnable_splits())
  (line,) = (tmp_path / "hypertune.metrics").read_text().splitlines()
  reported = json.loads(line)
  assert float(reported["validation_accuracy"]) == pytest.approx(metrics["validation_accuracy"])
  assert int(reported["global_step"]) == 16


def test_run_checks_the_process_wide_policy_matches_its_configuration(tmp_path):
  # The policy is float32 here (conftest); the configuration asks for bfloat16.
  with pytest.raises(RuntimeError, match="call train.configure_process"):
    train.run(_config(tmp_path, precision="mixed_bfloat16"), tf.distribute.get_strategy(),
              helpers.learnable_splits())
  assert not os.listdir(tmp_path)
