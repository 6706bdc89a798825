"""Data sources: what `--dataset` names, read into train, validation and test splits with the
classes' names; and what an image's background is. The image and array files users give
`trainer.predict` and `launch.batch_input` are read by `trainer.data.image_files`.

Every source returns the same `Splits`: uint8 images of shape (N, 28, 28, 1), int32 labels 0-9,
and the classes' names by label. Names come from the dataset where it has them: TFDS's
metadata, an npz's own `class_names` array, or Fashion-MNIST recognised exactly by its labels
(IDX or npz, see `known_class_names`); else the digits "0".."9". A broken file is a
`UserInputError` naming the file, the problem and the fix. The input pipeline that batches a
split is `trainer.data.pipeline`'s.

TensorFlow (for tf.io.gfile) and scikit-learn are imported inside the
functions that use them: the command-line entry points import this module to check their
inputs before paying for TensorFlow's start-up, which must happen inside
`cli.tensorflow_imported_quietly` to keep its C++ start-up lines off the terminal.
"""

import dataclasses
import gzip
import hashlib
import importlib.resources
import io
import math
import zipfile
import zlib
from typing import Callable, Dict, List, Sequence, Tuple

import numpy as np

from trainer.config import check_dataset_name
from trainer.errors import first_line, UserInputError

IMAGE_SHAPE = (28, 28, 1)
NUM_CLASSES = 10
DIGITS = tuple(str(label) for label in range(NUM_CLASSES))
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                         "Sneaker", "Bag", "Ankle boot")
# sha256 of Fashion-MNIST's labels exactly as it ships them, one byte a label: its t10k labels
# (what an IDX directory holds for test), and its train labels followed by the t10k ones (the
# trainer's npz layout of all 70,000). An exact match, never a guess from a file name: MNIST's
# labels, or Fashion-MNIST's in another order or with one changed, do not match.
FASHION_MNIST_LABEL_DIGESTS = frozenset({
    "3d0e6c6ea990b53b6f8f500a41cac93881d981b315f84578b7d915342ade01e9",  # t10k
    "8ab940a680640f36c0bf1d2549cb2f3b3d4068c12547116cc7b1161b1d26663d",  # train, then t10k
})
# The original exercise's cache of full MNIST: its rows are 50k train, 10k validation, 10k test.
EXERCISE_SPLIT = (50_000, 10_000, 10_000)
# Held out from the 60,000-image train files of TFDS and IDX sources, as in EXERCISE_SPLIT.
VALIDATION_FROM_TRAIN = 10_000
# Any other npz is split 80/10/10, stratified by class, with this fixed seed so that the test
# set does not move when --seed does.
SAMPLE_SPLIT_SEED = 0
IDX_IMAGES_MAGIC = 0x00000803
IDX_LABELS_MAGIC = 0x00000801
ZIP_SIGNATURE = b"PK\x03\x04"
# Enough of an .npy file to hold its header: numpy refuses headers over 10,000 bytes.
NPY_HEADER_READ = 1 << 16
# An image's background is judged on its outer ring of pixels: MNIST centres each digit in a
# 20x20 box and Fashion-MNIST's garments rarely fill the frame, so the ring is background in
# nearly every image, where the mean is not (Fashion-MNIST's bright coats and bags on black
# average above 127; its bright ring pixels are a minority in every test image).
BRIGHT = 127
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
  class_names: Tuple[str, ...] = DIGITS  # By label: class_names[3] names label 3.


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
    import tensorflow as tf
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


def known_class_names(labels: np.ndarray) -> Tuple[str, ...]:
  """Fashion-MNIST's class names for its labels exactly as it ships them (see
  FASHION_MNIST_LABEL_DIGESTS), the digits for any other labels (checked to be 0-9)."""
  digest = hashlib.sha256(np.asarray(labels).astype(np.uint8).tobytes()).hexdigest()
  return FASHION_MNIST_CLASSES if digest in FASHION_MNIST_LABEL_DIGESTS else DIGITS


def padded_class_names(names: Sequence[str]) -> Tuple[str, ...]:
  """A dataset's class names (by label, at most NUM_CLASSES) followed by the digits of the
  labels after them: the model always has NUM_CLASSES outputs, each needs a name."""
  return tuple(names) + DIGITS[len(names):]


def _given_class_names(array: np.ndarray, labels: np.ndarray, where: str) -> Tuple[str, ...]:
  """An npz's own `class_names` array (strings, by label), checked against its labels."""
  if array.ndim != 1 or array.dtype.kind not in "US" or not 0 < len(array) <= NUM_CLASSES:
    raise UserInputError(
        f"{where}: class_names is {array.dtype} of shape {array.shape}; save 1 to "
        f"{NUM_CLASSES} strings, one a label in order (np.array(['cat', 'dog']))")
  names = [name.decode("utf-8", "replace") if isinstance(name, bytes) else name
           for name in array.tolist()]
  if not all(name.strip() for name in names):
    raise UserInputError(f"{where}: class_names has an empty name; give every class a name")
  if len(labels) and labels.max() >= len(names):
    raise UserInputError(f"{where}: labels go up to {labels.max()} but class_names has only "
                         f"{len(names)} names; give one name a label, in label order")
  return padded_class_names(names)


def npz_arrays(file, where: str, choose: Callable[[List[str]], Sequence[str]]
                ) -> Dict[str, np.ndarray]:
  """The arrays that `choose(the names of its arrays)` picks from the npz file object `file`.

  Raises `UserInputError` naming `where` for a file that is not an npz or that holds pickled
  objects; `choose` may raise it too.
  """
  # numpy takes anything that is not a zip archive for a pickle; say what it really is.
  if file.read(4) != ZIP_SIGNATURE:
    raise UserInputError(f"{where}: not an npz file (no zip header); save it with np.savez")
  file.seek(0)
  try:
    with np.load(file, allow_pickle=False) as npz:
      arrays = {}
      for key in choose(list(npz.files)):
        _check_npz_member(npz.zip, key, f"{where} (array {key})")
        arrays[key] = npz[key]
      return arrays
  except UserInputError:
    raise
  except MemoryError:  # A compressed member whose zip entry claims that much, say.
    raise UserInputError(f"{where}: an array in it needs more memory than this machine has; "
                         "check the file, or save a smaller one with np.savez") from None
  except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as e:
    raise load_error(e, where, "npz", "np.savez") from None


def _check_npz_member(archive: zipfile.ZipFile, key: str, where: str) -> None:
  """`check_npy_header` for the array `key` of an npz, against the bytes its member holds."""
  # Named as np.load names it: the member itself, else the member KEY.npy.
  member = key if key in archive.namelist() else key + ".npy"
  with archive.open(member) as stream:
    check_npy_header(stream, archive.getinfo(member).file_size, where, "np.savez")


def check_npy_header(stream, size: int, where: str, saver: str) -> None:
  """Raises `UserInputError` naming `where` when the .npy header at the start of `stream`
  claims more bytes of data than follow it in the `size` bytes of the file (or npz member).

  numpy allocates what the header claims before it reads any data, so a damaged header
  (10**12 rows) would end in a MemoryError. Streams without the .npy magic and object arrays
  (refused without pickle) are left to np.load; a malformed header raises numpy's ValueError.
  """
  head = io.BytesIO(stream.read(NPY_HEADER_READ))
  if not head.getvalue().startswith(np.lib.format.MAGIC_PREFIX):
    return
  version = np.lib.format.read_magic(head)
  read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                 else np.lib.format.read_array_header_2_0)
  shape, _, dtype = read_header(head)
  if dtype.hasobject:
    return
  claimed = math.prod(shape) * dtype.itemsize  # Python ints: no overflow.
  follow = size - head.tell()
  if claimed > follow:
    raise UserInputError(
        f"{where}: its header claims shape {shape} of {dtype} ({claimed} bytes of data) but "
        f"only {follow} bytes follow it ({size} in all); the file is truncated or its header is "
        f"damaged: save it again with {saver}")


def load_error(error: Exception, where: str, kind: str, saver: str) -> UserInputError:
  """What to say when numpy cannot load an array file of `kind`, which `saver` writes."""
  if "allow_pickle" in str(error):  # "Object arrays cannot be loaded when allow_pickle=False".
    return UserInputError(f"{where}: cannot read it without pickle ({error}); save plain arrays")
  return UserInputError(
      f"{where}: not a readable {kind} file ({first_line(error)}); save it again with {saver}")


def _splits_from_npz(file, where: str) -> Splits:
  """Reads the original exercise's cache layout: `X` (N, 784) uint8 and `y` (N,) labels, and
  optionally `class_names`, one string a label."""
  def choose(names: List[str]) -> List[str]:
    missing = {"X", "y"} - set(names)
    if missing:
      raise UserInputError(
          f"{where}: no array {', '.join(sorted(missing))} in the npz (it has "
          f"{', '.join(names) or 'none'}); it needs X (N, 784) uint8 and y (N,) labels")
    return ["X", "y"] + [name for name in ["class_names"] if name in names]

  arrays = npz_arrays(file, where, choose)
  everything = _split(arrays["X"], arrays["y"], where)
  class_names = (_given_class_names(arrays["class_names"], everything.labels, where)
                 if "class_names" in arrays else known_class_names(everything.labels))
  if len(everything) == sum(EXERCISE_SPLIT):
    ends = np.cumsum(EXERCISE_SPLIT)
    parts = [slice(0, ends[0]), slice(ends[0], ends[1]), slice(ends[1], ends[2])]
  else:
    parts = _stratified_80_10_10(everything.labels, where)
  return Splits(*(Split(everything.images[p], everything.labels[p]) for p in parts),
                class_names=class_names)


def _stratified_80_10_10(labels: np.ndarray, where: str) -> List[np.ndarray]:
  """Indices of train, validation and test: 80/10/10, stratified by class, the same every run."""
  from sklearn import model_selection  # Here: it takes a second to import.
  indices = np.arange(len(labels))
  try:
    train, rest = model_selection.train_test_split(
        indices, test_size=0.2, stratify=labels, random_state=SAMPLE_SPLIT_SEED)
    validation, test = model_selection.train_test_split(
        rest, test_size=0.5, stratify=labels[rest], random_state=SAMPLE_SPLIT_SEED)
  except ValueError as e:
    raise UserInputError(f"{where}: too few examples to split 80/10/10 by class ({e})") from None
  return [train, validation, test]


def _read_idx(path: str, magic: int, dims: int) -> np.ndarray:
  """Parses one IDX file (gzipped or not): big-endian magic, `dims` sizes, then uint8 data."""
  import tensorflow as tf
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
  expected = math.prod(shape)  # Python ints: numpy's int64 product overflows on big headers.
  if len(raw) - header != expected:
    raise UserInputError(
        f"{path}: header says shape {shape} ({expected} bytes) but {len(raw) - header} bytes "
        "follow; the file is truncated or corrupt, download it again")
  return np.frombuffer(raw, np.uint8, offset=header).reshape(shape)


def _load_idx_dir(directory: str) -> Splits:
  """Reads the four standard MNIST IDX files in `directory`, gzipped or not."""
  import tensorflow as tf

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
  return _hold_out_validation(parts["train"], parts["t10k"],
                              known_class_names(parts["t10k"].labels))


def _load_tfds(name: str, data_dir: str) -> Splits:
  """A 28x28 grey TFDS image dataset, downloaded when absent (see `trainer.data.tfds_source`), its
  class names from TFDS's metadata."""
  from trainer.data import tfds_source# Here: it imports TFDS, which is slow and rarely needed.
  loaded = tfds_source.load(name, data_dir)
  where = f"TFDS {name}"
  train, test = (_split(*loaded.arrays[split], where) for split in ("train", "test"))
  return _hold_out_validation(train, test, padded_class_names(loaded.class_names[:NUM_CLASSES]))


def _hold_out_validation(train: Split, test: Split, class_names: Tuple[str, ...]) -> Splits:
  """Keeps the last VALIDATION_FROM_TRAIN (or a sixth, if fewer) train examples for validation."""
  held = min(VALIDATION_FROM_TRAIN, len(train) // 6)
  cut = len(train) - held
  return Splits(Split(train.images[:cut], train.labels[:cut]),
                Split(train.images[cut:], train.labels[cut:]), test, class_names)


def border_pixels(images: np.ndarray) -> np.ndarray:
  """The outer ring of pixels of each of `images` (uint8 (N, 28, 28[, 1]), or one image
  without N), as (N, 108)."""
  side = IMAGE_SHAPE[0]
  square = np.asarray(images).reshape(-1, side, side)
  return np.concatenate([square[:, 0], square[:, -1], square[:, 1:-1, 0], square[:, 1:-1, -1]],
                        axis=1)


def background(images: np.ndarray) -> str:
  """"light" where the median pixel of the outer ring of `images` is above BRIGHT, else "dark".

  `images` is one uint8 image (28, 28[, 1]) or a batch (N, 28, 28[, 1]), whose rings count
  together: a training split's background is that of its typical image.
  """
  return "light" if float(np.median(border_pixels(images))) > BRIGHT else "dark"
