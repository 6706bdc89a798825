"""Tests of trainer.data.image_files: the reader of image and array files that predict and
batch_input share, what it takes and what it refuses."""

import importlib.resources
import re
import zipfile

import numpy as np
import pytest
import tensorflow as tf

from tests.sources_test import HUGE_SHAPE, huge_claim, npy_claiming
from trainer.data import image_files
from trainer.errors import UserInputError

def _images(n: int, seed: int = 0) -> np.ndarray:
  """Random uint8 images (N, 28, 28) that hold both ends of the range, 0 and 255."""
  images = np.random.default_rng(seed).integers(0, 256, (n, 28, 28)).astype(np.uint8)
  images[:, 0, 0], images[:, -1, -1] = 0, 255
  return images


def _image_file(tmp_path, name, content):
  path = tmp_path / name
  path.write_bytes(content if isinstance(content, bytes) else tf.io.encode_png(content).numpy())
  return str(path)


def test_read_image_file_takes_28x28_grey_and_grey_saved_as_rgb(tmp_path):
  grey = np.arange(784, dtype=np.uint32).reshape(28, 28, 1).astype(np.uint8)
  read = image_files.read_image_file(_image_file(tmp_path, "a.png", grey))
  np.testing.assert_array_equal(read, grey.reshape(1, 28, 28))
  rgb = np.repeat(grey, 3, axis=-1)
  np.testing.assert_array_equal(image_files.read_image_file(_image_file(tmp_path, "b.png", rgb)),
                                grey.reshape(1, 28, 28))
  jpeg = _image_file(tmp_path, "c.jpg", tf.io.encode_jpeg(np.full((28, 28, 1), 200, np.uint8))
                     .numpy())
  assert image_files.read_input(jpeg).shape == (1, 28, 28)


def test_read_image_file_resizes_only_when_asked(tmp_path):
  path = _image_file(tmp_path, "big.png", np.full((56, 84, 1), 200, np.uint8))
  with pytest.raises(UserInputError, match=r"big.png: 84x56 pixels, expected 28x28; pass "
                                           r"--resize to scale it"):
    image_files.read_image_file(path, resize=False)
  # A caller without a --resize flag (batch_input) asks for a 28x28 file instead.
  with pytest.raises(UserInputError) as e:
    image_files.read_image_file(path)
  assert str(e.value) == (f"{path}: 84x56 pixels, expected 28x28; resize it to 28x28 first "
                          "(nothing is resized here)")
  resized = image_files.read_image_file(path, resize=True)
  assert resized.shape == (1, 28, 28) and (resized == 200).all()


@pytest.mark.parametrize("name, content, message", [
    ("notes.png", b"these are not pixels",
     "not an image; give a PNG, JPEG, GIF or BMP image, or .npy/.npz arrays"),
    ("notes.txt", b"these are not pixels", "not an image"),
    ("red.png", np.stack([np.full((28, 28), 200, np.uint8)] + [np.zeros((28, 28), np.uint8)] * 2,
                         axis=-1), "a colour or transparent image; save it as 8-bit greyscale"),
    ("clear.png", np.concatenate([np.zeros((28, 28, 1), np.uint8),
                                  np.full((28, 28, 1), 100, np.uint8)], axis=-1),
     "a colour or transparent image"),
    ("deep.png", np.full((28, 28, 1), 1000, np.uint16),
     "16-bit pixels; save it as 8-bit greyscale \\(0-255\\), nothing is rescaled here"),
])
def test_read_image_file_refuses_what_is_not_a_grey_image(tmp_path, name, content, message):
  with pytest.raises(UserInputError, match=f"^{re.escape(str(tmp_path / name))}: {message}"):
    image_files.read_input(_image_file(tmp_path, name, content))


def test_a_missing_input_is_named(tmp_path):
  for name in ("missing.png", "missing.npz", "missing.npy"):
    with pytest.raises(UserInputError, match=f"^{re.escape(str(tmp_path / name))}: no such file$"):
      image_files.read_input(str(tmp_path / name))


@pytest.mark.parametrize("shape", [(3, 28, 28), (3, 28, 28, 1), (3, 784)])
def test_arrays_of_each_accepted_shape_come_out_as_28x28(tmp_path, shape):
  images = _images(3)
  np.savez(tmp_path / "digits.npz", images=images.reshape(shape))
  np.save(tmp_path / "digits.npy", images.reshape(shape))
  for name in ("digits.npz", "digits.npy"):
    np.testing.assert_array_equal(image_files.read_input(str(tmp_path / name)), images)


def test_npz_array_is_the_only_one_else_images_else_x_else_the_key(tmp_path):
  a, b = _images(2, seed=1), _images(3, seed=2)
  only = str(tmp_path / "only.npz")
  np.savez(only, whatever=a)
  np.testing.assert_array_equal(image_files.read_array(only), a)
  named = str(tmp_path / "named.npz")
  np.savez(named, images=a, other=b)
  np.testing.assert_array_equal(image_files.read_array(named), a)
  np.testing.assert_array_equal(image_files.read_input(named, key="other"), b)
  # The trainer's npz layout (X rows of 784, y labels, class names) reads without a key.
  training = str(tmp_path / "training.npz")
  np.savez(training, X=b.reshape(3, 784), y=np.arange(3), class_names=np.array(["a", "b", "c"]))
  np.testing.assert_array_equal(image_files.read_array(training), b)
  sample = str(importlib.resources.files("trainer") / "assets" / "mnist_5k.npz")
  assert image_files.read_array(sample).shape == (5000, 28, 28)


def test_npz_without_the_array_lists_its_arrays(tmp_path):
  path = str(tmp_path / "two.npz")
  np.savez(path, first=_images(1), second=_images(1))
  with pytest.raises(UserInputError) as e:
    image_files.read_array(path)
  assert str(e.value) == (f"{path}: several arrays (first, second) and none named images or X; "
                          "pass --key=NAME to say which holds the images")
  with pytest.raises(UserInputError) as e:
    image_files.read_array(path, key="images")
  assert str(e.value) == (f"{path}: no array named 'images'; it has first, second: pass --key "
                          "with one of them")
  labels = str(tmp_path / "labels.npz")
  np.savez(labels, X=np.zeros((2, 784), np.uint8), y=np.arange(2))
  with pytest.raises(UserInputError, match=r"\(array y\): images of shape \(2,\), expected"):
    image_files.read_array(labels, key="y")


def test_array_files_that_are_not_what_their_name_says_are_refused(tmp_path):
  (tmp_path / "fake.npz").write_bytes(b"not a zip archive")
  (tmp_path / "fake.npy").write_bytes(b"not an array")
  with pytest.raises(UserInputError, match="fake.npz: not an npz file \\(no zip header\\)"):
    image_files.read_array(str(tmp_path / "fake.npz"))
  with pytest.raises(UserInputError, match="fake.npy: not an .npy file \\(no NumPy header\\)"):
    image_files.read_array(str(tmp_path / "fake.npy"))
  np.save(tmp_path / "objects.npy", np.array([None, 1], dtype=object))
  with pytest.raises(UserInputError, match="objects.npy: cannot read it without pickle"):
    image_files.read_array(str(tmp_path / "objects.npy"))
  np.save(tmp_path / "cut.npy", _images(2))
  (tmp_path / "cut.npy").write_bytes((tmp_path / "cut.npy").read_bytes()[:-100])
  with pytest.raises(UserInputError, match=r"cut.npy: its header claims shape \(2, 28, 28\) of "
                     r"uint8 \(1568 bytes of data\) but only 1468 bytes follow .*np.save$"):
    image_files.read_array(str(tmp_path / "cut.npy"))


def test_arrays_whose_header_claims_more_data_than_the_file_holds_are_refused_unread(tmp_path):
  npy = tmp_path / "huge.npy"
  npy.write_bytes(npy_claiming(HUGE_SHAPE, np.float32))
  with pytest.raises(UserInputError) as e:
    image_files.read_array(str(npy))
  assert str(e.value) == huge_claim(str(npy), "float32", "np.save")
  npz = tmp_path / "huge.npz"
  with zipfile.ZipFile(npz, "w") as archive:
    archive.writestr("images.npy", npy_claiming(HUGE_SHAPE))
  with pytest.raises(UserInputError) as e:
    image_files.read_array(str(npz))
  assert str(e.value) == huge_claim(f"{npz} (array images)", "uint8", "np.savez")


@pytest.mark.parametrize("pixels, message", [
    (np.full((1, 28, 28), 300, np.int16), "pixel values range 300..300, outside 0-255"),
    (np.full((1, 28, 28), -1, np.int64), "pixel values range -1..-1, outside 0-255"),
    (np.full((1, 28, 28), 12.5, np.float32), "float32 pixels that are not all whole numbers"),
    (np.full((1, 28, 28), np.nan, np.float64), "float64 pixels that are not all whole numbers"),
    (np.ones((1, 28, 28), np.float32), "float32 pixels all within 0..1, which look scaled"),
    (np.ones((1, 28, 28), bool), "bool pixels, expected uint8 0-255"),
])
def test_pixels_that_are_not_0_to_255_are_refused_not_rescaled(tmp_path, pixels, message):
  path = str(tmp_path / "bad.npz")
  np.savez(path, images=pixels)
  with pytest.raises(UserInputError, match=f"^{re.escape(path)} \\(array images\\): {message}"):
    image_files.read_array(path)


@pytest.mark.parametrize("dtype", [np.int64, np.uint16, np.float32, np.float64])
def test_whole_numbers_0_to_255_in_another_dtype_are_taken_as_they_are(tmp_path, dtype):
  images = _images(2)
  path = str(tmp_path / "wide.npy")
  np.save(path, images.astype(dtype))
  converted = image_files.read_array(path)
  assert converted.dtype == np.uint8
  np.testing.assert_array_equal(converted, images)


def test_read_inputs_concatenates_every_image_in_order_and_wants_some(tmp_path):
  images = _images(4)
  np.savez(tmp_path / "three.npz", images=images[:3])
  png = _image_file(tmp_path, "one.png", images[3][..., np.newaxis])
  np.testing.assert_array_equal(image_files.read_inputs([str(tmp_path / "three.npz"), png]), images)
  empty = str(tmp_path / "empty.npz")
  np.savez(empty, images=np.zeros((0, 28, 28), np.uint8))
  with pytest.raises(UserInputError, match=f"no images in {re.escape(empty)}: nothing to predict"):
    image_files.read_inputs([empty])
