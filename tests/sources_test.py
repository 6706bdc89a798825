"""Tests of trainer.sources: every --dataset source, its splits, and its refusals of bad files."""

import re

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from tests import helpers
from trainer import sources
from trainer.config import UserInputError


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


def test_missing_and_unknown_sources_are_refused(tmp_path):
  with pytest.raises(UserInputError, match="no file at"):
    sources.load_splits(f"npz:{tmp_path}/absent.npz")
  with pytest.raises(UserInputError, match="unknown --dataset='cifar'"):
    sources.load_splits("cifar")
  (tmp_path / "not.npz").write_bytes(b"hello")
  with pytest.raises(UserInputError, match="not a readable npz"):
    sources.load_splits(f"npz:{tmp_path}/not.npz")


def test_tfds_source_through_mock_data():
  with tfds.testing.mock_data(num_examples=120):
    splits = sources.load_splits("mnist", data_dir="/nonexistent")
  _check_splits(splits, (100, 20, 120))


def _image_file(tmp_path, name, content):
  path = tmp_path / name
  path.write_bytes(content if isinstance(content, bytes) else tf.io.encode_png(content).numpy())
  return str(path)


def test_read_image_file_takes_28x28_grey_and_grey_saved_as_rgb(tmp_path):
  grey = np.arange(784, dtype=np.uint32).reshape(28, 28, 1).astype(np.uint8)
  np.testing.assert_array_equal(sources.read_image_file(_image_file(tmp_path, "a.png", grey)), grey)
  rgb = np.repeat(grey, 3, axis=-1)
  np.testing.assert_array_equal(sources.read_image_file(_image_file(tmp_path, "b.png", rgb)), grey)


def test_read_image_file_resizes_only_when_asked(tmp_path):
  path = _image_file(tmp_path, "big.png", np.full((56, 84, 1), 200, np.uint8))
  with pytest.raises(UserInputError, match=r"big.png: 84x56 pixels, expected 28x28; pass "
                                           r"--resize to scale it"):
    sources.read_image_file(path)
  resized = sources.read_image_file(path, resize=True)
  assert resized.shape == (28, 28, 1) and (resized == 200).all()


@pytest.mark.parametrize("name, content, message", [
    ("notes.png", b"these are not pixels", "not an image; give a PNG, JPEG, GIF or BMP file"),
    ("red.png", np.stack([np.full((28, 28), 200, np.uint8)] + [np.zeros((28, 28), np.uint8)] * 2,
                         axis=-1), "a colour or transparent image; convert it to greyscale"),
    ("clear.png", np.concatenate([np.zeros((28, 28, 1), np.uint8),
                                  np.full((28, 28, 1), 100, np.uint8)], axis=-1),
     "a colour or transparent image"),
])
def test_read_image_file_refuses_what_is_not_a_grey_image(tmp_path, name, content, message):
  with pytest.raises(UserInputError, match=re.escape(f"{name}: {message}")):
    sources.read_image_file(_image_file(tmp_path, name, content))
