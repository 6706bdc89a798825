"""The multitask task: a shared encoder, a classifier and a decoder, trained on one loss.

After Model Garden's `Task`: it builds the state (model, optimizer, task weighting) inside the
strategy scope, and gives the job (`trainer.job.train.Task`) the per-replica training step, the
datasets and the logs; it owns its metrics (`SUMS`, `batch_sums`, `means`: what they are is
said here alone, and reaches history.json, metrics.json, the log and TensorBoard from here),
evaluates, exports and draws its report. It knows nothing of scheduling: when to evaluate,
save or stop is the controller's. `make_task` builds it, with its data and batch plan.

The semi-supervised objectives live here, in the step: batches whose classifier weights
mark some examples unlabelled, and, with an unlabelled loss, pairs (input, strong view).
"""

import dataclasses
from typing import Callable, Dict, List, Mapping, Optional

import keras
import numpy as np
import tensorflow as tf

from trainer.config import TrainConfig
from trainer.data import pipeline as data_lib
from trainer.data import sources
from trainer.multitask import CLASSIFIER, DECODER, losses
from trainer.multitask import export as export_lib
from trainer.multitask.model import build_model

# The sums each batch yields, by name (`batch_sums`); the metrics are their means, taken on
# the host (`means`).
SUMS = ("classifier_loss", "reconstruction_mse", "correct", "labeled", "examples")
HEALTH = ("nonfinite_gradients", "nonfinite_weights")  # See controller.HEALTH_PREFIX.
# What a step returns, summed over replicas and steps: the batch sums, the total loss (each
# step's is already a mean over the global batch), and the replicas that went non-finite.
TRAIN_OUTPUTS = SUMS + ("loss",) + HEALTH


def batch_sums(cross_entropy, mse, correct, weights: Dict[str, tf.Tensor]) -> Dict[str, tf.Tensor]:
  """The SUMS of one batch, by name: each task counts only the examples its weight keeps."""
  labeled, images = weights[CLASSIFIER], weights[DECODER]
  return {"classifier_loss": tf.reduce_sum(cross_entropy * labeled),
          "reconstruction_mse": tf.reduce_sum(mse * images),
          "correct": tf.reduce_sum(correct * labeled), "labeled": tf.reduce_sum(labeled),
          "examples": tf.reduce_sum(images)}


def means(sums: Mapping[str, float]) -> Dict[str, float]:
  """The metrics, from summed SUMS: classification over labelled examples, MSE over all."""
  totals = {name: float(sums[name]) for name in SUMS}
  return {
      "classifier_loss": totals["classifier_loss"] / max(totals["labeled"], 1.0),
      "reconstruction_mse": totals["reconstruction_mse"] / max(totals["examples"], 1.0),
      "accuracy": totals["correct"] / max(totals["labeled"], 1.0),
  }


def default_model(config: TrainConfig) -> keras.Model:
  """The job's model, shaped by the configuration."""
  return build_model(config.latent_dim, config.width)


@dataclasses.dataclass(frozen=True)
class BatchPlan:
  """How the training split is cut into steps, decided once and checked up front."""
  global_batch: int
  per_replica: int
  steps_per_epoch: int
  labeled: Optional[np.ndarray]  # Indices of the examples whose labels count; None: all.


def plan_batches(config: TrainConfig, num_replicas: int, train: sources.Split) -> BatchPlan:
  """The batch plan for `train`; raises `UserInputError` where the batch cannot be split."""
  per_replica = data_lib.per_replica_batch_size(config.batch_size, num_replicas)
  steps_per_epoch = data_lib.steps_per_epoch(len(train), config.batch_size)
  data_lib.check_epoch_coverage(len(train), config.batch_size, num_replicas)
  labeled = data_lib.labeled_subset(train, config.labeled_examples, config.seed)
  data_lib.labeled_per_batch(per_replica, labeled)  # Refuses a batch with no room for labels.
  return BatchPlan(config.batch_size, per_replica, steps_per_epoch, labeled)


def _all_finite(tensors) -> tf.Tensor:
  return tf.reduce_all([tf.reduce_all(tf.math.is_finite(t)) for t in tensors])


def agree_on_overflow(gradients):
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


def learning_rate_schedule(config: TrainConfig,
                           total_steps: int) -> keras.optimizers.schedules.LearningRateSchedule:
  """A linear warm-up, then cosine decay to zero over the rest of the run: the last epochs
  settle instead of bouncing. A run too short for its warm-up warms up over its first fifth
  instead: otherwise it would end at the peak rate, untrained by the decay."""
  warmup = min(config.warmup_steps, total_steps // 5)
  return keras.optimizers.schedules.CosineDecay(
      0.0 if warmup else config.learning_rate, decay_steps=max(1, total_steps - warmup),
      warmup_target=config.learning_rate if warmup else None, warmup_steps=warmup)


def make_optimizer(config: TrainConfig, total_steps: int) -> keras.optimizers.Optimizer:
  """AdamW on `learning_rate_schedule`."""
  return keras.optimizers.AdamW(learning_rate_schedule(config, total_steps),
                                weight_decay=config.weight_decay)


class MultitaskTask:
  """The multitask model's training and evaluation under `strategy` (see `train.Task`).

  Builds its variables inside the strategy scope on construction; the Keras dtype policy
  `policy` must already be in force. `model_fn(config)` builds the model.
  """
  train_outputs = TRAIN_OUTPUTS
  headline = ("accuracy", "reconstruction_mse")

  def __init__(self, config: TrainConfig, strategy: tf.distribute.Strategy,
               splits: sources.Splits, plan: BatchPlan, policy: str,
               model_fn: Callable[[TrainConfig], keras.Model] = default_model):
    self.config, self.strategy, self.splits, self.plan = config, strategy, splits, plan
    self.steps_per_epoch, self.examples_per_step = plan.steps_per_epoch, plan.global_batch
    with strategy.scope():
      self.model = model_fn(config)
      self.weighting = losses.make_weighting(config.loss_weighting, config.loss_weights)
      self.variables = self.model.trainable_variables + self.weighting.trainable_variables
      self.optimizer = make_optimizer(config, config.epochs * plan.steps_per_epoch)
      # Decaying the learned task weights would pull them toward equal weighting.
      self.optimizer.exclude_from_weight_decay(var_list=self.weighting.trainable_variables)
      self.optimizer.build(self.variables)
      # The checkpoint holds the inner optimizer and a loss scale under every precision, so a
      # checkpoint restores whatever the precision; under float16 the scale and its growth
      # counter are the LossScaleOptimizer's own, so a GPU resume is as exact as a CPU one.
      self._checkpointed_optimizer = self.optimizer
      if policy == "mixed_float16":
        self.optimizer = keras.optimizers.LossScaleOptimizer(self.optimizer)
        self.optimizer.build(self.variables)
        self._loss_scale = tf.train.Checkpoint(scale=self.optimizer.dynamic_scale,
                                               growth_counter=self.optimizer.step_counter)
      else:
        self._loss_scale = tf.train.Checkpoint(
            scale=tf.Variable(2.0 ** 15, trainable=False),
            growth_counter=tf.Variable(0, dtype=tf.int64, trainable=False))
    self._forward_backward = (tf.function(self._sums_and_gradients, jit_compile=True)
                              if config.jit_compile else self._sums_and_gradients)
    self._evaluate_batch = None
    self._eval_datasets = {}

  def checkpoint_items(self) -> Dict[str, object]:
    learned = {"loss_weighting": self.weighting} if self.weighting.trainable_variables else {}
    return {"model": self.model, "optimizer": self._checkpointed_optimizer,
            "loss_scale": self._loss_scale, **learned}

  def train_dataset(self, start_step: int):
    return data_lib.distribute_training(
        self.strategy, self.splits.train, self.plan.global_batch,
        data_lib.TrainingInput(self.config.seed, self.config.shift_pixels,
                               self.config.input_noise, self.config.unlabeled_loss != "none",
                               self.plan.labeled), start_step)

  def _sums_and_gradients(self, images, targets, weights, counts):
    """One replica's forward and backward pass: its batch sums and total loss, and the
    gradients of the (scaled) loss. XLA may compile it: it holds no collective."""
    config = self.config
    with tf.GradientTape() as tape:
      if config.unlabeled_loss != "none":
        images, view = images
      outputs = self.model(images, training=True)
      cross_entropy, mse, correct = losses.per_example_losses_of(outputs, targets)
      loss = self.weighting.total(losses.task_losses(cross_entropy, mse, weights, counts),
                                  self.strategy.num_replicas_in_sync)
      if config.unlabeled_loss != "none":
        loss += config.unlabeled_weight * losses.unlabeled_loss(
            config.unlabeled_loss, outputs[CLASSIFIER],
            self.model(view, training=True)[CLASSIFIER], weights, counts,
            config.pseudo_label_threshold)
      scaled_loss = self.optimizer.scale_loss(loss)  # Loss scaling under float16 only.
    gradients = tape.gradient(scaled_loss, self.variables)
    return {**batch_sums(cross_entropy, mse, correct, weights), "loss": loss}, gradients

  def train_step(self, inputs) -> Dict[str, tf.Tensor]:
    """One replica's step; a loss, gradient or weight that is not finite shows in the
    outputs (the loss alone is not enough: some CPU kernels turn NaN activations into
    finite outputs, so weights can go NaN while the loss stays finite)."""
    images, targets, weights = inputs
    if self.plan.labeled is not None:  # Counted outside XLA: collectives stay out of it.
      counts = losses.global_counts(weights)
    else:
      counts = tf.fill([2], tf.cast(tf.shape(weights[DECODER])[0]
                                    * self.strategy.num_replicas_in_sync, tf.float32))
    sums, gradients = self._forward_backward(images, targets, weights, counts)
    if isinstance(self.optimizer, keras.optimizers.LossScaleOptimizer):
      # Overflowing scaled gradients are routine under float16: the optimizer skips the step
      # and lowers the scale. Divergence then shows in the loss or the weights.
      gradients = agree_on_overflow(gradients)
      bad_gradients = tf.constant(0.0)
    else:
      bad_gradients = 1.0 - tf.cast(_all_finite(gradients), tf.float32)
    self.optimizer.apply_gradients(zip(gradients, self.variables))
    bad_weights = 1.0 - tf.cast(_all_finite(self.variables), tf.float32)
    return {**sums, "nonfinite_gradients": bad_gradients, "nonfinite_weights": bad_weights}

  def train_logs(self, sums: Dict[str, float], steps: int) -> Dict[str, float]:
    return {"loss": sums["loss"] / steps, **means(sums)}

  def summaries(self) -> Dict[str, float]:
    weights = {f"loss_weight/{task}": value for task, value in self.weighting.weights().items()}
    return {"learning_rate": float(self.optimizer.learning_rate.numpy()), **weights}

  def evaluate(self, split_name: str) -> Dict[str, float]:
    """The metrics of `split_name` (validation or test), over its real examples.

    The host loops over the batches and calls a `tf.function` per batch, as Keras's evaluate
    does: measured on CPU, one in-graph loop over the dataset took 1.5 times as long.
    """
    if split_name not in self._eval_datasets:
      self._eval_datasets[split_name] = data_lib.distribute_evaluation(
          self.strategy, getattr(self.splits, split_name), self.plan.global_batch)
    self._evaluate_batch = self._evaluate_batch or tf.function(self._reduced_eval_step)
    sums = tf.zeros([len(SUMS)])
    for inputs in self._eval_datasets[split_name]:
      sums += self._evaluate_batch(inputs)
    return means(dict(zip(SUMS, sums.numpy().tolist())))

  def _reduced_eval_step(self, inputs):
    def eval_step(inputs):
      images, targets, weights = inputs
      cross_entropy, mse, correct = losses.per_example_losses(self.model, images, targets,
                                                              training=False)
      sums = batch_sums(cross_entropy, mse, correct, weights)
      return tf.stack([sums[name] for name in SUMS])  # No dicts: see the controller.
    return self.strategy.reduce(tf.distribute.ReduceOp.SUM,
                                self.strategy.run(eval_step, args=(inputs,)), axis=None)

  def epoch_state(self) -> Dict[str, Dict[str, float]]:
    return {"loss_weights": self.weighting.weights()}

  def learning_rate(self, step: int, total_steps: int) -> float:
    return float(learning_rate_schedule(self.config, total_steps)(step))

  def export(self, path: str) -> None:
    export_lib.export_saved_model(self.model, path)

  def export_problem(self, path: str) -> Optional[str]:
    return export_lib.export_problem(path)

  def run_facts(self) -> Dict[str, object]:
    train = self.splits.train
    return {
        "dataset": self.config.dataset,
        # What the model was trained on, for trainer.predict: its class names, and whether its
        # images' background is dark or light (predict inverts images whose background is not).
        "class_names": list(self.splits.class_names),
        "input_background": sources.background(train.images),
        "train_examples": len(train),
        "labeled_examples": len(train) if self.plan.labeled is None else len(self.plan.labeled),
    }

  def write_report(self, export_dir: str, history: List[Dict], metrics: Dict[str, object],
                   report_dir: str, summary_writer) -> None:
    from trainer.multitask import report# Here, not at the top: matplotlib takes a second to import.
    report.write_report(export_dir, self.splits.test, history, metrics, report_dir,
                        summary_writer)


def make_task(config: TrainConfig, strategy: tf.distribute.Strategy, policy: str,
              splits: Optional[sources.Splits] = None,
              model_fn: Callable[[TrainConfig], keras.Model] = default_model) -> MultitaskTask:
  """The task `config` describes, under `strategy` and the dtype policy `policy` (already in
  force): its splits (`config.dataset`'s unless given: tests and notebooks may pass their own)
  and batch plan checked first, then its variables built. `model_fn(config)` builds the
  model (benchmarks/levers.py passes variants of the default). As a `train.TaskFactory`:
  `functools.partial(make_task, splits=..., model_fn=...)`."""
  splits = splits or sources.load_splits(config.dataset, config.data_dir)
  plan = plan_batches(config, strategy.num_replicas_in_sync, splits.train)
  return MultitaskTask(config, strategy, splits, plan, policy, model_fn)
