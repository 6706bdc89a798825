"""Data: the sources named by `--dataset`, their splits, and the sharded tf.data input pipeline.

Every source returns the same `Splits`: uint8 images of shape (N, 28, 28, 1) and int32 labels
0-9, for train, validation and test. The pipeline turns a split into batches of
`(images, {"classifier": labels, "decoder": images}, weights)`, all uint8 but the int32 labels
(the loss scales the decoder's target) and the per-output float32 weights (which examples
each task learns from: see `trainer.losses`), sharded per input pipeline so every worker
reads only its part. `labeled_subset` picks the labelled examples of semi-supervised runs.
"""

import dataclasses
import gzip
import importlib.resources
import zipfile
import zlib
from typing import Optional

import numpy as np
import tensorflow as tf
from sklearn import model_selection

from trainer.config import CLASSIFIER, DECODER, UserInputError, check_dataset_name, first_line

IMAGE_SHAPE = (28, 28, 1)
# The strong view of pseudo-label and consistency training (`strong_view`).
STRONG_SHIFT_PIXELS = 2
ERASED_SQUARE = 12
NUM_CLASSES = 10
# The original exercise's cache of full MNIST: its rows are 50k train, 10k validation, 10k test.
EXERCISE_SPLIT = (50_000, 10_000, 10_000)
# Held out from the 60,000-image train files of TFDS and IDX sources, as in EXERCISE_SPLIT.
VALIDATION_FROM_TRAIN = 10_000
# Any other npz is split 80/10/10, stratified by class, with this fixed seed so that the test
# set does not move when --seed does.
SAMPLE_SPLIT_SEED = 0
IDX_IMAGES_MAGIC = 0x00000803
IDX_LABELS_MAGIC = 0x00000801


@dataclasses.dataclass(frozen=True)
class Split:
  images: np.ndarray  # (N, 28, 28, 1) uint8
  labels: np.ndarray  # (N,) int32

  def __len__(self):
    return len(self.labels)


@dataclasses.dataclass(frozen=True)
class Splits:
  train: Split
  validation: Split
  test: Split


def load_splits(dataset: str, data_dir: str = "") -> Splits:
  """Loads the source that `--dataset` names (see the README) into train/validation/test."""
  check_dataset_name(dataset)  # The one list of names, in trainer.config.
  kind, _, argument = dataset.partition(":")
  if dataset == "mnist":
    return _load_tfds("mnist", data_dir)
  if dataset == "mnist_sample":
    ref = importlib.resources.files("trainer") / "assets" / "mnist_5k.npz"
    with ref.open("rb") as f:
      return _splits_from_npz(f, "the packaged mnist_sample")
  if kind == "tfds" and argument:
    return _load_tfds(argument, data_dir)
  if kind == "idx" and argument:
    return _load_idx_dir(argument)
  if kind == "npz" and argument:
    if not tf.io.gfile.exists(argument):
      raise UserInputError(f"--dataset={dataset}: no file at {argument}; give the path of an npz file")
    with tf.io.gfile.GFile(argument, "rb") as f:
      return _splits_from_npz(f, argument)
  raise AssertionError(f"config.DATASETS or DATASET_KINDS names {dataset!r}, which is not read here")


def _split(images: np.ndarray, labels: np.ndarray, where: str) -> Split:
  """Checks one split's arrays and brings them to the common shape and dtypes."""
  if images.dtype != np.uint8:
    raise UserInputError(f"{where}: images are {images.dtype}, expected uint8 pixels 0-255")
  if images.ndim == 2 and images.shape[1] == 784:
    images = images.reshape((-1,) + IMAGE_SHAPE)
  elif images.ndim == 3 and images.shape[1:] == IMAGE_SHAPE[:2]:
    images = images[..., np.newaxis]
  if images.shape[1:] != IMAGE_SHAPE:
    raise UserInputError(
        f"{where}: images have shape {images.shape}, expected (N, 784) or (N, 28, 28[, 1])")
  if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
    raise UserInputError(
        f"{where}: labels have shape {labels.shape} and dtype {labels.dtype}, "
        "expected a 1-D integer array")
  if len(images) != len(labels):
    raise UserInputError(f"{where}: {len(images)} images but {len(labels)} labels; they must match")
  if len(labels) and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
    raise UserInputError(
        f"{where}: labels range {labels.min()}..{labels.max()}, expected digits 0-{NUM_CLASSES - 1}")
  return Split(np.ascontiguousarray(images), labels.astype(np.int32))


def _splits_from_npz(file, where: str) -> Splits:
  """Reads the original exercise's cache layout: `X` (N, 784) uint8 and `y` (N,) labels."""
  # numpy takes anything that is not a zip archive for a pickle; say what it really is.
  if file.read(4) != b"PK\x03\x04":
    raise UserInputError(f"{where}: not a readable npz file (no zip header); save it with np.savez")
  file.seek(0)
  try:
    with np.load(file, allow_pickle=False) as npz:
      missing = {"X", "y"} - set(npz.files)
      if missing:
        raise UserInputError(
            f"{where}: no array {', '.join(sorted(missing))} in the npz (it has "
            f"{', '.join(npz.files) or 'none'}); it needs X (N, 784) uint8 and y (N,) labels")
      images, labels = npz["X"], npz["y"]
  except UserInputError:
    raise
  except ValueError as e:  # numpy says "Object arrays cannot be loaded when allow_pickle=False".
    raise UserInputError(f"{where}: cannot read it without pickle ({e}); save plain arrays") from None
  except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as e:
    raise UserInputError(f"{where}: not a readable npz file ({e}); save it again with np.savez") from None
  everything = _split(images, labels, where)
  if len(everything) == sum(EXERCISE_SPLIT):
    ends = np.cumsum(EXERCISE_SPLIT)
    parts = [slice(0, ends[0]), slice(ends[0], ends[1]), slice(ends[1], ends[2])]
    return Splits(*(Split(everything.images[p], everything.labels[p]) for p in parts))
  indices = np.arange(len(everything))
  try:
    train, rest = model_selection.train_test_split(
        indices, test_size=0.2, stratify=everything.labels, random_state=SAMPLE_SPLIT_SEED)
    validation, test = model_selection.train_test_split(
        rest, test_size=0.5, stratify=everything.labels[rest], random_state=SAMPLE_SPLIT_SEED)
  except ValueError as e:
    raise UserInputError(f"{where}: too few examples to split 80/10/10 by class ({e})") from None
  return Splits(*(Split(everything.images[i], everything.labels[i]) for i in (train, validation, test)))


def _read_idx(path: str, magic: int, dims: int) -> np.ndarray:
  """Parses one IDX file (gzipped or not): big-endian magic, `dims` sizes, then uint8 data."""
  with tf.io.gfile.GFile(path, "rb") as f:
    raw = f.read()
  if raw[:2] == b"\x1f\x8b":
    try:
      raw = gzip.decompress(raw)
    except (OSError, EOFError) as e:
      raise UserInputError(f"{path}: broken gzip data ({e}); download the file again") from None
  header = 4 * (1 + dims)
  if len(raw) < header:
    raise UserInputError(f"{path}: only {len(raw)} bytes, too short for an IDX header")
  found = int.from_bytes(raw[:4], "big")
  if found != magic:
    raise UserInputError(
        f"{path}: IDX magic number {found:#010x}, expected {magic:#010x}; "
        "is it the right file (images vs labels), or not an IDX file?")
  shape = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(dims))
  expected = int(np.prod(shape))
  if len(raw) - header != expected:
    raise UserInputError(
        f"{path}: header says shape {shape} ({expected} bytes) but {len(raw) - header} bytes "
        "follow; the file is truncated or corrupt, download it again")
  return np.frombuffer(raw, np.uint8, offset=header).reshape(shape)


def _load_idx_dir(directory: str) -> Splits:
  """Reads the four standard MNIST IDX files in `directory`, gzipped or not."""
  def find(stem):
    for name in (stem + ".gz", stem):
      path = directory.rstrip("/") + "/" + name
      if tf.io.gfile.exists(path):
        return path
    raise UserInputError(
        f"--dataset=idx:{directory}: no {stem}[.gz] there; the directory needs the four MNIST "
        "IDX files (train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-...)")
  parts = {}
  for prefix in ("train", "t10k"):
    images_path = find(f"{prefix}-images-idx3-ubyte")
    labels_path = find(f"{prefix}-labels-idx1-ubyte")
    parts[prefix] = _split(_read_idx(images_path, IDX_IMAGES_MAGIC, 3),
                           _read_idx(labels_path, IDX_LABELS_MAGIC, 1),
                           f"{images_path} with {labels_path}")
  return _hold_out_validation(parts["train"], parts["t10k"])


def _load_tfds(name: str, data_dir: str) -> Splits:
  """A 28x28 grey TFDS image dataset, downloaded when absent (see `trainer.tfds_source`)."""
  from trainer import tfds_source  # Here: it imports TFDS, which is slow and rarely needed.
  arrays = tfds_source.load(name, data_dir)
  where = f"TFDS {name}"
  return _hold_out_validation(_split(*arrays["train"], where), _split(*arrays["test"], where))


def _hold_out_validation(train: Split, test: Split) -> Splits:
  """Keeps the last VALIDATION_FROM_TRAIN (or a sixth, if fewer) train examples for validation."""
  held = min(VALIDATION_FROM_TRAIN, len(train) // 6)
  cut = len(train) - held
  return Splits(Split(train.images[:cut], train.labels[:cut]),
                Split(train.images[cut:], train.labels[cut:]), test)


def read_image_file(path: str, resize: bool = False) -> np.ndarray:
  """A (28, 28, 1) uint8 greyscale image from a PNG, JPEG, GIF or BMP file (local or gs://).

  Raises `UserInputError` naming the file and the fix for anything else: not an image, colour
  or transparency (grey saved as RGB is fine), or another size unless `resize`.
  """
  try:
    with tf.io.gfile.GFile(path, "rb") as f:
      encoded = f.read()
  except tf.errors.OpError as e:
    raise UserInputError(f"{path}: cannot read it ({first_line(e)})") from None
  try:
    image = tf.io.decode_image(encoded, expand_animations=False).numpy()
  except (tf.errors.InvalidArgumentError, ValueError):
    raise UserInputError(f"{path}: not an image; give a PNG, JPEG, GIF or BMP file") from None
  if image.dtype != np.uint8:
    raise UserInputError(f"{path}: {image.dtype} pixels; save it with 8-bit pixels")
  channels = image.shape[-1]
  grey = image[..., :1]
  opaque = channels not in (2, 4) or (image[..., -1] == 255).all()
  if not opaque or (channels >= 3 and not (image[..., :3] == grey).all()):
    raise UserInputError(
        f"{path}: a colour or transparent image; convert it to greyscale, white on black")
  if grey.shape[:2] != IMAGE_SHAPE[:2]:
    if not resize:
      raise UserInputError(f"{path}: {grey.shape[1]}x{grey.shape[0]} pixels, expected 28x28; "
                           "pass --resize to scale it")
    grey = tf.image.resize(grey, IMAGE_SHAPE[:2], antialias=True).numpy()
    grey = np.round(np.clip(grey, 0, 255)).astype(np.uint8)
  return grey


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


def training_dataset(split: Split, batch_size: int, steps_per_epoch: int, seed: int,
                     shift_pixels: int = 0, start_epoch: int = 0, start_step: int = 0,
                     input_context: Optional[tf.distribute.InputContext] = None,
                     labeled_indices: Optional[np.ndarray] = None, input_noise: float = 0.0,
                     second_view: bool = False) -> tf.data.Dataset:
  """One input pipeline's training batches, from (`start_epoch`, `start_step`) on, forever.

  Each element is `(images, targets, weights)`; `weights[CLASSIFIER]` is 1 for examples whose
  label counts (all of them, unless `labeled_indices` names a subset), `weights[DECODER]` is 1.
  With `input_noise`, `images` carry that noise (`add_noise`) while the decoder's target stays
  clean: a denoising autoencoder. With `second_view`, `images` is a pair: the input and its
  `strong_view`.

  Batch `step` of epoch `epoch` is a pure function of (seed, epoch, step): each epoch is a
  stateless shuffle of this pipeline's shard cut to `steps_per_epoch` whole batches, and the
  shifts are keyed by the same three numbers. So a job resumed at any step reads exactly the
  batches an uninterrupted one would, with no iterator state to checkpoint. Every pipeline
  yields the same number of batches per epoch, whatever its shard's size. With a labelled
  subset, the first `labeled_per_batch` slots of each batch are drawn from it (a stateless
  shuffle of it per epoch, repeated as often as needed) and the rest from the whole shard.
  """
  replicas_here = input_context.num_replicas_in_sync // input_context.num_input_pipelines if (
      input_context) else 1
  batches_per_epoch = steps_per_epoch * replicas_here  # Each step takes one batch per replica.
  shard = np.arange(len(split), dtype=np.int64)
  if input_context:
    shard = shard[input_context.input_pipeline_id::input_context.num_input_pipelines]
  if len(shard) < batches_per_epoch * batch_size:
    raise ValueError(f"shard of {len(shard)} examples is short of {batches_per_epoch} batches")
  is_labeled = np.ones(len(split), np.float32)
  labeled_slots = labeled_per_batch(batch_size, labeled_indices)
  labeled_shard = shard
  if labeled_indices is not None:
    is_labeled = np.isin(np.arange(len(split)), labeled_indices).astype(np.float32)
    labeled_shard = shard[is_labeled[shard] > 0]
    if not len(labeled_shard):  # More pipelines than labelled examples: share them all.
      labeled_shard = np.asarray(labeled_indices, np.int64)
  images, labels = tf.constant(split.images), tf.constant(split.labels)
  is_labeled = tf.constant(is_labeled)
  order_key = tf.constant([seed, 0], tf.int64)
  shift_key = tf.constant([seed, 1], tf.int64)
  labeled_key = tf.constant([seed, 2], tf.int64)
  noise_key = tf.constant([seed, 3], tf.int64)
  view_key = tf.constant([seed, 4], tf.int64)
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
    first = tf.cast(epoch == start_epoch, tf.int64) * (start_step * replicas_here)
    return tf.data.Dataset.from_tensor_slices((
        tf.fill([batches_per_epoch - first], epoch),
        tf.range(first, batches_per_epoch, dtype=tf.int64), batches[first:]))

  def load(epoch, batch, indices):
    batch_key = lambda key: fold_in(fold_in(key, epoch), batch)
    originals = tf.gather(images, indices)
    clean = originals
    if shift_pixels:
      clean = random_shift(originals, shift_pixels, batch_key(shift_key))
    inputs, targets = _to_example(clean, tf.gather(labels, indices))
    if input_noise:
      inputs = add_noise(clean, input_noise, batch_key(noise_key))
    if second_view:
      inputs = (inputs, strong_view(originals, input_noise, batch_key(view_key)))
    weights = {CLASSIFIER: tf.gather(is_labeled, indices), DECODER: tf.ones([batch_size])}
    return inputs, targets, weights

  dataset = tf.data.Dataset.counter(start_epoch).flat_map(epoch_batches)
  return _options(dataset.map(load, num_parallel_calls=tf.data.AUTOTUNE))


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
                        seed: int, shift_pixels: int = 0, start_epoch: int = 0,
                        start_step: int = 0, labeled_indices: Optional[np.ndarray] = None,
                        input_noise: float = 0.0, second_view: bool = False):
  """Training batches as a distributed dataset, from (start_epoch, start_step) on."""
  per_replica = per_replica_batch_size(global_batch_size, strategy.num_replicas_in_sync)
  steps = steps_per_epoch(len(split), global_batch_size)
  return strategy.distribute_datasets_from_function(
      lambda context: training_dataset(split, per_replica, steps, seed, shift_pixels,
                                       start_epoch, start_step, context, labeled_indices,
                                       input_noise, second_view))


def distribute_evaluation(strategy: tf.distribute.Strategy, split: Split,
                          global_batch_size: int):
  """Evaluation batches as a distributed dataset: one sharded pipeline per worker."""
  per_replica = per_replica_batch_size(global_batch_size, strategy.num_replicas_in_sync)
  return strategy.distribute_datasets_from_function(
      lambda context: evaluation_dataset(split, per_replica, context))
