"""The training loop: one custom loop that runs under every tf.distribute strategy.

Keras 3.15's `model.fit` fails under MultiWorkerMirroredStrategy, so this module owns the loop,
as the Model Garden's trainers do. The state is one checkpointed global step (the epoch is
derived from it) with the model, the optimizer and the running sums of the epoch in progress.
The outer loop is Orbit's: each call into the device runs `min(steps_per_loop, steps to the
next scheduled action)` steps of `strategy.run` in a `tf.function`, keeping its sums on the
device, and the host then asks each periodic action whether it is its time (big_vision's
`itstime`): the epoch's end (validation, history, TensorBoard, checkpoint), a mid-run
evaluation, a checkpoint, a preemption stop. `run` reads in three stages: setup, fit, finalize.

Faults: the input pipeline is a pure function of the global step, so a resumed job reads what
an uninterrupted one would, and its epoch metrics are the whole epoch's. SIGTERM saves and
raises `preemption.Preempted`; a non-finite loss, gradient or weight stops the job before it
saves anything from the call where it happened.
"""

import dataclasses
import time
from typing import Callable, Dict, List, Optional

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from trainer import config as config_lib
from trainer import data as data_lib
from trainer import distribution
from trainer import export as export_lib
from trainer import losses
from trainer import outputs as outputs_lib
from trainer import preemption
from trainer import progress as progress_lib
from trainer import tuning
from trainer.config import TrainConfig, UserInputError, first_line
from trainer.model import build_model

# What a training call sums over its steps: the batch sums, the total loss (each step's is
# already a mean over the global batch), and how many replicas saw non-finite gradients or
# hold non-finite weights after the update.
EPOCH_SUMS = losses.SUMS + ("loss",)  # Checkpointed in this order, for the epoch in progress.
HEALTH = ("nonfinite_gradients", "nonfinite_weights")
STEP_SUMS = EPOCH_SUMS + HEALTH

Evaluate = Callable[[str], Dict[str, float]]


def is_chief(strategy: tf.distribute.Strategy) -> bool:
  """True on the one worker that writes shared outputs (every single-host strategy's)."""
  return bool(strategy.extended.should_checkpoint)


def itstime(step: int, every: int) -> bool:
  """Whether a periodic action of period `every` steps (0: never) is due at `step`."""
  return every > 0 and step > 0 and step % every == 0


def steps_to_next(step: int, every: int) -> Optional[int]:
  """Steps from `step` to the next multiple of `every` (None for 0: never)."""
  return every - step % every if every > 0 else None


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
                    semi_supervised: bool = False, unlabeled_loss: str = "none",
                    unlabeled_weight: float = 1.0, pseudo_label_threshold: float = 0.95):
  """A `tf.function(iterator, num_steps, stop_requested)` that trains `num_steps` steps.

  `weighting` combines the task losses (a `losses` weighting, or a dict of fixed weights);
  its own variables, if any, train with the model's. Returns the STEP_SUMS of the steps (a
  dict of tensors, kept on the device across the call), the index of the first step whose
  loss, metrics, gradients or updated weights were not finite (-1 if none; `divergence`
  says which), and whether any worker's `stop_requested` was true: every worker gets the
  same answer, so all stop at the same step. The loss alone is not enough: some CPU kernels
  turn NaN activations into finite outputs, so weights can go NaN while the loss stays
  finite. With `jit_compile`, XLA compiles each replica's forward and backward pass; the
  gradients' all-reduce and the update stay outside it, as every strategy needs.
  `semi_supervised` batches have unlabelled examples, whose number the replicas must add up
  each step; otherwise both counts are the global batch. An `unlabeled_loss` other than
  "none" (`losses.unlabeled_loss`, weighted by `unlabeled_weight`) takes batches whose images
  are pairs (input, strong view) and runs the model on both.
  """
  if isinstance(weighting, dict):
    weighting = losses.FixedWeighting(weighting)
  variables = model.trainable_variables + weighting.trainable_variables

  def sums_loss_and_gradients(images, targets, weights, counts):
    with tf.GradientTape() as tape:
      if unlabeled_loss != "none":
        images, view = images
      outputs = model(images, training=True)
      cross_entropy, mse, correct = losses.per_example_losses_of(outputs, targets)
      loss = weighting.total(losses.task_losses(cross_entropy, mse, weights, counts),
                             strategy.num_replicas_in_sync)
      if unlabeled_loss != "none":
        loss += unlabeled_weight * losses.unlabeled_loss(
            unlabeled_loss, outputs[config_lib.CLASSIFIER],
            model(view, training=True)[config_lib.CLASSIFIER], weights, counts,
            pseudo_label_threshold)
      scaled_loss = optimizer.scale_loss(loss)  # Loss scaling under float16; identity otherwise.
    gradients = tape.gradient(scaled_loss, variables)
    return {**losses.batch_sums(cross_entropy, mse, correct, weights), "loss": loss}, gradients

  if jit_compile:
    sums_loss_and_gradients = tf.function(sums_loss_and_gradients, jit_compile=True)

  def train_step(inputs):
    images, targets, weights = inputs
    if semi_supervised:  # Counted outside the XLA-compiled part: collectives stay out of it.
      counts = losses.global_counts(weights)
    else:
      counts = tf.fill([2], tf.cast(tf.shape(weights[config_lib.DECODER])[0]
                                    * strategy.num_replicas_in_sync, tf.float32))
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
    sums = {**sums, "nonfinite_gradients": bad_gradients, "nonfinite_weights": bad_weights}
    # One vector, in STEP_SUMS order: MultiWorkerMirroredStrategy's reduce takes no dicts.
    return tf.stack([tf.cast(sums[name], tf.float32) for name in STEP_SUMS])

  @tf.function
  def train_loop(iterator, num_steps, stop_requested):
    # No data-dependent exit: the host reads the sums once per call, never once per step.
    sums = tf.zeros([len(STEP_SUMS)])
    first_bad = tf.constant(-1)
    health = [STEP_SUMS.index(name) for name in HEALTH]
    for index in tf.range(num_steps):
      step = strategy.reduce(tf.distribute.ReduceOp.SUM,
                             strategy.run(train_step, args=(next(iterator),)), axis=None)
      bad = tf.logical_or(tf.logical_not(_all_finite([step])),
                          tf.reduce_sum(tf.gather(step, health)) > 0)
      first_bad = tf.where(tf.logical_and(first_bad < 0, bad), index, first_bad)
      sums += step
    requests = strategy.reduce(tf.distribute.ReduceOp.SUM,
                               strategy.run(tf.identity, args=(stop_requested,)), axis=None)
    return dict(zip(STEP_SUMS, tf.unstack(sums))), first_bad, requests > 0

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
    sums = losses.batch_sums(cross_entropy, mse, correct, weights)
    return tf.stack([sums[name] for name in losses.SUMS])  # See train_step: no dicts.

  @tf.function
  def evaluate_batch(inputs):
    return strategy.reduce(tf.distribute.ReduceOp.SUM, strategy.run(eval_step, args=(inputs,)),
                           axis=None)

  def evaluate(dataset) -> Dict[str, float]:
    sums = tf.zeros([len(losses.SUMS)])
    for inputs in dataset:
      sums += evaluate_batch(inputs)
    return dict(zip(losses.SUMS, sums.numpy().tolist()))

  return evaluate


def divergence(sums: Dict[str, float]) -> Optional[str]:
  """What went non-finite in a training call's sums, or None where training is healthy."""
  if sums["nonfinite_gradients"]:
    return "non-finite gradients"
  if sums["nonfinite_weights"]:
    return "non-finite weights"
  if not np.isfinite(list(sums.values())).all():
    return f"a non-finite loss ({sums['loss']})"
  return None


@dataclasses.dataclass
class TrainingState:
  """What a checkpoint holds: the model, the optimizer, the task weighting, one global step,
  and the running sums of the epoch in progress (so a resumed epoch's metrics are whole)."""
  model: keras.Model
  optimizer: keras.optimizers.Optimizer
  weighting: object
  global_step: tf.Variable
  epoch_sums: tf.Variable
  checkpoint: tf.train.Checkpoint


def default_model(config: TrainConfig) -> keras.Model:
  """The job's model, shaped by the configuration."""
  return build_model(config.latent_dim, config.width)


def build_training_state(config: TrainConfig, strategy: tf.distribute.Strategy, policy: str,
                         steps_per_epoch: int,
                         model_fn: Callable[[TrainConfig], keras.Model] = default_model
                         ) -> TrainingState:
  """The model, optimizer, step and sums, and their checkpoint, created inside the strategy
  scope; `policy` is the dtype policy in force (`configure_process` set it)."""
  with strategy.scope():
    model = model_fn(config)
    weighting = losses.make_weighting(config.loss_weighting, config.loss_weights)
    variables = model.trainable_variables + weighting.trainable_variables
    # A linear warm-up, then cosine decay to zero over the rest of the run: the last epochs
    # settle instead of bouncing. A run too short for its warm-up warms up over its first
    # fifth instead: otherwise it would end at the peak rate, untrained by the decay.
    total_steps = config.epochs * steps_per_epoch
    warmup = min(config.warmup_steps, total_steps // 5)
    schedule = keras.optimizers.schedules.CosineDecay(
        0.0 if warmup else config.learning_rate,
        decay_steps=max(1, total_steps - warmup),
        warmup_target=config.learning_rate if warmup else None, warmup_steps=warmup)
    optimizer = keras.optimizers.AdamW(schedule, weight_decay=config.weight_decay)
    # Decaying the learned task weights would pull them toward equal weighting.
    optimizer.exclude_from_weight_decay(var_list=weighting.trainable_variables)
    optimizer.build(variables)
    # The checkpoint holds the inner optimizer and a loss scale under every precision, so a
    # checkpoint restores whatever the precision; under float16 the scale and its growth
    # counter are the LossScaleOptimizer's own, so a GPU resume is as exact as a CPU one.
    checkpointed_optimizer = optimizer
    if policy == "mixed_float16":
      optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
      optimizer.build(variables)
      loss_scale = tf.train.Checkpoint(scale=optimizer.dynamic_scale,
                                       growth_counter=optimizer.step_counter)
    else:
      loss_scale = tf.train.Checkpoint(scale=tf.Variable(2.0 ** 15, trainable=False),
                                       growth_counter=tf.Variable(0, dtype=tf.int64,
                                                                  trainable=False))
    global_step = tf.Variable(0, dtype=tf.int64, trainable=False, name="global_step")
    epoch_sums = tf.Variable(tf.zeros([len(EPOCH_SUMS)], tf.float64), trainable=False,
                             name="epoch_sums")
    learned = {"loss_weighting": weighting} if weighting.trainable_variables else {}
    checkpoint = tf.train.Checkpoint(model=model, optimizer=checkpointed_optimizer,
                                     global_step=global_step, epoch_sums=epoch_sums,
                                     loss_scale=loss_scale, **learned)
  return TrainingState(model, optimizer, weighting, global_step, epoch_sums, checkpoint)


def restore_latest(checkpoint: tf.train.Checkpoint, directory: str) -> Optional[str]:
  """Restores the latest checkpoint in `directory`, if any; refuses one of another model.

  Only checkpoints that the CheckpointManager's state file names count: it names a
  checkpoint after all its files are written, so a save cut short is never trusted.
  """
  latest = tf.train.latest_checkpoint(directory)
  if not latest:
    return None
  saved = {name for name, _ in tf.train.list_variables(latest)}
  if "global_step/.ATTRIBUTES/VARIABLE_VALUE" not in saved:
    raise UserInputError(
        f"the checkpoint {latest} was written by an older version of this trainer (an epoch "
        "and a step counter, no global step); finish that run with the version that started "
        "it, or start this one in a new --model_dir")
  try:
    # Entries this model lacks (learned task weights under --loss_weighting=fixed, say) are
    # not caught here: the run's saved configuration refuses such a change first.
    checkpoint.restore(latest).assert_existing_objects_matched()
  except (AssertionError, ValueError, tf.errors.OpError) as e:
    raise UserInputError(
        f"the checkpoint {latest} does not fit this model ({first_line(e)[:200]}); use the "
        "flags it was trained with (e.g. --latent_dim) or a new --model_dir") from None
  return latest


@dataclasses.dataclass(frozen=True)
class BatchPlan:
  """How the training split is cut into steps, decided once and checked up front."""
  global_batch: int
  per_replica: int
  steps_per_epoch: int
  labeled: Optional[np.ndarray]  # Indices of the examples whose labels count; None: all.


def plan_batches(config: TrainConfig, num_replicas: int, train: data_lib.Split) -> BatchPlan:
  """The batch plan for `train`; raises `UserInputError` where the batch cannot be split."""
  per_replica = data_lib.per_replica_batch_size(config.batch_size, num_replicas)
  labeled = data_lib.labeled_subset(train, config.labeled_examples, config.seed)
  data_lib.labeled_per_batch(per_replica, labeled)  # Refuses a batch with no room for labels.
  return BatchPlan(config.batch_size, per_replica,
                   data_lib.steps_per_epoch(len(train), config.batch_size), labeled)


def describe_step(step: int, steps_per_epoch: int) -> str:
  """'step N (epoch E, step S)' for the N-th training step of the run, counted from 1."""
  return (f"step {step} (epoch {(step - 1) // steps_per_epoch + 1}, step "
          f"{(step - 1) % steps_per_epoch + 1})")


class _Throughput:
  """Images per second inside training calls only: not evaluation, checkpoints, or a
  process's first call (tracing and compilation)."""

  def __init__(self):
    self._first_call_done = False
    self.run = [0, 0.0]  # Images and seconds.
    self.epoch = [0, 0.0]

  def add(self, images: int, seconds: float) -> None:
    if not self._first_call_done:
      self._first_call_done = True
      return
    for totals in (self.run, self.epoch):
      totals[0] += images
      totals[1] += seconds

  def end_epoch(self) -> Optional[float]:
    """The epoch's images/s (None if only its first call ran in this process)."""
    images, seconds = self.epoch
    self.epoch = [0, 0.0]
    return images / seconds if seconds else None

  def overall(self) -> Optional[float]:
    return self.run[0] / self.run[1] if self.run[1] else None


@dataclasses.dataclass
class _Job:
  """Everything the fit and finalize stages share, set up once."""
  config: TrainConfig
  strategy: tf.distribute.Strategy
  splits: data_lib.Splits
  plan: BatchPlan
  policy: str
  outputs: outputs_lib.RunOutputs
  state: TrainingState
  manager: tf.train.CheckpointManager
  history: List[Dict]
  evaluate: Evaluate
  images_per_second: Optional[float] = None  # Set by `fit`.
  config_saved: bool = False  # config.json written by this process.


def configure_process(config: TrainConfig, strategy: tf.distribute.Strategy) -> str:
  """Makes the process-wide settings a job needs, once, before any model is built: the seeds,
  op determinism and the Keras dtype policy. The entry point calls it, and so do notebooks
  and tests, before `run`, which checks the policy. Returns the policy."""
  keras.utils.set_random_seed(config.seed)
  if config.deterministic:
    # The input pipeline is deterministic anyway; this makes the kernels so.
    tf.config.experimental.enable_op_determinism()
  policy = distribution.resolve_precision(config.precision, strategy)
  distribution.set_precision(policy)
  return policy


def setup(config: TrainConfig, strategy: tf.distribute.Strategy,
          splits: Optional[data_lib.Splits] = None,
          model_fn: Callable[[TrainConfig], keras.Model] = default_model):
  """Checks the data, the outputs and the checkpoint, builds and restores the model; returns
  a `_Job`, or the metrics of a finished job (which writes nothing)."""
  policy = distribution.resolve_precision(config.precision, strategy)
  if keras.mixed_precision.dtype_policy().name != policy:
    raise RuntimeError(f"the Keras dtype policy is {keras.mixed_precision.dtype_policy().name}, "
                       f"but the configuration asks for {policy}: call "
                       "train.configure_process(config, strategy) before train.run")
  if not config.steps_per_loop:
    config = dataclasses.replace(config,
                                 steps_per_loop=distribution.default_steps_per_loop(strategy))
  # Data, checked before anything is written.
  splits = splits or data_lib.load_splits(config.dataset, config.data_dir)
  plan = plan_batches(config, strategy.num_replicas_in_sync, splits.train)
  # Outputs: checked before any work that could be lost.
  outputs = outputs_lib.RunOutputs(config, is_chief(strategy))
  # The run's own settings: a restart that would change what it computes is refused here,
  # before the checkpoint is read (its own error would name a symptom, not the change).
  saved = outputs.read_config()
  for change in config_lib.resume_changes(saved, config) if saved else []:
    logging.info("Changed since this run was last started: %s", change)
  state = build_training_state(config, strategy, policy, plan.steps_per_epoch, model_fn)
  latest = restore_latest(state.checkpoint, outputs_lib.checkpoint_dir(config))
  step = int(state.global_step.numpy())
  epochs_done = step // plan.steps_per_epoch
  finished = outputs.finished_metrics(config.epochs, epochs_done, latest)
  if finished is not None:  # Run again: say where its results are, and write nothing.
    logging.info("This job has already trained its %d epochs; its results: %s", config.epochs,
                 outputs_lib.results_line(finished, config.model_dir))
    return finished
  if latest:
    logging.info("Resuming from %s: epoch %d of %d, step %d of %d.", latest,
                 epochs_done + 1, config.epochs, step % plan.steps_per_epoch,
                 plan.steps_per_epoch)
  manager = tf.train.CheckpointManager(state.checkpoint, outputs.checkpoints,
                                       max_to_keep=config.checkpoints_to_keep)
  evaluate_dataset = make_evaluate(strategy, state.model)
  datasets = {name: data_lib.distribute_evaluation(strategy, getattr(splits, name),
                                                   plan.global_batch)
              for name in ("validation", "test")}
  return _Job(config, strategy, splits, plan, policy, outputs, state, manager,
              outputs.read_history(epochs_done),
              lambda name: losses.means(evaluate_dataset(datasets[name])))


def _save(job: _Job) -> str:
  """Saves a checkpoint numbered by global step; returns its path. The first save of a process
  writes the run's configuration first: by then every check has passed and training is sound,
  so neither refused input nor a divergence at the first steps changes a file."""
  if not job.config_saved:
    job.outputs.write_config(job.config)
    job.config_saved = True
  return job.manager.save(checkpoint_number=int(job.state.global_step.numpy()))


def _end_epoch(job: _Job, step: int, throughput: _Throughput) -> Dict[str, float]:
  """The epoch's metrics, validation, history and TensorBoard, then its checkpoint. The
  history is written first: a job stopped between the two trains the epoch again and
  rewrites its entry, where the other order would lose it. Returns the validation metrics."""
  spe = job.plan.steps_per_epoch
  sums = dict(zip(EPOCH_SUMS, job.state.epoch_sums.numpy()))
  validation = job.evaluate("validation")
  entry = {"epoch": step // spe, "train": {**losses.means(sums), "loss": sums["loss"] / spe},
           "validation": validation, "loss_weights": job.state.weighting.weights()}
  job.history = job.outputs.record_epoch(
      job.history, entry, job.config.epochs,
      float(job.state.optimizer.learning_rate.numpy()), throughput.end_epoch())
  job.state.epoch_sums.assign(tf.zeros_like(job.state.epoch_sums))
  _save(job)
  return validation


def fit(job: _Job, on_evaluation=None) -> Optional[Dict[str, float]]:
  """Trains to the last step of the last epoch; returns the last validation metrics (None
  where no epoch ended in this process)."""
  config, plan, state = job.config, job.plan, job.state
  spe, total = plan.steps_per_epoch, config.epochs * plan.steps_per_epoch
  step = int(state.global_step.numpy())
  train_loop = make_train_loop(job.strategy, state.model, state.optimizer, state.weighting,
                               config.jit_compile, semi_supervised=plan.labeled is not None,
                               unlabeled_loss=config.unlabeled_loss,
                               unlabeled_weight=config.unlabeled_weight,
                               pseudo_label_threshold=config.pseudo_label_threshold)
  iterator = iter(data_lib.distribute_training(
      job.strategy, job.splits.train, plan.global_batch, config.seed, config.shift_pixels,
      start_epoch=step // spe, start_step=step % spe, labeled_indices=plan.labeled,
      input_noise=config.input_noise, second_view=config.unlabeled_loss != "none"))
  throughput, progress, last = _Throughput(), None, {}

  def log_validation(global_step: int, evaluate: Evaluate) -> None:
    metrics = evaluate("validation")
    logging.info("step %d: validation accuracy %.4f, reconstruction_mse %.4f", global_step,
                 metrics["accuracy"], metrics["reconstruction_mse"])

  def epoch_end(at: int) -> None:
    last["validation"] = _end_epoch(job, at, throughput)
    if on_evaluation:
      on_evaluation(at, job.evaluate)

  # Periodic actions, in the order they run when several are due at one step.
  actions = [
      (spe, epoch_end),
      (config.eval_every_steps,
       lambda at: None if itstime(at, spe) else (on_evaluation or log_validation)(at, job.evaluate)),
      (config.checkpoint_every_steps, lambda at: None if itstime(at, spe) else _save(job)),
  ]
  with preemption.sigterm_flag() as termination:
    while step < total:
      steps = min([config.steps_per_loop, total - step]
                  + [s for s in (steps_to_next(step, every) for every, _ in actions) if s])
      if step % spe == 0 or progress is None:
        progress = (progress_lib.Progress(step // spe + 1, config.epochs, spe, plan.global_batch)
                    if job.outputs.chief else None)
      started = time.perf_counter()
      sums, first_bad, stop = train_loop(iterator, tf.constant(steps),
                                         tf.constant(float(termination.requested)))
      sums, first_bad = {name: float(value) for name, value in sums.items()}, int(first_bad)
      throughput.add(steps * plan.global_batch, time.perf_counter() - started)
      if first_bad >= 0:
        raise UserInputError(
            f"training diverged: {divergence(sums)} at {describe_step(step + first_bad + 1, spe)}"
            "; stopped without saving; the last good checkpoint is "
            f"{job.manager.latest_checkpoint or 'none (delete --model_dir to start over)'}; "
            "lower --learning_rate or check the data")
      state.global_step.assign_add(steps)
      state.epoch_sums.assign_add([sums[name] for name in EPOCH_SUMS])
      step += steps
      if progress:
        progress.update((step - 1) % spe + 1, sums["loss"] / steps)
      for every, action in actions:
        if itstime(step, every):
          action(step)
      if bool(stop):
        saved = itstime(step, spe) or itstime(step, config.checkpoint_every_steps)
        raise preemption.Preempted(
            f"checkpoint {job.manager.latest_checkpoint if saved else _save(job)} saved at "
            f"epoch {step // spe + 1}, step {step % spe}")
  job.images_per_second = throughput.overall()
  return last.get("validation")


def finalize(job: _Job, validation: Optional[Dict[str, float]]) -> Dict[str, object]:
  """Evaluates on test, exports, draws the report and writes metrics.json, in that order:
  metrics.json, written last, marks the outputs complete. Returns the metrics."""
  config, outputs = job.config, job.outputs
  test = job.evaluate("test")
  validation = validation or job.evaluate("validation")  # Trained before, not yet exported.
  metrics = {
      "test_accuracy": test["accuracy"],
      "test_reconstruction_mse": test["reconstruction_mse"],
      "test_classifier_loss": test["classifier_loss"],
      "validation_accuracy": validation["accuracy"],
      "validation_reconstruction_mse": validation["reconstruction_mse"],
      "epochs": config.epochs,
      "global_batch_size": job.plan.global_batch,
      "num_replicas": job.strategy.num_replicas_in_sync,
      "strategy": distribution.strategy_name(job.strategy),
      "precision": job.policy,
      "train_images_per_second": job.images_per_second,
      "dataset": config.dataset,
      "train_examples": len(job.splits.train),
      "labeled_examples": (len(job.splits.train) if job.plan.labeled is None
                           else len(job.plan.labeled)),
      "loss_weights_final": job.state.weighting.weights(),
      "config": dataclasses.asdict(config),
  }
  outputs.unmark_complete()
  export_lib.export_saved_model(job.state.model, outputs.export)
  if config.report:
    outputs.write_report(job.splits.test, job.history, metrics)
  outputs.write_metrics(metrics)
  if outputs.chief:
    tuning.report(metrics["validation_accuracy"], int(job.state.global_step.numpy()))
    logging.info("Done: %s", outputs_lib.results_line(metrics, config.model_dir))
  return metrics


def run(config: TrainConfig, strategy: tf.distribute.Strategy,
        splits: Optional[data_lib.Splits] = None,
        on_evaluation: Optional[Callable[[int, Evaluate], None]] = None,
        model_fn: Callable[[TrainConfig], keras.Model] = default_model) -> Dict[str, object]:
  """Trains, evaluates and exports the multitask model; returns the final metrics.

  `splits` defaults to the source `config.dataset` names; tests and notebooks may pass their
  own. Resumes from the latest checkpoint when there is one; a finished job returns its
  metrics and writes nothing. Raises `UserInputError` for bad input and divergence, and
  `preemption.Preempted` after saving on SIGTERM.

  `on_evaluation(global_step, evaluate)`, where given, is called every `eval_every_steps` and
  at each epoch's end; `evaluate("validation")` or `evaluate("test")` returns that split's
  metrics. Without it, the job logs validation metrics every `eval_every_steps`.
  `model_fn(config)` builds the model (benchmarks/levers.py passes variants of the default).
  """
  job = setup(config, strategy, splits, model_fn)
  if not isinstance(job, _Job):
    return job
  return finalize(job, fit(job, on_evaluation))
