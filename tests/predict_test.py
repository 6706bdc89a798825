"""Tests of `python -m trainer.predict`, run as a user runs it."""

import os
import re

import numpy as np
import pytest
import tensorflow as tf

from tests import helpers


def _write_png(path, image):
  with open(path, "wb") as f:
    f.write(tf.io.encode_png(image).numpy())
  return str(path)


def _predict(*args):
  return helpers.run_module("trainer.predict", *args)


def test_predicts_each_image_inverting_a_black_on_white_one_with_a_note(finished_run, tmp_path):
  """Two checks of one command line (each run costs a TensorFlow start-up): every image's class
  and reconstruction beside it, and a black-on-white image inverted, with a note."""
  model_dir, _ = finished_run
  split = helpers.learnable_split(3, seed=9)
  paths = [_write_png(tmp_path / f"item{i}.png", split.images[i]) for i in range(3)]
  # The first digit again as on paper, black on white.
  black_on_white = _write_png(tmp_path / "paper.png", 255 - split.images[0])
  result = _predict(f"--model_dir={model_dir}", *paths, black_on_white)
  assert result.returncode == 0, result.stderr[-2000:]
  lines = result.stdout.strip().splitlines()
  assert len(lines) == 4
  for path, label, line in zip([*paths, black_on_white], [*split.labels, split.labels[0]], lines):
    match = re.fullmatch(rf"{re.escape(path)}: (\d) \(probability (0\.\d+|1\.0+)\), "
                         rf"reconstruction {re.escape(path[:-4])}_reconstruction\.png", line)
    assert match, line
    assert int(match.group(1)) == label  # The learnable classes are easy: all are right.
    reconstruction = tf.io.decode_png(open(path[:-4] + "_reconstruction.png", "rb").read())
    assert reconstruction.shape == (28, 28, 1)
  notes = [line for line in result.stderr.splitlines() if line.startswith("note: ")]
  assert notes == [f"note: {black_on_white} looks black on white; inverted it to white on black "
                   "as MNIST (--invert=never to keep it)"]
  # The reconstruction is of what the model saw: the inverted, white-on-black image.
  reconstructions = [open(tmp_path / f"{name}_reconstruction.png", "rb").read()
                     for name in ["item0", "paper"]]
  assert reconstructions[0] == reconstructions[1]
  assert tf.io.decode_png(reconstructions[1]).numpy().mean() < 127


# The slow tier: each of these runs the command again, another TensorFlow start-up (6-7 s). The
# fast tier runs it once (above) and checks the image reader's refusals without a process
# (sources_test); the command's own refusals (one error line, nothing written) and
# --invert=never run in the whole suite.


@pytest.mark.slow
def test_refuses_a_bad_image_before_writing_anything(finished_run, tmp_path):
  model_dir, _ = finished_run
  good = _write_png(tmp_path / "good.png", np.zeros((28, 28, 1), np.uint8))
  colour = np.zeros((28, 28, 3), np.uint8)
  colour[..., 0] = 200
  bad = _write_png(tmp_path / "colour.png", colour)
  result = _predict(f"--model_dir={model_dir}", good, bad)
  helpers.assert_one_error_line(
      result, f"{bad}: a colour or transparent image; convert it to greyscale, white on black",
      whole=True)
  assert sorted(os.listdir(tmp_path)) == ["colour.png", "good.png"]


@pytest.mark.slow
def test_refuses_inputs_whose_reconstructions_would_clash(finished_run, tmp_path):
  model_dir, _ = finished_run
  image = np.zeros((28, 28, 1), np.uint8)
  paths = [_write_png(tmp_path / "a.png", image), str(tmp_path / "a.jpg")]
  (tmp_path / "a.jpg").write_bytes(tf.io.encode_jpeg(image).numpy())
  result = _predict(f"--model_dir={model_dir}", *paths)
  helpers.assert_one_error_line(
      result, "two images would share a reconstruction file, or one would overwrite an input "
      "(NAME.png and NAME.jpg, or NAME_reconstruction.png): rename them", whole=True)
  assert sorted(os.listdir(tmp_path)) == ["a.jpg", "a.png"]


@pytest.mark.slow
def test_invert_never_keeps_a_black_on_white_image_as_it_is(finished_run, tmp_path):
  model_dir, _ = finished_run
  split = helpers.learnable_split(1, seed=4)
  black_on_white = _write_png(tmp_path / "paper.png", 255 - split.images[0])
  result = _predict(f"--model_dir={model_dir}", "--invert=never", black_on_white)
  assert result.returncode == 0, result.stderr[-2000:]
  assert "note: " not in result.stderr
  assert result.stdout.startswith(f"{black_on_white}: ")
