"""Tests of `launch.batch_input`: images in, JSON lines out that the export takes as they are."""

import importlib.resources
import json
import os
import re

import numpy as np
import pytest
import tensorflow as tf

from launch import batch_input
from tests import helpers
from trainer.config import UserInputError

SAMPLE = str(importlib.resources.files("trainer") / "assets" / "mnist_5k.npz")


def _images(n: int, seed: int = 0) -> np.ndarray:
  """Random uint8 images (N, 28, 28) that hold both ends of the range, 0 and 255."""
  images = np.random.default_rng(seed).integers(0, 256, (n, 28, 28)).astype(np.uint8)
  images[:, 0, 0], images[:, -1, -1] = 0, 255
  return images


def _parse(lines) -> np.ndarray:
  return np.array([json.loads(line) for line in lines], np.uint8)


def _write_png(path, image) -> str:
  path.write_bytes(tf.io.encode_png(image).numpy())
  return str(path)


def test_lines_parse_back_to_the_exact_images():
  images = _images(5)
  lines = list(batch_input.instance_lines(images[..., np.newaxis]))  # (N, 28, 28, 1) too.
  assert len(lines) == 5
  for line, image in zip(lines, images):
    assert "\n" not in line and " " not in line
    parsed = json.loads(line)
    assert len(parsed) == 28 and all(len(row) == 28 for row in parsed)
    assert all(type(value) is int for row in parsed for value in row)  # 7, never 7.0.
    np.testing.assert_array_equal(np.array(parsed), image)


@pytest.mark.parametrize("shape", [(3, 28, 28), (3, 28, 28, 1), (3, 784)])
def test_npz_images_of_each_accepted_shape_come_out_as_28x28(tmp_path, shape):
  images = _images(3)
  path = str(tmp_path / "digits.npz")
  np.savez(path, images=images.reshape(shape))
  np.testing.assert_array_equal(batch_input.read_npz(path), images)


def test_npz_array_is_the_only_one_else_images_else_x_else_the_key(tmp_path):
  a, b = _images(2, seed=1), _images(3, seed=2)
  only = str(tmp_path / "only.npz")
  np.savez(only, whatever=a)
  np.testing.assert_array_equal(batch_input.read_npz(only), a)
  named = str(tmp_path / "named.npz")
  np.savez(named, images=a, other=b)
  np.testing.assert_array_equal(batch_input.read_npz(named), a)
  np.testing.assert_array_equal(batch_input.read_npz(named, key="other"), b)
  # The trainer's npz layout (X rows of 784, y labels) converts without a --key.
  training = str(tmp_path / "training.npz")
  np.savez(training, X=b.reshape(3, 784), y=np.arange(3))
  np.testing.assert_array_equal(batch_input.read_npz(training), b)


def test_npz_without_the_array_lists_its_arrays(tmp_path):
  path = str(tmp_path / "two.npz")
  np.savez(path, first=_images(1), second=_images(1))
  with pytest.raises(UserInputError) as e:
    batch_input.read_npz(path)
  assert str(e.value) == (f"{path}: several arrays (first, second) and none named images or X; "
                          "pass --key=NAME to say which holds the images")
  with pytest.raises(UserInputError) as e:
    batch_input.read_npz(path, key="images")
  assert str(e.value) == (f"{path}: no array named 'images'; it has first, second: pass --key "
                          "with one of them")
  labels = str(tmp_path / "labels.npz")
  np.savez(labels, X=np.zeros((2, 784), np.uint8), y=np.arange(2))
  with pytest.raises(UserInputError, match=r"\(array y\): images of shape \(2,\), expected"):
    batch_input.read_npz(labels, key="y")


def test_npz_that_is_not_one_is_refused(tmp_path):
  path = tmp_path / "fake.npz"
  path.write_bytes(b"not a zip archive")
  with pytest.raises(UserInputError, match="not an npz file"):
    batch_input.read_npz(str(path))


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
    batch_input.read_npz(path)


@pytest.mark.parametrize("dtype", [np.int64, np.uint16, np.float32, np.float64])
def test_whole_numbers_0_to_255_in_another_dtype_are_taken_as_they_are(tmp_path, dtype):
  images = _images(2)
  path = str(tmp_path / "wide.npz")
  np.savez(path, images=images.astype(dtype))
  converted = batch_input.read_npz(path)
  assert converted.dtype == np.uint8
  np.testing.assert_array_equal(converted, images)


def test_pngs_grey_or_grey_as_rgb_read_as_their_pixels(tmp_path):
  images = _images(2)
  grey = _write_png(tmp_path / "grey.png", images[0][..., np.newaxis])
  rgb = _write_png(tmp_path / "rgb.png", np.repeat(images[1][..., np.newaxis], 3, axis=-1))
  np.testing.assert_array_equal(batch_input.read_inputs([grey, rgb]), images)


def test_a_png_of_another_size_colour_or_format_is_refused_with_the_fix(tmp_path):
  large = _write_png(tmp_path / "large.png", np.zeros((32, 30, 1), np.uint8))
  with pytest.raises(UserInputError) as e:
    batch_input.read_png(large)
  assert str(e.value) == (f"{large}: 30x32 pixels, expected 28x28; resize it to 28x28 first "
                          "(nothing is resized here)")
  colour = np.zeros((28, 28, 3), np.uint8)
  colour[..., 0] = 200
  red = _write_png(tmp_path / "red.png", colour)
  with pytest.raises(UserInputError,
                     match=f"^{re.escape(red)}: a colour or transparent image; save it as 8-bit"):
    batch_input.read_png(red)
  jpeg = tmp_path / "photo.png"
  jpeg.write_bytes(tf.io.encode_jpeg(np.zeros((28, 28, 1), np.uint8)).numpy())
  with pytest.raises(UserInputError, match=f"^{re.escape(str(jpeg))}: not a PNG file"):
    batch_input.read_png(str(jpeg))
  deep = tmp_path / "deep.png"
  deep.write_bytes(tf.io.encode_png(np.full((28, 28, 1), 1000, np.uint16)).numpy())
  with pytest.raises(UserInputError, match=f"^{re.escape(str(deep))}: 16-bit pixels; save it"):
    batch_input.read_png(str(deep))


def test_inputs_of_other_kinds_or_without_images_are_refused(tmp_path):
  with pytest.raises(UserInputError, match="notes.txt: not an .npz or .png file"):
    batch_input.read_inputs([str(tmp_path / "notes.txt")])
  with pytest.raises(UserInputError, match="missing.png: no such file"):
    batch_input.read_inputs([str(tmp_path / "missing.png")])
  empty = str(tmp_path / "empty.npz")
  np.savez(empty, images=np.zeros((0, 28, 28), np.uint8))
  with pytest.raises(UserInputError, match=f"no images in {re.escape(empty)}: nothing to predict"):
    batch_input.read_inputs([empty])


def test_writes_to_an_object_store_path():
  # TensorFlow's in-memory file system stands in for gs://: written through tf.io.gfile alike.
  output = "ram://batch_input_test/instances.jsonl"
  images = _images(3)
  assert batch_input.write_lines(batch_input.instance_lines(images), output) == 3
  with tf.io.gfile.GFile(output) as f:
    np.testing.assert_array_equal(_parse(f.read().splitlines()), images)


def test_a_failed_write_leaves_no_file(tmp_path):
  (tmp_path / "file").write_text("a file where a directory should be")
  output = str(tmp_path / "file" / "instances.jsonl")
  with pytest.raises(UserInputError, match=f"^cannot write {re.escape(output)} "):
    batch_input.write_lines(batch_input.instance_lines(_images(2)), output)
  assert sorted(os.listdir(tmp_path)) == ["file"]


def test_an_interrupted_write_keeps_the_earlier_output_and_leaves_no_partial_file(tmp_path):
  output = tmp_path / "instances.jsonl"
  output.write_text("the previous lines\n")

  def interrupted():
    yield from batch_input.instance_lines(_images(2))
    raise KeyboardInterrupt

  with pytest.raises(KeyboardInterrupt):
    batch_input.write_lines(interrupted(), str(output))
  assert output.read_text() == "the previous lines\n"
  assert os.listdir(tmp_path) == ["instances.jsonl"]


@pytest.mark.slow  # A converter process end to end; keeps the fast tier under five minutes.
def test_cli_converts_npz_and_png_inputs_in_order(tmp_path):
  images = _images(4)
  npz = str(tmp_path / "digits.npz")
  np.savez(npz, X=images[:3].reshape(3, 784), y=np.arange(3))
  png = _write_png(tmp_path / "one.png", images[3][..., np.newaxis])
  output = str(tmp_path / "out" / "instances.jsonl")
  result = helpers.run_module("launch.batch_input", f"--output={output}", npz, png)
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.splitlines()[0] == (
      f"wrote 4 instances (one 28x28 image a line) to {output}")
  with open(output) as f:
    text = f.read()
  assert text.endswith("\n")
  np.testing.assert_array_equal(_parse(text.splitlines()), images)
  assert os.listdir(tmp_path / "out") == ["instances.jsonl"]


@pytest.mark.slow  # A converter process end to end; keeps the fast tier under five minutes.
def test_cli_bad_input_is_one_error_line_exit_2_and_no_output(tmp_path):
  good = _write_png(tmp_path / "good.png", np.zeros((28, 28, 1), np.uint8))
  bad = _write_png(tmp_path / "small.png", np.zeros((14, 14, 1), np.uint8))
  output = tmp_path / "instances.jsonl"
  output.write_text("the previous lines\n")
  result = helpers.run_module("launch.batch_input", f"--output={output}", good, bad)
  helpers.assert_one_error_line(
      result, f"{bad}: 14x14 pixels, expected 28x28; resize it to 28x28 first (nothing is "
      "resized here)", whole=True)
  assert result.stdout == ""
  assert output.read_text() == "the previous lines\n"  # Untouched, and no partial file beside it.
  assert sorted(os.listdir(tmp_path)) == ["good.png", "instances.jsonl", "small.png"]


def test_cli_without_inputs_says_how_to_call_it(tmp_path):
  result = helpers.run_module("launch.batch_input", f"--output={tmp_path / 'out.jsonl'}")
  helpers.assert_one_error_line(
      result, "no inputs given (.npz or .png files): python -m launch.batch_input "
      "--output=gs://BUCKET/instances.jsonl INPUT [INPUT ...]", whole=True)
  assert os.listdir(tmp_path) == []


def test_converted_lines_are_what_the_export_takes(finished_run, tmp_path):
  """The format check: lines fed as a batch, as the prediction service builds it from JSON,
  give the export's answers for the original uint8 images."""
  model_dir, _ = finished_run
  images = batch_input.read_npz(SAMPLE)[:32]  # Real digits: the packaged MNIST sample.
  output = str(tmp_path / "instances.jsonl")
  batch_input.write_lines(batch_input.instance_lines(images), output)
  with open(output) as f:
    instances = [json.loads(line) for line in f]
  serve = tf.saved_model.load(os.path.join(model_dir, "export")).signatures["serving_default"]
  # The JSON values become a tensor of the signature's dtype, as TF Serving does with them.
  from_lines = serve(images=tf.constant(instances, tf.uint8))["classifier"].numpy()
  from_arrays = serve(images=tf.constant(images[..., np.newaxis]))["classifier"].numpy()
  assert from_lines.shape == (32, 10)
  np.testing.assert_allclose(from_lines, from_arrays, rtol=0, atol=1e-6)
  np.testing.assert_array_equal(from_lines.argmax(1), from_arrays.argmax(1))
  one = serve(images=tf.constant(instances[:1], tf.uint8))["classifier"].numpy()
  np.testing.assert_allclose(one, from_arrays[:1], rtol=0, atol=1e-6)
