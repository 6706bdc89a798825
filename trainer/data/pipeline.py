"""The sharded tf.data input pipeline: a split (`trainer.data.sources`) into batches per replica.

Batches are `(images, {"classifier": labels, "decoder": images}, weights)`, all uint8 but the
int32 labels (the loss scales the decoder's target) and the per-output float32 weights (which
examples each task learns from: see `trainer.multitask.losses`), sharded per input pipeline so every
worker reads only its part. `labeled_subset` picks the labelled examples of semi-supervised
runs. Training batches are a pure function of the seed and the global step: a resumed job reads
exactly what an uninterrupted one would.
"""

import dataclasses
from typing import Optional

import numpy as np
import tensorflow as tf
from sklearn import model_selection

from trainer.data.sources import IMAGE_SHAPE, NUM_CLASSES, Split
from trainer.errors import first_line, UserInputError
from trainer.multitask import CLASSIFIER, DECODER

# The strong view of pseudo-label and consistency training (`strong_view`).
STRONG_SHIFT_PIXELS = 2
ERASED_SQUARE = 12


@dataclasses.dataclass(frozen=True)
class TrainingInput:
  """What the training pipeline draws and how it augments: the part of the configuration it
  needs, with the labelled subset chosen from it. The defaults are "off", not the job's."""
  seed: int = 0
  shift_pixels: int = 0
  input_noise: float = 0.0
  second_view: bool = False  # Images come as pairs (input, `strong_view`).
  labeled_indices: Optional[np.ndarray] = None  # Examples whose labels count; None: all.


def per_replica_batch_size(global_batch_size: int, num_replicas: int) -> int:
  """The batch each replica computes on; the global batch must divide evenly."""
  if global_batch_size <= 0 or global_batch_size % num_replicas:
    nearest = max(1, round(global_batch_size / num_replicas)) * num_replicas
    raise UserInputError(
        f"--batch_size={global_batch_size} is the global batch and must be a positive multiple "
        f"of the {num_replicas} replicas; try --batch_size={nearest}")
  return global_batch_size // num_replicas


def steps_per_epoch(num_examples: int, global_batch_size: int) -> int:
  """Global training steps in one epoch: whole global batches, the remainder left out."""
  steps = num_examples // global_batch_size
  if steps == 0:
    raise UserInputError(
        f"--batch_size={global_batch_size} is larger than the {num_examples} training examples; "
        "use a smaller --batch_size")
  return steps


# Each epoch leaves out the last partial global batch (every step computes the same batch, one
# compiled step). Up to a tenth of the split is tolerated: beyond it, an "epoch" is no longer
# roughly a pass over the data, and the steps the user counted on are not taken.
MOST_UNUSED_PER_EPOCH = 0.1


def check_epoch_coverage(num_examples: int, global_batch_size: int, num_replicas: int) -> None:
  """Raises `UserInputError` where whole global batches leave more than
  MOST_UNUSED_PER_EPOCH of the training split unused in each epoch, with a batch size that
  does not."""
  unused = num_examples % global_batch_size
  if unused <= MOST_UNUSED_PER_EPOCH * num_examples:
    return
  steps = -(-num_examples // global_batch_size)  # One more step than whole batches give.
  better = max(num_replicas, num_examples // steps // num_replicas * num_replicas)
  raise UserInputError(
      f"--batch_size={global_batch_size} leaves {unused} of the {num_examples} training examples "
      f"({unused / num_examples:.0%}) unused in every epoch, more than the "
      f"{MOST_UNUSED_PER_EPOCH:.0%} allowed (each step takes a whole batch); try "
      f"--batch_size={better}")


def _to_example(images, labels):
  """The dict of labels the outputs train against: the digit, and the image itself (uint8)."""
  return images, {CLASSIFIER: labels, DECODER: images}


def random_shift(images, pixels: int, seed):
  """Moves each image of a batch by up to `pixels` each way, filling with background.

  Stateless: the shifts are a function of `seed` (shape [2]) alone, so a resumed job
  augments exactly as an uninterrupted one.
  """
  size = IMAGE_SHAPE[0]
  padded = tf.pad(images, [[0, 0], [pixels, pixels], [pixels, pixels], [0, 0]])
  offsets = tf.random.stateless_uniform([tf.shape(images)[0], 2], seed, minval=0,
                                        maxval=2 * pixels + 1, dtype=tf.int32)
  rows = offsets[:, :1] + tf.range(size)
  cols = offsets[:, 1:] + tf.range(size)
  moved = tf.gather(padded, rows, axis=1, batch_dims=1)
  return tf.gather(moved, cols, axis=2, batch_dims=1)


def add_noise(images, stddev: float, seed):
  """uint8 images plus Gaussian noise of `stddev` (in pixels scaled to [0, 1]), rounded and
  clipped back to uint8. Stateless: a function of `seed` (shape [2]) alone."""
  noise = tf.random.stateless_normal(tf.shape(images), seed, stddev=stddev * 255.0)
  return tf.cast(tf.clip_by_value(tf.round(tf.cast(images, tf.float32) + noise), 0.0, 255.0),
                 tf.uint8)


def erase_square(images, size: int, seed):
  """Sets a `size` x `size` square of each image, placed at random, to background (0)."""
  corners = tf.random.stateless_uniform([tf.shape(images)[0], 2], seed, minval=0,
                                        maxval=IMAGE_SHAPE[0] - size + 1, dtype=tf.int32)
  positions = tf.range(IMAGE_SHAPE[0])
  rows = (positions >= corners[:, :1]) & (positions < corners[:, :1] + size)
  cols = (positions >= corners[:, 1:]) & (positions < corners[:, 1:] + size)
  erased = rows[:, :, None, None] & cols[:, None, :, None]
  return tf.where(erased, tf.zeros_like(images), images)


def strong_view(images, input_noise: float, seed):
  """The strongly augmented copy that pseudo-label and consistency training compare with the
  input: a shift of up to STRONG_SHIFT_PIXELS and an ERASED_SQUARE erased (FixMatch's cutout,
  without its colour operations, which greyscale clothing and digits lack), plus the input's
  noise. Fixed in advance, not tuned."""
  fold_in = tf.random.experimental.stateless_fold_in
  view = erase_square(random_shift(images, STRONG_SHIFT_PIXELS, fold_in(seed, 0)), ERASED_SQUARE,
                      fold_in(seed, 1))
  return add_noise(view, input_noise, fold_in(seed, 2)) if input_noise else view


def _options(dataset: tf.data.Dataset) -> tf.data.Dataset:
  options = tf.data.Options()
  # We shard by input pipeline ourselves; tf.data must not shard a second time.
  options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
  options.deterministic = True
  return dataset.with_options(options).prefetch(tf.data.AUTOTUNE)


def labeled_subset(split: Split, labeled_examples: int, seed: int) -> Optional[np.ndarray]:
  """Which training examples keep their labels: `labeled_examples` of them, as many of each
  class as the split's proportions give, chosen by `seed`; None (all) when it is 0."""
  if not labeled_examples:
    return None
  if not NUM_CLASSES <= labeled_examples <= len(split):
    raise UserInputError(
        f"--labeled_examples={labeled_examples} must be between {NUM_CLASSES} (one per class) "
        f"and the {len(split)} training examples; 0 uses every label")
  if labeled_examples == len(split):
    return None
  try:
    labeled, _ = model_selection.train_test_split(
        np.arange(len(split)), train_size=labeled_examples, stratify=split.labels,
        random_state=seed)
  except ValueError as e:  # A class too rare to stratify, or too few examples left over.
    raise UserInputError(f"--labeled_examples={labeled_examples}: cannot choose that many "
                         f"class by class ({first_line(e)}); choose fewer") from None
  return np.sort(labeled)


def labeled_per_batch(batch_size: int, labeled_indices: Optional[np.ndarray]) -> int:
  """Batch slots kept for labelled examples: a quarter when labels are few, so the classifier
  learns at every step; none when every example is labelled."""
  if labeled_indices is None:
    return 0
  if batch_size < 4:
    raise UserInputError(
        f"--labeled_examples needs at least 4 examples per replica in a batch, not {batch_size}: "
        "raise --batch_size")
  return batch_size // 4


def training_dataset(split: Split, batch_size: int, steps_per_epoch: int,
                     settings: TrainingInput, start_step: int = 0,
                     input_context: Optional[tf.distribute.InputContext] = None
                     ) -> tf.data.Dataset:
  """One input pipeline's training batches, from global step `start_step` on, forever.

  Each element is `(images, targets, weights)`; `weights[CLASSIFIER]` is 1 for examples whose
  label counts (all of them, unless `settings.labeled_indices` names a subset),
  `weights[DECODER]` is 1. With `input_noise`, `images` carry that noise (`add_noise`) while
  the decoder's target stays clean: a denoising autoencoder. With `second_view`, `images` is a
  pair: the input and its `strong_view`.

  Batch `step` of epoch `epoch` is a pure function of (seed, epoch, step): each epoch is a
  stateless shuffle of this pipeline's shard cut to `steps_per_epoch` whole batches, and the
  augmentations are keyed by the same three numbers. So a job resumed at any step reads exactly
  the batches an uninterrupted one would, with no iterator state to checkpoint. Every pipeline
  yields the same number of batches per epoch, whatever its shard's size. With a labelled
  subset, the first `labeled_per_batch` slots of each batch are drawn from it (a stateless
  shuffle of it per epoch, repeated as often as needed) and the rest from the whole shard.
  """
  replicas_here = (input_context.num_replicas_in_sync // input_context.num_input_pipelines
                   if input_context else 1)
  batches_per_epoch = steps_per_epoch * replicas_here  # Each step takes one batch per replica.
  shard = np.arange(len(split), dtype=np.int64)
  if input_context:
    shard = shard[input_context.input_pipeline_id::input_context.num_input_pipelines]
  if len(shard) < batches_per_epoch * batch_size:
    raise ValueError(f"shard of {len(shard)} examples is short of {batches_per_epoch} batches")
  start_epoch = start_step // steps_per_epoch
  first_batch = (start_step % steps_per_epoch) * replicas_here
  epoch_batches = _epoch_batches(split, shard, batch_size, batches_per_epoch, settings,
                                 start_epoch, first_batch)
  dataset = tf.data.Dataset.counter(start_epoch).flat_map(epoch_batches)
  return _options(dataset.map(_batch_loader(split, batch_size, settings),
                              num_parallel_calls=tf.data.AUTOTUNE))


def _is_labeled(split: Split, labeled_indices: Optional[np.ndarray]) -> np.ndarray:
  """1.0 for each example of `split` whose label counts, else 0.0."""
  if labeled_indices is None:
    return np.ones(len(split), np.float32)
  return np.isin(np.arange(len(split)), labeled_indices).astype(np.float32)


def _epoch_batches(split: Split, shard: np.ndarray, batch_size: int, batches_per_epoch: int,
                   settings: TrainingInput, start_epoch: int, first_batch: int):
  """`epoch -> dataset of (epoch, batch index, example indices)`: the epoch's batches, the
  start epoch's from `first_batch` on."""
  labeled_slots = labeled_per_batch(batch_size, settings.labeled_indices)
  labeled_shard = shard
  if settings.labeled_indices is not None:
    labeled_shard = shard[_is_labeled(split, settings.labeled_indices)[shard] > 0]
    if not len(labeled_shard):  # More pipelines than labelled examples: share them all.
      labeled_shard = np.asarray(settings.labeled_indices, np.int64)
  order_key = tf.constant([settings.seed, 0], tf.int64)
  labeled_key = tf.constant([settings.seed, 2], tf.int64)
  fold_in = tf.random.experimental.stateless_fold_in
  unlabeled_slots = batch_size - labeled_slots
  repeats = -(-batches_per_epoch * labeled_slots // len(labeled_shard))

  def epoch_batches(epoch):
    order = tf.random.experimental.stateless_shuffle(shard, fold_in(order_key, epoch))
    batches = tf.reshape(order[:batches_per_epoch * unlabeled_slots],
                         [batches_per_epoch, unlabeled_slots])
    if labeled_slots:
      labeled = tf.tile(tf.random.experimental.stateless_shuffle(
          labeled_shard, fold_in(labeled_key, epoch)), [repeats])
      batches = tf.concat([tf.reshape(labeled[:batches_per_epoch * labeled_slots],
                                      [batches_per_epoch, labeled_slots]), batches], axis=1)
    first = tf.cast(epoch == start_epoch, tf.int64) * first_batch
    return tf.data.Dataset.from_tensor_slices((
        tf.fill([batches_per_epoch - first], epoch),
        tf.range(first, batches_per_epoch, dtype=tf.int64), batches[first:]))

  return epoch_batches


def _batch_loader(split: Split, batch_size: int, settings: TrainingInput):
  """`(epoch, batch index, example indices) -> (images, targets, weights)`, augmented with
  keys folded from the seed, the epoch and the batch."""
  images, labels = tf.constant(split.images), tf.constant(split.labels)
  is_labeled = tf.constant(_is_labeled(split, settings.labeled_indices))
  shift_key, noise_key, view_key = (tf.constant([settings.seed, stream], tf.int64)
                                    for stream in (1, 3, 4))
  fold_in = tf.random.experimental.stateless_fold_in

  def load(epoch, batch, indices):
    batch_key = lambda key: fold_in(fold_in(key, epoch), batch)
    originals = tf.gather(images, indices)
    clean = originals
    if settings.shift_pixels:
      clean = random_shift(originals, settings.shift_pixels, batch_key(shift_key))
    inputs, targets = _to_example(clean, tf.gather(labels, indices))
    if settings.input_noise:
      inputs = add_noise(clean, settings.input_noise, batch_key(noise_key))
    if settings.second_view:
      inputs = (inputs, strong_view(originals, settings.input_noise, batch_key(view_key)))
    weights = {CLASSIFIER: tf.gather(is_labeled, indices), DECODER: tf.ones([batch_size])}
    return inputs, targets, weights

  return load


def evaluation_dataset(split: Split, batch_size: int,
                       input_context: Optional[tf.distribute.InputContext] = None
                       ) -> tf.data.Dataset:
  """One input pipeline's evaluation batches, once through: `(images, targets, weights)`,
  where both outputs' weights are 1 for real examples and 0 for padding.

  Padded with zero-weight examples to whole batches on every replica: static shapes
  everywhere, as TPUs need, and the padding counts for nothing.
  """
  num_replicas = input_context.num_replicas_in_sync if input_context else 1
  padding = -len(split) % (batch_size * num_replicas)
  weights = np.concatenate([np.ones(len(split), np.float32), np.zeros(padding, np.float32)])
  images = np.concatenate([split.images, np.zeros((padding,) + IMAGE_SHAPE, np.uint8)])
  labels = np.concatenate([split.labels, np.zeros(padding, np.int32)])
  dataset = tf.data.Dataset.from_tensor_slices((images, labels, weights))
  if input_context:
    dataset = dataset.shard(input_context.num_input_pipelines, input_context.input_pipeline_id)
  dataset = dataset.cache().batch(batch_size, drop_remainder=True)
  return _options(dataset.map(lambda x, y, w: _to_example(x, y) + ({CLASSIFIER: w, DECODER: w},)))


def distribute_training(strategy: tf.distribute.Strategy, split: Split, global_batch_size: int,
                        settings: TrainingInput, start_step: int = 0):
  """Training batches as a distributed dataset, from global step `start_step` on."""
  per_replica = per_replica_batch_size(global_batch_size, strategy.num_replicas_in_sync)
  steps = steps_per_epoch(len(split), global_batch_size)
  return strategy.distribute_datasets_from_function(
      lambda context: training_dataset(split, per_replica, steps, settings, start_step, context))


def distribute_evaluation(strategy: tf.distribute.Strategy, split: Split,
                          global_batch_size: int):
  """Evaluation batches as a distributed dataset: one sharded pipeline per worker."""
  per_replica = per_replica_batch_size(global_batch_size, strategy.num_replicas_in_sync)
  return strategy.distribute_datasets_from_function(
      lambda context: evaluation_dataset(split, per_replica, context))
