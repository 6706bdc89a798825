"""Tests of trainer.data.sources: every --dataset source, its splits and class names, its refusals
of bad files, and the background of images."""

import functools
import io
import os
import subprocess
import zipfile

import numpy as np
import pytest
import tensorflow_datasets as tfds

from tests import helpers
from trainer.data import sources
from trainer.errors import UserInputError


def _check_splits(splits, sizes):
  for split, size in zip((splits.train, splits.validation, splits.test), sizes):
    assert split.images.shape == (size, 28, 28, 1) and split.images.dtype == np.uint8
    assert split.labels.shape == (size,) and split.labels.dtype == np.int32


def test_mnist_sample_is_shipped_and_split_80_10_10_by_class():
  splits = sources.load_splits("mnist_sample")
  _check_splits(splits, (4000, 500, 500))
  for split in (splits.validation, splits.test):
    assert np.bincount(split.labels).tolist() == [50] * 10


def test_npz_of_70000_uses_the_exercise_split(tmp_path):
  labels = np.arange(70_000) % 10
  images = np.zeros((70_000, 784), np.uint8)
  images[:, 0] = np.arange(70_000) // 1000  # Marks each row's position.
  splits = sources.load_splits(helpers.write_npz(tmp_path / "mnist.npz", X=images, y=labels))
  _check_splits(splits, (50_000, 10_000, 10_000))
  assert splits.validation.images[0, 0, 0, 0] == 50 and splits.test.images[0, 0, 0, 0] == 60


@pytest.mark.parametrize("gzipped", [True, False])
def test_idx_files_parse_gzipped_or_not(tmp_path, gzipped):
  splits = sources.load_splits(helpers.write_idx_dir(tmp_path, gzipped))
  _check_splits(splits, (50, 10, 20))
  assert splits.train.labels[:3].tolist() == [0, 1, 2]
  assert splits.test.images.max() == 9


@pytest.mark.parametrize("override, message", [
    ({"train-images-idx3-ubyte": helpers.idx_bytes(np.zeros((60, 28, 28)), 0x801)}, "IDX magic number"),
    ({"train-images-idx3-ubyte": helpers.idx_bytes(np.zeros((60, 28, 28)), 0x803)[:-100]}, "truncated"),
    ({"train-labels-idx1-ubyte": helpers.idx_bytes(np.zeros(59), 0x801)}, "60 images but 59 labels"),
    ({"train-labels-idx1-ubyte": helpers.idx_bytes(np.full(60, 11), 0x801)}, "expected digits 0-9"),
])
def test_broken_idx_files_are_refused(tmp_path, override, message):
  with pytest.raises(UserInputError, match=message):
    sources.load_splits(helpers.write_idx_dir(tmp_path, gzipped=True, **override))


def test_idx_header_past_int64_reports_the_bytes_it_claims(tmp_path):
  # 2**31 * 2**31 * 3 bytes overflow a 64-bit product (to a negative count): Python ints do not.
  claimed = (0x803).to_bytes(4, "big") + b"".join(
      size.to_bytes(4, "big") for size in (2**31, 2**31, 3))
  dataset = helpers.write_idx_dir(tmp_path, False,
                                  **{"train-images-idx3-ubyte": claimed + bytes(10)})
  with pytest.raises(UserInputError) as e:
    sources.load_splits(dataset)
  assert str(e.value) == (
      f"{tmp_path}/train-images-idx3-ubyte: header says shape (2147483648, 2147483648, 3) "
      f"({3 * 2**62} bytes) but 10 bytes follow; the file is truncated or corrupt, download it "
      "again")


def test_idx_dir_without_files_is_refused(tmp_path):
  with pytest.raises(UserInputError, match="no train-images-idx3-ubyte"):
    sources.load_splits(f"idx:{tmp_path}")


@pytest.mark.parametrize("arrays, message", [
    ({"X": np.zeros((100, 784), np.uint8)}, "no array y"),
    ({"X": np.zeros((100, 30), np.uint8), "y": np.zeros(100)}, "expected \\(N, 784\\)"),
    ({"X": np.zeros((100, 784), np.float32), "y": np.zeros(100, int)}, "expected uint8"),
    ({"X": np.zeros((100, 784), np.uint8), "y": np.full(100, 10)}, "expected digits 0-9"),
    ({"X": np.zeros((100, 784), np.uint8), "y": np.array([None] * 100)}, "without pickle"),
])
def test_broken_npz_files_are_refused(tmp_path, arrays, message):
  with pytest.raises(UserInputError, match=message):
    sources.load_splits(helpers.write_npz(tmp_path / "bad.npz", **arrays))


# A shape whose data (784 TB) no machine holds: np.load would try to allocate it.
HUGE_SHAPE = (10**12, 784)


def npy_claiming(shape, dtype=np.uint8) -> bytes:
  """An .npy file whose valid header claims `shape` of `dtype` but with 100 bytes of data."""
  header = io.BytesIO()
  np.lib.format.write_array_header_1_0(header, {
      "descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
      "shape": shape})
  return header.getvalue() + bytes(100)


def huge_claim(where: str, dtype: str, saver: str) -> str:
  """The refusal of `npy_claiming(HUGE_SHAPE, dtype)` (128 bytes of header) at `where`."""
  return (f"{where}: its header claims shape (1000000000000, 784) of {dtype} "
          f"({784 * 10**12 * np.dtype(dtype).itemsize} bytes of data) but only 100 bytes follow "
          f"it (228 in all); the file is truncated or its header is damaged: save it again "
          f"with {saver}")


@pytest.mark.parametrize("compression", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED])
def test_npz_whose_header_claims_more_data_than_it_holds_is_refused_unread(tmp_path, compression):
  path = tmp_path / "huge.npz"
  with zipfile.ZipFile(path, "w", compression) as archive:
    archive.writestr("X.npy", npy_claiming(HUGE_SHAPE))
    archive.writestr("y.npy", npy_claiming((100,), np.int64)[:-100] + bytes(800))
  with pytest.raises(UserInputError) as e:
    sources.load_splits(f"npz:{path}")
  assert str(e.value) == huge_claim(f"{path} (array X)", "uint8", "np.savez")


def test_an_npz_array_too_large_for_memory_is_one_error_line(tmp_path, monkeypatch):
  # A deflated member may truly hold what its header claims, and still not fit: numpy's own
  # allocation fails (stood in for here; a real one would take this machine's memory).
  path = helpers.write_npz(str(tmp_path / "large.npz"), X=np.zeros((100, 784), np.uint8),
                           y=np.zeros(100, np.uint8))
  def no_memory(*args, **kwargs):
    raise MemoryError()
  monkeypatch.setattr(np.lib.format, "read_array", no_memory)
  with pytest.raises(UserInputError, match=r"large.npz: an array in it needs more memory than "):
    sources.load_splits(path)


def test_missing_and_unknown_sources_are_refused(tmp_path):
  with pytest.raises(UserInputError, match="no file at"):
    sources.load_splits(f"npz:{tmp_path}/absent.npz")
  with pytest.raises(UserInputError, match="unknown --dataset='cifar'"):
    sources.load_splits("cifar")
  (tmp_path / "not.npz").write_bytes(b"hello")
  with pytest.raises(UserInputError, match="not an npz file"):
    sources.load_splits(f"npz:{tmp_path}/not.npz")


def test_tfds_source_through_mock_data():
  with tfds.testing.mock_data(num_examples=120):
    splits = sources.load_splits("mnist", data_dir="/nonexistent")
  _check_splits(splits, (100, 20, 120))



# Class names: the dataset's where it has them, recognised exactly, never from a file name.


@functools.lru_cache(maxsize=None)
def fashion_mnist_dir():
  """The directory of Debian's Fashion-MNIST IDX files (`dpkg -L dataset-fashion-mnist` lists
  them), or None where the package is not installed."""
  try:
    listing = subprocess.run(["dpkg", "-L", "dataset-fashion-mnist"], capture_output=True,
                             text=True, check=False).stdout
  except OSError:  # Not Debian.
    return None
  for line in listing.splitlines():
    if line.endswith("/t10k-labels-idx1-ubyte.gz") and os.path.exists(line):
      return os.path.dirname(line)
  return None


needs_fashion_mnist = pytest.mark.skipif(
    fashion_mnist_dir() is None,
    reason="needs Debian's Fashion-MNIST: apt-get install -y dataset-fashion-mnist")


@needs_fashion_mnist
def test_fashion_mnist_is_recognised_by_its_labels_as_idx_and_as_npz(tmp_path):
  splits = sources.load_splits(f"idx:{fashion_mnist_dir()}")
  assert splits.class_names == sources.FASHION_MNIST_CLASSES
  assert splits.class_names[9] == "Ankle boot"
  # Garments on black, whatever their own brightness: the run records a dark background.
  assert sources.background(splits.train.images) == "dark"
  # The trainer's npz layout: all 70,000 in the order Fashion-MNIST ships them.
  parts = (splits.train, splits.validation, splits.test)
  images = np.concatenate([part.images for part in parts]).reshape(-1, 784)
  labels = np.concatenate([part.labels for part in parts]).astype(np.uint8)
  npz = sources.load_splits(helpers.write_npz(tmp_path / "anything.npz", X=images, y=labels))
  assert npz.class_names == sources.FASHION_MNIST_CLASSES
  assert len(npz.train) == 50_000
  # One label changed, or the same labels in another order: not Fashion-MNIST as it ships.
  labels[0] = (labels[0] + 1) % 10
  assert sources.load_splits(helpers.write_npz(
      tmp_path / "fashion_mnist.npz", X=images, y=labels)).class_names == sources.DIGITS
  assert sources.known_class_names(np.sort(splits.test.labels)) == sources.DIGITS


def test_digits_are_named_by_themselves_and_an_npz_may_name_its_classes(tmp_path):
  assert sources.load_splits("mnist_sample").class_names == tuple("0123456789")
  assert sources.load_splits(helpers.write_idx_dir(tmp_path, gzipped=True)).class_names == (
      sources.DIGITS)
  images, labels = np.zeros((100, 784), np.uint8), np.arange(100) % 3
  for names in (np.array(["cat", "dog", "bird"]), np.array([b"cat", b"dog", b"bird"])):
    splits = sources.load_splits(helpers.write_npz(
        tmp_path / "pets.npz", X=images, y=labels, class_names=names))
    # The model has ten outputs: those the dataset does not name keep their digit.
    assert splits.class_names == ("cat", "dog", "bird", *"3456789")


@pytest.mark.parametrize("names, message", [
    (np.array(["cat", "dog"]), "labels go up to 2 but class_names has only 2 names"),
    (np.array([1, 2, 3]), "class_names is int64 of shape \\(3,\\); save 1 to 10 strings"),
    (np.array([["cat", "dog", "bird"]]), "class_names is <U4 of shape \\(1, 3\\)"),
    (np.array(["cat", "", "bird"]), "class_names has an empty name"),
    (np.array(["cat", None, "bird"], dtype=object), "cannot read it without pickle"),
])
def test_bad_class_names_in_an_npz_are_refused(tmp_path, names, message):
  dataset = helpers.write_npz(tmp_path / "pets.npz", X=np.zeros((30, 784), np.uint8),
                              y=np.arange(30) % 3, class_names=names)
  with pytest.raises(UserInputError, match=message):
    sources.load_splits(dataset)


def test_background_is_that_of_the_outer_ring_not_the_mean():
  image = np.zeros((28, 28), np.uint8)
  image[1:-1, 1:-1] = 255  # A bright garment filling all but the ring: mean far above 127.
  assert image.mean() > 200 and sources.background(image) == "dark"
  assert sources.background(255 - image) == "light"
  assert sources.border_pixels(image[np.newaxis, ..., np.newaxis]).shape == (1, 108)
  # A batch counts together: its typical image's ring.
  split = helpers.learnable_split(20)
  assert sources.background(split.images) == "dark"
  assert sources.background(255 - split.images) == "light"
