"""Data: the sources named by `--dataset`, their splits, and the sharded tf.data input pipeline.

Every source returns the same `Splits`: uint8 images of shape (N, 28, 28, 1) and int32 labels
0-9, for train, validation and test. The pipeline turns a split into batches of
`(images, {"classifier": labels, "decoder": images})`, all uint8 but the int32 labels (the
loss scales the decoder's target), sharded per input pipeline so every worker reads only its
part.
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

from trainer.config import CLASSIFIER, DECODER, UserInputError, first_line

IMAGE_SHAPE = (28, 28, 1)
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
  raise UserInputError(
      f"unknown --dataset={dataset!r}: use mnist, mnist_sample, tfds:NAME, idx:DIR or npz:PATH")


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
  """Downloads (when absent from `data_dir`) and reads a 28x28 grey TFDS image dataset."""
  import tensorflow_datasets as tfds  # Imported here: it is slow, and only these sources need it.
  try:
    train, test = tfds.load(name, split=["train", "test"], data_dir=data_dir or None,
                            as_supervised=True)
    where = f"TFDS {name}"
    return _hold_out_validation(_split(*_to_numpy(train), where), _split(*_to_numpy(test), where))
  except tfds.core.registered.DatasetNotFoundError:
    raise UserInputError(
        f"--dataset=tfds:{name}: TensorFlow Datasets has no dataset {name!r}; "
        "try fashion_mnist or kmnist") from None
  except UserInputError:
    raise
  except Exception as e:  # Download, network, file system and split errors all look alike here.
    raise UserInputError(
        f"cannot load TFDS {name!r} into --data_dir={data_dir or '(TFDS default)'}: {first_line(e)}; "
        "check the network and --data_dir, or use --dataset=mnist_sample offline") from None


def _to_numpy(dataset: tf.data.Dataset):
  """All (image, label) pairs of a TFDS split as two arrays, read in large batches."""
  batches = list(dataset.batch(10_000).as_numpy_iterator())
  return (np.concatenate([images for images, _ in batches]),
          np.concatenate([labels for _, labels in batches]))


def _hold_out_validation(train: Split, test: Split) -> Splits:
  """Keeps the last VALIDATION_FROM_TRAIN (or a sixth, if fewer) train examples for validation."""
  held = min(VALIDATION_FROM_TRAIN, len(train) // 6)
  cut = len(train) - held
  return Splits(Split(train.images[:cut], train.labels[:cut]),
                Split(train.images[cut:], train.labels[cut:]), test)


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


def _options(dataset: tf.data.Dataset) -> tf.data.Dataset:
  options = tf.data.Options()
  # We shard by input pipeline ourselves; tf.data must not shard a second time.
  options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
  options.deterministic = True
  return dataset.with_options(options).prefetch(tf.data.AUTOTUNE)


def training_dataset(split: Split, batch_size: int, steps_per_epoch: int, seed: int,
                     shift_pixels: int = 0, start_epoch: int = 0, start_step: int = 0,
                     input_context: Optional[tf.distribute.InputContext] = None
                     ) -> tf.data.Dataset:
  """One input pipeline's training batches, from (`start_epoch`, `start_step`) on, forever.

  Batch `step` of epoch `epoch` is a pure function of (seed, epoch, step): each epoch is a
  stateless shuffle of this pipeline's shard cut to `steps_per_epoch` whole batches, and the
  shifts are keyed by the same three numbers. So a job resumed at any step reads exactly the
  batches an uninterrupted one would, with no iterator state to checkpoint. Every pipeline
  yields the same number of batches per epoch, whatever its shard's size.
  """
  replicas_here = input_context.num_replicas_in_sync // input_context.num_input_pipelines if (
      input_context) else 1
  batches_per_epoch = steps_per_epoch * replicas_here  # Each step takes one batch per replica.
  shard = np.arange(len(split), dtype=np.int64)
  if input_context:
    shard = shard[input_context.input_pipeline_id::input_context.num_input_pipelines]
  if len(shard) < batches_per_epoch * batch_size:
    raise ValueError(f"shard of {len(shard)} examples is short of {batches_per_epoch} batches")
  images, labels = tf.constant(split.images), tf.constant(split.labels)
  order_key = tf.constant([seed, 0], tf.int64)
  shift_key = tf.constant([seed, 1], tf.int64)
  fold_in = tf.random.experimental.stateless_fold_in

  def epoch_batches(epoch):
    order = tf.random.experimental.stateless_shuffle(shard, fold_in(order_key, epoch))
    batches = tf.reshape(order[:batches_per_epoch * batch_size], [batches_per_epoch, batch_size])
    first = tf.cast(epoch == start_epoch, tf.int64) * (start_step * replicas_here)
    return tf.data.Dataset.from_tensor_slices((
        tf.fill([batches_per_epoch - first], epoch),
        tf.range(first, batches_per_epoch, dtype=tf.int64), batches[first:]))

  def load(epoch, batch, indices):
    batch_images = tf.gather(images, indices)
    if shift_pixels:
      batch_images = random_shift(batch_images, shift_pixels,
                                  fold_in(fold_in(shift_key, epoch), batch))
    return _to_example(batch_images, tf.gather(labels, indices))

  dataset = tf.data.Dataset.counter(start_epoch).flat_map(epoch_batches)
  return _options(dataset.map(load, num_parallel_calls=tf.data.AUTOTUNE))


def evaluation_dataset(split: Split, batch_size: int,
                       input_context: Optional[tf.distribute.InputContext] = None
                       ) -> tf.data.Dataset:
  """One input pipeline's evaluation batches, once through: `(images, targets, weights)`.

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
  return _options(dataset.map(lambda x, y, w: _to_example(x, y) + (w,)))


def distribute_training(strategy: tf.distribute.Strategy, split: Split, global_batch_size: int,
                        seed: int, shift_pixels: int = 0, start_epoch: int = 0,
                        start_step: int = 0):
  """Training batches as a distributed dataset, from (start_epoch, start_step) on."""
  per_replica = per_replica_batch_size(global_batch_size, strategy.num_replicas_in_sync)
  steps = steps_per_epoch(len(split), global_batch_size)
  return strategy.distribute_datasets_from_function(
      lambda context: training_dataset(split, per_replica, steps, seed, shift_pixels,
                                       start_epoch, start_step, context))


def distribute_evaluation(strategy: tf.distribute.Strategy, split: Split,
                          global_batch_size: int):
  """Evaluation batches as a distributed dataset: one sharded pipeline per worker."""
  per_replica = per_replica_batch_size(global_batch_size, strategy.num_replicas_in_sync)
  return strategy.distribute_datasets_from_function(
      lambda context: evaluation_dataset(split, per_replica, context))
