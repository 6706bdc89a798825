"""The training loop: one custom loop that runs under every tf.distribute strategy.

Keras 3.15's `model.fit` fails under MultiWorkerMirroredStrategy, so this module owns the loop,
as the Model Garden's trainers do: a `tf.function` runs `steps_per_loop` steps of
`strategy.run` per call into the device, and returns the summed losses so the host reads
them once per call. `run` reads top to bottom in stages: data, outputs, model, restore,
train, evaluate, export and report.

Faults: checkpoints every `checkpoint_every_steps` and at each epoch's end hold the model,
optimizer and position (epoch, step); the input pipeline is a pure function of that position,
so a resumed job reads what an uninterrupted one would. SIGTERM saves and raises
`preemption.Preempted`; a non-finite loss, gradient or weight stops the job before it saves.
"""

import atexit
import dataclasses
import json
import os
import shutil
import tempfile
import time
from typing import Callable, Dict, List, Optional

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from trainer import data as data_lib
from trainer import distribution
from trainer import export as export_lib
from trainer import losses
from trainer import preemption
from trainer import progress as progress_lib
from trainer import tuning
from trainer.config import TrainConfig, UserInputError, first_line
from trainer.losses import SUMS
from trainer.model import build_model

# Training adds, after the SUMS: the step's total loss (already a mean over the global batch),
# then how many replicas saw non-finite gradients and how many hold non-finite weights.
TOTAL_LOSS = len(SUMS)
NONFINITE_GRADIENTS = TOTAL_LOSS + 1
NONFINITE_WEIGHTS = TOTAL_LOSS + 2


def is_chief(strategy: tf.distribute.Strategy) -> bool:
  """True on the one worker that writes shared outputs (every single-host strategy's)."""
  return bool(strategy.extended.should_checkpoint)


def checkpoint_dir(config: TrainConfig) -> str:
  """Where checkpoints are read (by every worker) and written (by the chief)."""
  return config.checkpoint_dir or os.path.join(config.model_dir, "checkpoints")


def _output_dirs(config: TrainConfig, chief: bool) -> Dict[str, str]:
  """Where this worker writes: under model_dir on the chief, a local scratch dir elsewhere.

  Non-chief workers must still take part in saving (it is collective under multi-worker), so
  they write to a private scratch directory, deleted when the process exits however it ends.
  """
  if chief:
    root = config.model_dir
    for flag, directory in (("model_dir", root), ("checkpoint_dir", checkpoint_dir(config))):
      _check_writable(flag, directory)
  else:
    root = tempfile.mkdtemp(prefix="trainer-worker-")
    atexit.register(shutil.rmtree, root, ignore_errors=True)
  return {
      "checkpoints": checkpoint_dir(config) if chief else os.path.join(root, "checkpoints"),
      "logs": (os.environ.get("AIP_TENSORBOARD_LOG_DIR") if chief else None)
              or os.path.join(root, "logs"),
      "export": os.path.join(root, "export"),
  }


def _check_writable(flag: str, directory: str) -> None:
  """Fails now, not after the first epoch, where a directory cannot be written."""
  try:
    tf.io.gfile.makedirs(directory)
    probe = os.path.join(directory, ".write_test")
    with tf.io.gfile.GFile(probe, "w") as f:
      f.write("ok")
    tf.io.gfile.remove(probe)
  except (tf.errors.OpError, OSError) as e:
    raise UserInputError(
        f"cannot write to --{flag}={directory} ({type(e).__name__}); "
        "give a directory this job may write") from None


def _all_finite(tensors) -> tf.Tensor:
  return tf.reduce_all([tf.reduce_all(tf.math.is_finite(t)) for t in tensors])


def _agree_on_overflow(gradients):
  """Makes every replica's gradients non-finite when any replica's are.

  Keras 3.15's LossScaleOptimizer decides to skip a step from the first local replica's
  gradients before they are summed: another replica's overflow would reach the weights, and
  under multi-worker the workers could take different branches and hang.
  """
  finite = _all_finite(gradients)
  replicas_overflowed = tf.distribute.get_replica_context().all_reduce(
      tf.distribute.ReduceOp.SUM, 1.0 - tf.cast(finite, tf.float32))
  all_finite = tf.equal(replicas_overflowed, 0.0)
  return [tf.where(all_finite, g, tf.fill(tf.shape(g), tf.constant(float("nan"), g.dtype)))
          for g in gradients]


def make_train_loop(strategy, model, optimizer, weighting, jit_compile: bool = False,
                    semi_supervised: bool = False):
  """A `tf.function(iterator, num_steps, stop_requested)` that trains up to `num_steps` steps.

  `weighting` combines the task losses (a `losses` weighting, or a dict of fixed weights);
  its own variables, if any, train with the model's. Returns the SUMS of the steps plus their
  total loss and health counts (see NONFINITE_GRADIENTS), how many steps ran, and whether any
  worker's `stop_requested` was true: every worker gets the same answer, so all stop at the
  same step. It stops early after a step whose loss, metrics, gradients or updated weights
  are not finite; the sums say so (`divergence` reads them). The loss alone is not enough:
  some CPU kernels turn NaN activations into finite outputs, so weights can go NaN while the
  loss stays finite. With `jit_compile`, XLA compiles
  each replica's forward and backward pass; the gradients' all-reduce and the update stay
  outside it, as every strategy needs. `semi_supervised` batches have unlabelled examples,
  whose number the replicas must add up each step; otherwise both counts are the global batch.
  """
  if isinstance(weighting, dict):
    weighting = losses.FixedWeighting(weighting)
  variables = model.trainable_variables + weighting.trainable_variables

  def sums_loss_and_gradients(images, targets, weights, counts):
    with tf.GradientTape() as tape:
      cross_entropy, mse, correct = losses.per_example_losses(model, images, targets,
                                                              training=True)
      loss = weighting.total(losses.task_losses(cross_entropy, mse, weights, counts),
                             strategy.num_replicas_in_sync)
      scaled_loss = optimizer.scale_loss(loss)  # Loss scaling under float16; identity otherwise.
    gradients = tape.gradient(scaled_loss, variables)
    sums = losses.batch_sums(cross_entropy, mse, correct, weights)
    return tf.concat([sums, [loss]], axis=0), gradients

  if jit_compile:
    sums_loss_and_gradients = tf.function(sums_loss_and_gradients, jit_compile=True)

  def train_step(inputs):
    images, targets, weights = inputs
    if semi_supervised:  # Counted outside the XLA-compiled part: collectives stay out of it.
      counts = losses.global_counts(weights)
    else:
      counts = tf.fill([2], tf.cast(tf.shape(images)[0] * strategy.num_replicas_in_sync,
                                    tf.float32))
    sums, gradients = sums_loss_and_gradients(images, targets, weights, counts)
    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
      # Overflowing scaled gradients are routine under float16: the optimizer skips the step
      # and lowers the scale. Divergence then shows in the loss or the weights.
      gradients = _agree_on_overflow(gradients)
      bad_gradients = tf.constant(0.0)
    else:
      bad_gradients = 1.0 - tf.cast(_all_finite(gradients), tf.float32)
    optimizer.apply_gradients(zip(gradients, variables))
    bad_weights = 1.0 - tf.cast(_all_finite(variables), tf.float32)
    return tf.concat([sums, [bad_gradients, bad_weights]], axis=0)

  @tf.function
  def train_loop(iterator, num_steps, stop_requested):
    sums = tf.zeros([NONFINITE_WEIGHTS + 1])
    steps_run = tf.constant(0)
    for _ in tf.range(num_steps):
      step_sums = strategy.reduce(tf.distribute.ReduceOp.SUM,
                                  strategy.run(train_step, args=(next(iterator),)), axis=None)
      sums += step_sums
      steps_run += 1
      if (not tf.reduce_all(tf.math.is_finite(step_sums))
          or step_sums[NONFINITE_GRADIENTS] + step_sums[NONFINITE_WEIGHTS] > 0):
        break
    requests = strategy.reduce(tf.distribute.ReduceOp.SUM,
                               strategy.run(tf.identity, args=(stop_requested,)), axis=None)
    return sums, steps_run, requests > 0

  return train_loop


def make_evaluate(strategy, model):
  """A function(distributed_eval_dataset) that returns SUMS over real (unpadded) examples.

  The host loops over the batches and calls a `tf.function` per batch, as Keras's evaluate
  does: measured on CPU, the same work in one in-graph loop over the dataset took 1.5 times
  as long (3.5 s against 2.2 s for 10,000 Fashion-MNIST images). Evaluation is rare enough
  that a host round trip per batch costs nothing worth counting, on TPU too.
  """

  def eval_step(inputs):
    images, targets, weights = inputs
    cross_entropy, mse, correct = losses.per_example_losses(model, images, targets,
                                                            training=False)
    return losses.batch_sums(cross_entropy, mse, correct, weights)

  @tf.function
  def evaluate_batch(inputs):
    return strategy.reduce(tf.distribute.ReduceOp.SUM, strategy.run(eval_step, args=(inputs,)),
                           axis=None)

  def evaluate(dataset):
    sums = tf.zeros([len(SUMS)])
    for inputs in dataset:
      sums += evaluate_batch(inputs)
    return sums

  return evaluate


def _write_json(path: str, content: dict) -> None:
  """Writes through a temporary name, so readers never see a half-written file."""
  temporary = path + ".tmp"
  with tf.io.gfile.GFile(temporary, "w") as f:
    json.dump(content, f, indent=2, sort_keys=True)
  tf.io.gfile.rename(temporary, path, overwrite=True)


class Position:
  """Where training stands: the epoch and the step within it, kept in checkpointed variables."""

  def __init__(self, epoch: tf.Variable, step: tf.Variable, steps_per_epoch: int):
    self._epoch, self._step, self.steps_per_epoch = epoch, step, steps_per_epoch

  @property
  def epoch(self) -> int:
    """Epochs completed (so the one in progress, counted from 0)."""
    return int(self._epoch.numpy())

  @property
  def step(self) -> int:
    """Steps completed in the current epoch."""
    return int(self._step.numpy())

  @property
  def global_step(self) -> int:
    return self.epoch * self.steps_per_epoch + self.step

  def advance(self, steps: int) -> None:
    self._step.assign_add(steps)

  def start_next_epoch(self) -> None:
    self._epoch.assign_add(1)
    self._step.assign(0)

  def __str__(self) -> str:
    return f"epoch {self.epoch + 1}, step {self.step}"


def build_training_state(config: TrainConfig, strategy: tf.distribute.Strategy, policy: str,
                         steps_per_epoch: int):
  """Model, optimizer, `Position`, task weighting and their checkpoint, created inside the
  strategy scope."""
  distribution.set_precision(policy)
  with strategy.scope():
    model = build_model(config.latent_dim)
    weighting = losses.make_weighting(config.loss_weighting, config.loss_weights)
    variables = model.trainable_variables + weighting.trainable_variables
    # Cosine decay to zero over the whole run: the last epochs settle instead of bouncing.
    schedule = keras.optimizers.schedules.CosineDecay(
        config.learning_rate, decay_steps=max(1, config.epochs * steps_per_epoch))
    optimizer = keras.optimizers.Adam(schedule)
    optimizer.build(variables)
    # The checkpoint holds the inner optimizer, so it restores whatever the precision.
    checkpointed_optimizer = optimizer
    if policy == "mixed_float16":
      optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
      optimizer.build(variables)
    epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch")
    step = tf.Variable(0, dtype=tf.int64, trainable=False, name="step_in_epoch")
    learned = {"loss_weighting": weighting} if weighting.trainable_variables else {}
    checkpoint = tf.train.Checkpoint(model=model, optimizer=checkpointed_optimizer, epoch=epoch,
                                     step_in_epoch=step, **learned)
  return model, optimizer, Position(epoch, step, steps_per_epoch), weighting, checkpoint


def restore_latest(checkpoint: tf.train.Checkpoint, directory: str) -> Optional[str]:
  """Restores the latest checkpoint in `directory`, if any; refuses one of another model.

  Only checkpoints that the CheckpointManager's state file names count: it names a
  checkpoint after all its files are written, so a save cut short is never trusted.
  """
  latest = tf.train.latest_checkpoint(directory)
  if latest:
    try:
      checkpoint.restore(latest).assert_existing_objects_matched()
    except (AssertionError, ValueError, tf.errors.OpError) as e:
      raise UserInputError(
          f"the checkpoint {latest} does not fit this model ({first_line(e)[:200]}); use the "
          "flags it was trained with (e.g. --latent_dim) or a new --model_dir") from None
  return latest


def read_history(path: str, epochs_done: int) -> List[Dict]:
  """The per-epoch metrics of the epochs a restored checkpoint has done (none if no file)."""
  if not tf.io.gfile.exists(path):
    return []
  try:
    with tf.io.gfile.GFile(path) as f:
      return [entry for entry in json.load(f)["epochs"] if entry["epoch"] <= epochs_done]
  except (ValueError, KeyError, TypeError) as e:
    raise UserInputError(f"{path} is not a training history ({first_line(e)}); delete it (the "
                         "report's curves then start at the resumed epoch)") from None


def _log_epoch(writers, optimizer, entry: Dict, epochs: int, images_per_second: float) -> None:
  """The epoch's log line, and its scalars in TensorBoard: `writers` has one per split, so
  train and validation curves share a chart under the same tag."""
  train_metrics, validation_metrics = entry["train"], entry["validation"]
  logging.info(
      "epoch %d/%d: loss %.4f, classifier_loss %.4f, reconstruction_mse %.4f, accuracy %.4f | "
      "validation: accuracy %.4f, reconstruction_mse %.4f | loss weights %s | %.0f images/s",
      entry["epoch"], epochs, train_metrics["loss"], train_metrics["classifier_loss"],
      train_metrics["reconstruction_mse"], train_metrics["accuracy"],
      validation_metrics["accuracy"], validation_metrics["reconstruction_mse"],
      ", ".join(f"{task} {weight:.4g}" for task, weight in entry["loss_weights"].items()),
      images_per_second)
  with writers["validation"].as_default(step=entry["epoch"]):
    for name, value in validation_metrics.items():
      tf.summary.scalar(name, value)
  with writers["train"].as_default(step=entry["epoch"]):
    for name, value in train_metrics.items():
      tf.summary.scalar(name, value)
    for task, weight in entry["loss_weights"].items():
      tf.summary.scalar(f"loss_weight/{task}", weight)
    tf.summary.scalar("learning_rate", float(optimizer.learning_rate.numpy()))
    tf.summary.scalar("images_per_second", images_per_second)
  for writer in writers.values():
    writer.flush()


def _write_report(dirs, test, history, metrics, model_dir) -> None:
  """Draws the report; a failure is logged, not raised: the trained job must not be lost to it.

  Its images go to TensorBoard as a run of their own, `report`, beside `train` and `validation`.
  """
  from trainer import report  # Here, not at the top: matplotlib takes a second to import.
  report_dir = os.path.join(model_dir, "report")
  try:
    report.write_report(dirs["export"], test, history, metrics, report_dir,
                        tf.summary.create_file_writer(os.path.join(dirs["logs"], "report")))
  except Exception as e:  # pylint: disable=broad-except
    logging.warning("the report could not be drawn (%s: %s); the model and metrics are saved",
                    type(e).__name__, first_line(e))


def divergence(loop_sums: np.ndarray) -> Optional[str]:
  """What went non-finite in a training loop's sums, or None where training is healthy."""
  if loop_sums[NONFINITE_GRADIENTS]:
    return "non-finite gradients"
  if loop_sums[NONFINITE_WEIGHTS]:
    return "non-finite weights"
  if not np.isfinite(loop_sums).all():
    return f"a non-finite loss ({loop_sums[TOTAL_LOSS]})"
  return None


def save_checkpoint(manager: tf.train.CheckpointManager, position: Position) -> str:
  """Saves a checkpoint numbered by global step; returns its path."""
  return manager.save(checkpoint_number=position.global_step)


def train_epoch(train_loop, iterator, position: Position, config: TrainConfig, termination,
                manager: tf.train.CheckpointManager, progress=None,
                evaluate_mid_epoch: Optional[Callable[[], None]] = None) -> np.ndarray:
  """Trains the rest of the current epoch in calls of up to `steps_per_loop` steps.

  Saves every `checkpoint_every_steps` global steps and calls `evaluate_mid_epoch` every
  `eval_every_steps` (0: never), but not at the epoch's end: the caller does both there after
  it counts the epoch done. Returns the epoch's SUMS plus total loss. Raises
  `UserInputError` on divergence (non-finite loss, gradients or weights) before saving
  anything, and `preemption.Preempted` after saving when any worker's `termination` flag is set.
  """
  sums = np.zeros(len(SUMS) + 1)
  every = config.checkpoint_every_steps
  eval_every = config.eval_every_steps if evaluate_mid_epoch else 0
  while position.step < position.steps_per_epoch:
    steps = min(config.steps_per_loop, position.steps_per_epoch - position.step,
                every - position.global_step % every,
                eval_every - position.global_step % eval_every if eval_every else every)
    loop_sums, steps_run, stop = train_loop(iterator, tf.constant(steps),
                                            tf.constant(float(termination.requested)))
    loop_sums = loop_sums.numpy()
    problem = divergence(loop_sums)
    if problem:
      raise UserInputError(
          f"training diverged: {problem} at step {position.global_step + int(steps_run)} "
          f"(epoch {position.epoch + 1}, step {position.step + int(steps_run)}); stopped "
          "without saving; the last good checkpoint is "
          f"{manager.latest_checkpoint or 'none (delete --model_dir to start over)'}; "
          "lower --learning_rate or check the data")
    sums += loop_sums[:TOTAL_LOSS + 1]
    position.advance(steps)
    if progress:
      progress.update(position.step, float(loop_sums[TOTAL_LOSS]) / max(int(steps_run), 1))
    if bool(stop):
      if position.step == position.steps_per_epoch:  # Resume at the next epoch's start.
        position.start_next_epoch()
      raise preemption.Preempted(
          f"checkpoint {save_checkpoint(manager, position)} saved at {position}")
    if position.step < position.steps_per_epoch:
      if position.global_step % every == 0:
        save_checkpoint(manager, position)
      if eval_every and position.global_step % eval_every == 0:
        evaluate_mid_epoch()
  return sums


def results_line(metrics: Dict[str, object], model_dir: str) -> str:
  """The closing line of a job: its test metrics, and where its outputs are (the report
  where it was drawn: --noreport, or a failure to draw it, leaves none)."""
  report = os.path.join(model_dir, "report", "report.md")
  outputs = [f"metrics {os.path.join(model_dir, 'metrics.json')}",
             f"export {os.path.join(model_dir, 'export')}"]
  if tf.io.gfile.exists(report):
    outputs.append(f"report {report}")
  return (f"test accuracy {metrics['test_accuracy']:.4f}, reconstruction_mse "
          f"{metrics['test_reconstruction_mse']:.4f}; {', '.join(outputs)}")


def finished_metrics(config: TrainConfig, epochs_done: int,
                     checkpoint: Optional[str]) -> Optional[Dict[str, object]]:
  """The metrics of a finished job in `config.model_dir`, or None where there is work left.

  `epochs_done` is what the restored `checkpoint` holds. A job is finished when metrics.json
  exists beside a checkpoint of its last epoch's end: metrics.json is written last, so a job
  killed after that checkpoint but before it is not finished, and completes its export and
  report when run again. A larger --epochs extends a finished job; a smaller one than the
  epochs trained is refused.
  """
  if epochs_done > config.epochs:
    raise UserInputError(
        f"--epochs={config.epochs} is fewer than the {epochs_done} epochs the checkpoint "
        f"{checkpoint} has trained; pass --epochs={epochs_done} or more, or a new --model_dir")
  metrics_path = os.path.join(config.model_dir, "metrics.json")
  if epochs_done < config.epochs or not tf.io.gfile.exists(metrics_path):
    return None
  try:
    with tf.io.gfile.GFile(metrics_path) as f:
      metrics = json.load(f)
  except ValueError as e:
    raise UserInputError(f"{metrics_path} is not a job's metrics ({first_line(e)}); delete it "
                         "and run again to evaluate and export the trained model") from None
  # Those of the checkpoint's epoch, not left by a shorter run that this one extended and
  # that stopped (SIGTERM at its last step, say) before replacing them.
  return metrics if metrics.get("epochs") == epochs_done else None


def run(config: TrainConfig, strategy: tf.distribute.Strategy,
        splits: Optional[data_lib.Splits] = None,
        on_evaluation: Optional[Callable[[int, Callable[[str], Dict[str, float]]], None]] = None
        ) -> Dict[str, object]:
  """Trains, evaluates and exports the multitask model; returns the final metrics.

  `splits` defaults to the source `config.dataset` names; tests and notebooks may pass their
  own. Resumes from the latest checkpoint when there is one; a finished job (see
  `finished_metrics`) returns its metrics and writes nothing. Raises `UserInputError` for bad
  input and a diverged loss, and `preemption.Preempted` after saving on SIGTERM.

  `on_evaluation(global_step, evaluate)`, where given, is called every `eval_every_steps` and
  at each epoch's end; `evaluate("validation")` or `evaluate("test")` returns that split's
  metrics. Without it, the job logs validation metrics every `eval_every_steps`.
  """
  if os.environ.get("CLOUD_ML_JOB_ID"):
    logging.info("Vertex AI job %s.", os.environ["CLOUD_ML_JOB_ID"])
  keras.utils.set_random_seed(config.seed)
  if config.deterministic:
    # Process-wide: the input pipeline is deterministic anyway, this makes the kernels so.
    tf.config.experimental.enable_op_determinism()

  if not config.steps_per_loop:
    config = dataclasses.replace(config,
                                 steps_per_loop=distribution.default_steps_per_loop(strategy))

  # Data, checked before anything is written.
  if splits is None:
    splits = data_lib.load_splits(config.dataset, config.data_dir)
  global_batch = config.batch_size
  data_lib.per_replica_batch_size(global_batch, strategy.num_replicas_in_sync)
  steps_per_epoch = data_lib.steps_per_epoch(len(splits.train), global_batch)
  labeled = data_lib.labeled_subset(splits.train, config.labeled_examples, config.seed)
  data_lib.labeled_per_batch(global_batch // strategy.num_replicas_in_sync, labeled)

  # Outputs: checked before any work that could be lost.
  chief = is_chief(strategy)
  dirs = _output_dirs(config, chief)

  # Model.
  policy = distribution.resolve_precision(config.precision, strategy)
  model, optimizer, position, weighting, checkpoint = build_training_state(
      config, strategy, policy, steps_per_epoch)

  # Restore.
  latest = restore_latest(checkpoint, checkpoint_dir(config))
  finished = finished_metrics(config, position.epoch, latest)
  if finished is not None:  # Run again: say where its results are, and write nothing.
    logging.info("This job has already trained its %d epochs; its results: %s", config.epochs,
                 results_line(finished, config.model_dir))
    return finished
  if latest:
    logging.info("Resuming from %s: epoch %d of %d, step %d of %d.", latest, position.epoch + 1,
                 config.epochs, position.step, steps_per_epoch)
  manager = tf.train.CheckpointManager(checkpoint, dirs["checkpoints"],
                                       max_to_keep=config.checkpoints_to_keep)
  history_path = os.path.join(config.model_dir, "history.json")
  history = read_history(history_path, position.epoch)

  # Train.
  train_data = data_lib.distribute_training(
      strategy, splits.train, global_batch, config.seed, config.shift_pixels,
      start_epoch=position.epoch, start_step=position.step, labeled_indices=labeled)
  validation_data = data_lib.distribute_evaluation(strategy, splits.validation, global_batch)
  test_data = data_lib.distribute_evaluation(strategy, splits.test, global_batch)
  train_loop = make_train_loop(strategy, model, optimizer, weighting, config.jit_compile,
                               semi_supervised=labeled is not None)
  evaluate = make_evaluate(strategy, model)
  writers = None  # Created at the first epoch's end: a job that stops before writes no logs.
  epoch_timings = []  # (images, seconds) of each whole epoch this process trained.
  validation_metrics = None
  train_iterator = iter(train_data)

  def evaluate_split(name: str) -> Dict[str, float]:
    return losses.means(evaluate({"validation": validation_data, "test": test_data}[name]).numpy())

  def log_validation(global_step: int, evaluate_split) -> None:
    metrics = evaluate_split("validation")
    logging.info("step %d: validation accuracy %.4f, reconstruction_mse %.4f", global_step,
                 metrics["accuracy"], metrics["reconstruction_mse"])

  def evaluate_mid_epoch() -> None:
    (on_evaluation or log_validation)(position.global_step, evaluate_split)

  with preemption.sigterm_flag() as termination:
    while position.epoch < config.epochs:
      first_step = position.step
      started = time.perf_counter()
      progress = (progress_lib.Progress(position.epoch + 1, config.epochs, steps_per_epoch,
                                        global_batch) if chief else None)
      sums = train_epoch(train_loop, train_iterator, position, config, termination, manager,
                         progress, evaluate_mid_epoch)
      seconds = time.perf_counter() - started
      position.start_next_epoch()
      steps_run = steps_per_epoch - first_step
      images_per_second = steps_run * global_batch / seconds
      if first_step == 0:
        epoch_timings.append((steps_run * global_batch, seconds))
      train_metrics = {**losses.means(sums), "loss": sums[TOTAL_LOSS] / steps_run}
      validation_metrics = evaluate_split("validation")
      # The history first, then the checkpoint: a job stopped between the two trains this
      # epoch again and rewrites its entry, where the other order would lose it.
      history = [entry for entry in history if entry["epoch"] < position.epoch] + [{
          "epoch": position.epoch, "train": train_metrics, "validation": validation_metrics,
          "loss_weights": weighting.weights()}]
      if chief:
        _write_json(history_path, {"epochs": history})
      save_checkpoint(manager, position)
      writers = writers or {
          split: (tf.summary.create_file_writer(os.path.join(dirs["logs"], split)) if chief
                  else tf.summary.create_noop_writer()) for split in ("train", "validation")}
      _log_epoch(writers, optimizer, history[-1], config.epochs, images_per_second)
      if on_evaluation:
        on_evaluation(position.global_step, evaluate_split)

  # Evaluate. The first epoch of a process includes tracing and compilation: leave it out.
  steady = epoch_timings[1:] or epoch_timings
  test_metrics = evaluate_split("test")
  if validation_metrics is None:  # Trained to the end before, but stopped before metrics.json.
    validation_metrics = evaluate_split("validation")
  metrics = {
      "test_accuracy": test_metrics["accuracy"],
      "test_reconstruction_mse": test_metrics["reconstruction_mse"],
      "test_classifier_loss": test_metrics["classifier_loss"],
      "validation_accuracy": validation_metrics["accuracy"],
      "validation_reconstruction_mse": validation_metrics["reconstruction_mse"],
      "epochs": config.epochs,
      "global_batch_size": global_batch,
      "num_replicas": strategy.num_replicas_in_sync,
      "strategy": distribution.strategy_name(strategy),
      "precision": policy,
      "train_images_per_second": (sum(i for i, _ in steady) / sum(s for _, s in steady)
                                  if steady else None),
      "dataset": config.dataset,
      "train_examples": len(splits.train),
      "labeled_examples": len(splits.train) if labeled is None else len(labeled),
      "loss_weights_final": weighting.weights(),
      "config": dataclasses.asdict(config),
  }

  # Export and report, then the metrics beside them: metrics.json is written last, so where it
  # exists the export is complete, even on object stores (gs://), where renaming a directory
  # is not atomic.
  metrics_path = os.path.join(config.model_dir, "metrics.json")
  if chief and tf.io.gfile.exists(metrics_path):
    tf.io.gfile.remove(metrics_path)
  export_lib.export_saved_model(model, dirs["export"])
  if chief and config.report:
    _write_report(dirs, splits.test, history, metrics, config.model_dir)
  if chief:
    _write_json(metrics_path, metrics)
    tuning.report(metrics["validation_accuracy"], position.global_step)
    logging.info("Done: %s", results_line(metrics, config.model_dir))
  return metrics
