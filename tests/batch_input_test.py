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
from trainer.data import image_files
from trainer.errors import UserInputError

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


def test_inputs_are_read_by_the_reader_predict_uses(tmp_path):
  """One reader, trainer.data.image_files's (its own tests check what it takes and refuses): an npz,
  an .npy and a JPEG convert in order."""
  assert batch_input.as_images is image_files.as_images  # Still here for benchmarks/serving_compat.
  images = _images(4)
  np.savez(tmp_path / "two.npz", X=images[:2].reshape(2, 784), y=np.arange(2))
  np.save(tmp_path / "one.npy", images[2:3])
  flat = np.full((28, 28, 1), 200, np.uint8)  # JPEG keeps a flat grey exactly.
  (tmp_path / "one.jpg").write_bytes(tf.io.encode_jpeg(flat).numpy())
  read = image_files.read_inputs([str(tmp_path / name) for name in ("two.npz", "one.npy", "one.jpg")])
  np.testing.assert_array_equal(_parse(batch_input.instance_lines(read)),
                                np.concatenate([images[:3], flat.reshape(1, 28, 28)]))


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
def test_cli_converts_npz_npy_and_png_inputs_in_order(tmp_path):
  images = _images(5)
  npz = str(tmp_path / "digits.npz")
  np.savez(npz, X=images[:3].reshape(3, 784), y=np.arange(3))
  npy = str(tmp_path / "digit.npy")
  np.save(npy, images[3:4])
  png = _write_png(tmp_path / "one.png", images[4][..., np.newaxis])
  output = str(tmp_path / "out" / "instances.jsonl")
  result = helpers.run_module("launch.batch_input", f"--output={output}", npz, npy, png)
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.splitlines()[0] == (
      f"wrote 5 instances (one 28x28 image a line) to {output}")
  with open(output) as f:
    text = f.read()
  assert text.endswith("\n")
  np.testing.assert_array_equal(_parse(text.splitlines()), images)
  assert os.listdir(tmp_path / "out") == ["instances.jsonl"]


# In a process forked from one that has imported TensorFlow (helpers.run_command_forked): the
# test above starts the command for real.
@pytest.mark.slow
def test_cli_bad_input_is_one_error_line_exit_2_and_no_output(tmp_path):
  good = _write_png(tmp_path / "good.png", np.zeros((28, 28, 1), np.uint8))
  bad = _write_png(tmp_path / "small.png", np.zeros((14, 14, 1), np.uint8))
  output = tmp_path / "instances.jsonl"
  output.write_text("the previous lines\n")
  result = helpers.run_command_forked("launch.batch_input", f"--output={output}", good, bad,
                                      timeout=120)
  helpers.assert_one_error_line(
      result, f"{bad}: 14x14 pixels, expected 28x28; resize it to 28x28 first (nothing is "
      "resized here)", whole=True)
  assert result.stdout == ""
  assert output.read_text() == "the previous lines\n"  # Untouched, and no partial file beside it.
  assert sorted(os.listdir(tmp_path)) == ["good.png", "instances.jsonl", "small.png"]


def test_cli_without_inputs_says_how_to_call_it(tmp_path):
  result = helpers.run_module("launch.batch_input", f"--output={tmp_path / 'out.jsonl'}")
  helpers.assert_one_error_line(
      result, "no inputs given (images, or .npy/.npz arrays): python -m launch.batch_input "
      "--output=gs://BUCKET/instances.jsonl INPUT [INPUT ...]", whole=True)
  assert os.listdir(tmp_path) == []


def test_converted_lines_are_what_the_export_takes(finished_run, tmp_path):
  """The format check: lines fed as a batch, as the prediction service builds it from JSON,
  give the export's answers for the original uint8 images."""
  model_dir, _ = finished_run
  images = image_files.read_array(SAMPLE)[:32]  # Real digits: the packaged MNIST sample.
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
