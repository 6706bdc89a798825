"""Data sources: what `--dataset` names, read into train, validation and test splits.

Every source returns the same `Splits`: uint8 images of shape (N, 28, 28, 1) and int32 labels
0-9. A broken file is a `UserInputError` naming the file, the problem and the fix. The input
pipeline that batches a split is `trainer.data`'s.
"""

import dataclasses
import gzip
import importlib.resources
import zipfile
import zlib

import numpy as np
import tensorflow as tf
from sklearn import model_selection

from trainer.config import UserInputError, check_dataset_name, first_line

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
    if not tf.io.gfile.exists(argument) or tf.io.gfile.isdir(argument):
      what = "a directory" if tf.io.gfile.exists(argument) else "no file"
      raise UserInputError(f"--dataset={dataset}: {what} at {argument}; give the path of an npz "
                           "file (idx:DIR reads a directory of IDX files)")
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
