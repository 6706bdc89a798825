"""The two tasks' losses: per-example losses, labelled-only classification, and task weighting.

Every batch carries per-output weights next to its targets: `classifier` is 1 where the
example's label may be used (0 for unlabelled training images and evaluation padding),
`decoder` is 1 for every real image. So semi-supervised training keeps static batch shapes:
the classifier learns from the labelled examples of each batch, the decoder from all.

Weighting of the two task losses into one:
  fixed        sum of weight x loss, with the weights of --loss_weights;
  uncertainty  learned, after Kendall, Gal and Cipolla (2018), "Multi-Task Learning Using
               Uncertainty to Weigh Losses": each task t has s_t = log(sigma_t^2) and adds
               exp(-s_t) x L_t / c_t + s_t / 2, with c = 1 for the classification (softmax
               likelihood) and c = 2 for the reconstruction (Gaussian likelihood). A task
               whose loss is small (the MSE) earns a large weight, 1 / (2 L_t) at the optimum.
"""

from typing import Dict

import keras
import numpy as np
import tensorflow as tf

from trainer.multitask import CLASSIFIER, DECODER, OUTPUT_NAMES
# Kendall et al.'s likelihood constants: 1 for a softmax, 2 for a Gaussian.
_LIKELIHOOD_SCALE = {CLASSIFIER: 1.0, DECODER: 2.0}


def per_example_losses(model: keras.Model, images, targets, training: bool):
  """Cross-entropy and reconstruction MSE for each example, and whether it was classified right."""
  return per_example_losses_of(model(images, training=training), targets)


def per_example_losses_of(outputs, targets):
  """`per_example_losses` from the model's `outputs`."""
  cross_entropy = keras.losses.sparse_categorical_crossentropy(
      targets[CLASSIFIER], outputs[CLASSIFIER])
  pixels = tf.cast(targets[DECODER], tf.float32) / 255.0
  mse = tf.reduce_mean(tf.square(outputs[DECODER] - pixels), axis=[1, 2, 3])
  correct = tf.cast(tf.equal(tf.argmax(outputs[CLASSIFIER], axis=-1, output_type=tf.int32),
                             tf.cast(targets[CLASSIFIER], tf.int32)), tf.float32)
  return cross_entropy, mse, correct


def global_counts(weights: Dict[str, tf.Tensor]) -> tf.Tensor:
  """[labelled examples, images] in the whole global batch (call in replica context)."""
  return tf.distribute.get_replica_context().all_reduce(tf.distribute.ReduceOp.SUM, tf.stack(
      [tf.reduce_sum(weights[CLASSIFIER]), tf.reduce_sum(weights[DECODER])]))


def metrics_from_outputs(probabilities: np.ndarray, reconstructions: np.ndarray,
                         split) -> Dict[str, float]:
  """A split's metrics from a model's outputs on all of it, as NumPy arrays: the same
  definitions (and Keras's clipping of probabilities) as the training job's evaluation."""
  labels = split.labels
  chosen = np.clip(probabilities[np.arange(len(labels)), labels], keras.config.epsilon(),
                   1 - keras.config.epsilon())
  pixels = split.images.reshape(reconstructions.shape).astype(np.float32) / 255.0
  return {"classifier_loss": float(np.mean(-np.log(chosen))),
          "reconstruction_mse": float(np.mean((reconstructions - pixels) ** 2)),
          "accuracy": float(np.mean(np.argmax(probabilities, axis=-1) == labels))}


def task_losses(cross_entropy, mse, weights: Dict[str, tf.Tensor],
                counts: tf.Tensor) -> Dict[str, tf.Tensor]:
  """This replica's share of each task's mean loss over the global batch.

  `counts` is `global_counts(weights)`. The classifier's mean is over the labelled examples
  of the whole global batch, the decoder's over all its images, so the gradients that the
  strategy sums across replicas are those of the global means. Unlabelled examples add
  nothing to the classifier's loss.
  """
  return {CLASSIFIER: tf.reduce_sum(cross_entropy * weights[CLASSIFIER]) / tf.maximum(counts[0], 1.0),
          DECODER: tf.reduce_sum(mse * weights[DECODER]) / tf.maximum(counts[1], 1.0)}


def unlabeled_loss(kind: str, input_probabilities, view_probabilities, weights, counts,
                   threshold: float) -> tf.Tensor:
  """This replica's share of the mean unlabelled loss over the global batch's unlabelled images.

  `input_probabilities` are the classifier's answers on the training input, taken as fixed
  targets (no gradient flows through them); `view_probabilities` its answers on the strong
  view of the same images (`trainer.data.pipeline.strong_view`). `kind`:
    pseudo_label  FixMatch (Sohn et al., 2020): where the input's answer is at least
                  `threshold` sure, its class is the label the view learns; the others add 0
                  but still count in the mean, as in FixMatch;
    consistency   the Pi-model (Laine and Aila, 2017): the squared difference of the two
                  answers' probabilities, summed over the classes.
  The unlabelled images are those whose decoder weight is 1 and classifier weight is 0;
  `counts` is `global_counts(weights)`.
  """
  targets = tf.stop_gradient(tf.cast(input_probabilities, tf.float32))
  view_probabilities = tf.cast(view_probabilities, tf.float32)
  if kind == "pseudo_label":
    confident = tf.cast(tf.reduce_max(targets, axis=-1) >= threshold, tf.float32)
    per_example = confident * keras.losses.sparse_categorical_crossentropy(
        tf.argmax(targets, axis=-1), view_probabilities)
  elif kind == "consistency":
    per_example = tf.reduce_sum(tf.square(view_probabilities - targets), axis=-1)
  else:
    raise ValueError(f"unknown unlabelled loss {kind!r}")
  unlabeled = weights[DECODER] - weights[CLASSIFIER]
  return tf.reduce_sum(per_example * unlabeled) / tf.maximum(counts[1] - counts[0], 1.0)


class FixedWeighting:
  """The total loss as a fixed weighted sum of the task losses."""

  def __init__(self, loss_weights: Dict[str, float]):
    self.loss_weights = dict(loss_weights)
    self.trainable_variables = []

  def total(self, losses: Dict[str, tf.Tensor], num_replicas: int) -> tf.Tensor:
    """This replica's share of the total loss; `losses` are its shares of the task losses."""
    del num_replicas  # Each share is already a part of a global mean.
    return tf.add_n([self.loss_weights[name] * losses[name] for name in OUTPUT_NAMES])

  def weights(self) -> Dict[str, float]:
    """The weight each task's loss has in the total now."""
    return dict(self.loss_weights)


class UncertaintyWeighting(keras.layers.Layer):
  """Learned task weights after Kendall et al. (2018); its variables train with the model's."""

  def __init__(self, **kwargs):
    super().__init__(dtype="float32", name="uncertainty_weighting", **kwargs)
    # s_t = log(sigma_t^2), one per task; 0 starts the weights at 1 / c_t.
    self.log_variances = self.add_weight(shape=(len(OUTPUT_NAMES),), initializer="zeros",
                                         name="log_variances")
    self.scales = tf.constant([_LIKELIHOOD_SCALE[name] for name in OUTPUT_NAMES])

  def total(self, losses: Dict[str, tf.Tensor], num_replicas: int) -> tf.Tensor:
    """This replica's share of the total loss; the s_t / 2 terms are split over the replicas."""
    task = tf.stack([tf.cast(losses[name], tf.float32) for name in OUTPUT_NAMES])
    precision = tf.exp(-self.log_variances) / self.scales
    return tf.reduce_sum(precision * task + self.log_variances / (2.0 * num_replicas))

  def weights(self) -> Dict[str, float]:
    """The weight each task's loss has in the total now: exp(-s_t) / c_t."""
    values = (tf.exp(-self.log_variances) / self.scales).numpy()
    return {name: float(value) for name, value in zip(OUTPUT_NAMES, values)}


def make_weighting(name: str, loss_weights: Dict[str, float]):
  """The task weighting `--loss_weighting` names; create it inside the strategy scope."""
  if name == "uncertainty":
    return UncertaintyWeighting()
  return FixedWeighting(loss_weights)
