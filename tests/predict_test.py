"""Tests of `python -m trainer.predict`: its decisions as functions, the command in this process
(`predict_inputs`, with the finished run's export), and run as a user runs it.

Each run of the command costs a TensorFlow start-up (6-7 s): the fast tier runs two that end
before TensorFlow starts (--help, clashing names), and checks the rest in this process. The
slow tier runs one normal call for real, and the refusals and overrides end to end in forked
processes.
"""

import json
import os
import re
import shutil
import stat

import numpy as np
import pytest
import tensorflow as tf

from tests import helpers
from tests.sources_test import (HUGE_SHAPE, fashion_mnist_dir, huge_claim, needs_fashion_mnist,
                                npy_claiming)
from trainer import predict
from trainer.data import sources
from trainer.errors import UserInputError

# A class and its probability as a line prints them; for digits, the digit alone.
CLASS = r"(\d)(?: ([^(]+))? \(probability (0\.\d{4}|1\.0000)\)"


def _write_png(path, image):
  """Writes a uint8 image, (H, W) or (H, W, C), as a PNG; returns its path."""
  image = np.asarray(image)
  with open(path, "wb") as f:
    f.write(tf.io.encode_png(image[..., np.newaxis] if image.ndim == 2 else image).numpy())
  return str(path)


def _predict(*args):
  return helpers.run_module("trainer.predict", *args)


def _png(path) -> np.ndarray:
  with open(path, "rb") as f:
    return tf.io.decode_png(f.read()).numpy()


# The inversion decision: by the background, never by the mean.


@needs_fashion_mnist
def test_inversion_follows_the_background_the_model_knows_not_the_mean():
  test = sources.load_splits(f"idx:{fashion_mnist_dir()}").test  # Fashion-MNIST's t10k.
  bright = test.images[test.images.reshape(len(test), -1).mean(axis=1) > 127]
  # Bright garments on black: the old rule (mean above 127) inverted every one of these.
  assert len(bright) == 565
  inverted = [predict.needs_inversion(image, "dark") for image in bright]
  assert not any(inverted)
  # Digits on paper, black on white: every one differs from MNIST's dark background.
  digits = sources.load_splits("mnist_sample").test.images
  assert all(predict.needs_inversion(255 - image, "dark") for image in digits)
  assert not any(predict.needs_inversion(image, "dark") for image in digits)
  # A run trained on light backgrounds turns it the other way; the flags override.
  assert predict.needs_inversion(digits[0], "light")
  assert not predict.needs_inversion(255 - digits[0], "light")
  assert predict.needs_inversion(bright[0], "dark", invert="always")
  assert not predict.needs_inversion(255 - digits[0], "dark", invert="never")


# What the run was trained on, from its metrics.json.


def test_a_finished_run_records_what_it_was_trained_on(finished_run):
  model_dir, _ = finished_run
  metrics = helpers.read_metrics(model_dir)
  assert metrics["class_names"] == list("0123456789")
  assert metrics["input_background"] == "dark"
  assert predict.trained_on(model_dir) == predict.Trained(sources.DIGITS, "dark")


def test_a_run_without_these_counts_as_digits_on_dark_and_damaged_ones_are_refused(tmp_path):
  assert predict.trained_on(str(tmp_path)) == predict.Trained(sources.DIGITS, "dark")
  metrics = tmp_path / "metrics.json"
  metrics.write_text(json.dumps({"epochs": 3, "test_accuracy": 0.9}))  # An older trainer's.
  assert predict.trained_on(str(tmp_path)) == predict.Trained(sources.DIGITS, "dark")
  for damage, message in [({"class_names": ["a", "b"]}, 'class_names is ["a", "b"], not a list '
                           "of 10 names"),
                          ({"input_background": "grey"}, 'input_background is "grey", not '
                           '"dark" or "light"')]:
    metrics.write_text(json.dumps(damage))
    with pytest.raises(UserInputError) as e:
      predict.trained_on(str(tmp_path))
    assert str(e.value) == (f"{metrics} is damaged: {message}; delete it and run the training "
                            "command again to write it anew")


# Where reconstructions go, and the clashes refused before anything is read.


def test_reconstructions_are_named_by_input_and_row():
  assert predict.reconstruction_path("in/a.png") == "in/a_reconstruction.png"
  assert predict.reconstruction_path("in/a.png", "out") == "out/a_reconstruction.png"
  assert predict.reconstruction_path("in/a.npz", "gs://b/out", 3) == (
      "gs://b/out/a_3_reconstruction.png")
  # No clash: an image's and an array's rows differ, and so do directories.
  predict.check_targets(["a.png", "a.npz", "b.npy", "a_x.png", "c/a.png"])
  predict.check_targets(["in/a.png", "other/a.png"])


@pytest.mark.parametrize("paths, output_dir, message", [
    (["a.png", "a.jpg"], "", "a.png and a.jpg would both write a_reconstruction.png: rename one "
     "of them, or predict them in calls with different --output_dir"),
    (["in/a.png", "other/a.png"], "out", "in/a.png and other/a.png would both write "
     "out/a_reconstruction.png"),
    (["a.npz", "a.npy"], "", "a.npz and a.npy would both write a_INDEX_reconstruction.png"),
    (["a.npz", "a_3.png"], "", "a.npz and a_3.png would both write a_3_reconstruction.png"),
    (["a_3.png", "a.npz"], "", "a.npz and a_3.png would both write a_3_reconstruction.png"),
    (["a.png", "a_reconstruction.png"], "", "the reconstruction of a.png would replace the "
     "input a_reconstruction.png: rename one of them, or pass --output_dir=DIR"),
    (["a.npz", "a_0_reconstruction.png"], "", "the reconstruction of a.npz would replace the "
     "input a_0_reconstruction.png"),
    (["a.png", "./a.png"], "", "./a.png is given twice; give each input once"),
])
def test_clashing_reconstructions_are_refused_from_the_paths_alone(paths, output_dir, message):
  with pytest.raises(UserInputError, match=f"^{re.escape(message)}"):
    predict.check_targets(paths, output_dir)


# The command in this process: every input answered or refused on its own.


def _checked_lines(text: str, pattern: str, count: int) -> list:
  """The lines of `text`: exactly `count`, each matching `pattern`."""
  lines = text.splitlines()
  assert len(lines) == count and all(re.fullmatch(pattern, line) for line in lines), text
  return lines


def test_each_input_is_predicted_or_refused_on_its_own_into_an_output_dir(finished_run, tmp_path,
                                                                            capsys):
  model_dir, _ = finished_run
  split = helpers.learnable_split(6, seed=9)
  inputs = tmp_path / "inputs"
  inputs.mkdir()
  good = _write_png(inputs / "item.png", split.images[0])
  np.savez(inputs / "rows.npz", images=split.images[1:4, ..., 0])
  np.save(inputs / "row.npy", split.images[4:5].reshape(1, 784))
  small = _write_png(inputs / "small.png", np.zeros((14, 14), np.uint8))
  missing = str(inputs / "missing.png")
  paths = [good, str(inputs / "rows.npz"), small, missing, str(inputs / "row.npy")]
  before = helpers.directory_state(inputs)
  os.chmod(inputs, stat.S_IRUSR | stat.S_IXUSR)  # Read-only (for all but root, who tests too).
  output_dir = str(tmp_path / "out" / "new")  # Created, with its parent.
  options = predict.Options(model_dir, output_dir=output_dir)
  try:
    predict.check_call(paths, options)
    assert predict.predict_inputs(paths, options) == 2
  finally:
    os.chmod(inputs, stat.S_IRWXU)
  out, err = capsys.readouterr()
  assert helpers.directory_state(inputs) == before  # Nothing written beside the inputs.
  assert err.splitlines() == [
      f"error: {small}: 14x14 pixels, expected 28x28; pass --resize to scale it",
      f"error: {missing}: no such file"]
  names = [good] + [f"{inputs}/rows.npz[{i}]" for i in range(3)] + [f"{inputs}/row.npy[0]"]
  targets = ["item"] + [f"rows_{i}" for i in range(3)] + ["row_0"]
  lines = _checked_lines(out, rf"\S+: {CLASS}, reconstruction \S+", len(names))
  for line, name, target, label in zip(lines, names, targets, split.labels[:5]):
    assert line.startswith(f"{name}: {label} (probability "), line  # The easy classes: right.
    assert line.endswith(f", reconstruction {output_dir}/{target}_reconstruction.png")
  assert sorted(os.listdir(output_dir)) == sorted(f"{t}_reconstruction.png" for t in targets)
  assert _png(f"{output_dir}/rows_2_reconstruction.png").shape == (28, 28, 1)

  # The same call again: every reconstruction exists, and is not replaced without --overwrite.
  state = helpers.directory_state(output_dir)
  assert predict.predict_inputs([good, str(inputs / "rows.npz")], options) == 4
  out, err = capsys.readouterr()
  assert out == "" and helpers.directory_state(output_dir) == state
  assert err.splitlines()[0] == (
      f"error: {good}: its reconstruction {output_dir}/item_reconstruction.png exists; pass "
      "--overwrite to replace it, or --output_dir=DIR to write elsewhere")
  assert err.splitlines()[3].startswith(f"error: {inputs}/rows.npz[2]: its reconstruction ")
  overwrite = predict.Options(model_dir, output_dir=output_dir, overwrite=True)
  assert predict.predict_inputs([good], overwrite) == 0
  assert capsys.readouterr().out.startswith(f"{good}: {split.labels[0]} ")


def test_an_array_whose_header_claims_more_data_than_it_holds_is_its_own_error_line(tmp_path,
                                                                                   capsys):
  """np.load would try to allocate what the header claims (784 TB): refused, the rest read."""
  huge, good = str(tmp_path / "huge.npy"), str(tmp_path / "good.npy")
  (tmp_path / "huge.npy").write_bytes(npy_claiming(HUGE_SHAPE))
  np.save(good, np.zeros((1, 28, 28), np.uint8))
  items, failed = predict.read_items([huge, good], predict.Options(str(tmp_path / "run")))
  assert failed == 1 and [item.name for item in items] == [f"{good}[0]"]
  assert capsys.readouterr().err.splitlines() == [f"error: {huge_claim(huge, 'uint8', 'np.save')}"]


def test_class_names_and_the_training_background_come_from_the_run(finished_run, tmp_path,
                                                                   capsys):
  """A copy of the run whose metrics.json says it was trained on Fashion-MNIST's classes on a
  light background: names are printed, and dark-background images are inverted."""
  model_dir, _ = finished_run
  run = tmp_path / "run"
  shutil.copytree(os.path.join(model_dir, "export"), run / "export")
  (run / "metrics.json").write_text(json.dumps({
      "class_names": list(sources.FASHION_MNIST_CLASSES), "input_background": "light"}))
  split = helpers.learnable_split(2, seed=3)
  dark = _write_png(tmp_path / "dark.png", split.images[0])
  light = _write_png(tmp_path / "light.png", 255 - split.images[1])
  assert predict.predict_inputs([dark, light], predict.Options(str(run))) == 0
  out, err = capsys.readouterr()
  assert err.splitlines() == [
      f"note: {dark} has a dark background, unlike the images the model was trained on; "
      "inverted it (--invert=never to keep it)"]
  lines = _checked_lines(out, rf"\S+: {CLASS}, reconstruction \S+", 2)
  for line, label in zip(lines, split.labels):
    label_shown, name = re.search(CLASS, line).group(1, 2)
    assert name == sources.FASHION_MNIST_CLASSES[int(label_shown)]


# The command as a user runs it.


@pytest.mark.slow  # A TensorFlow start-up (6-7 s); the fast tier predicts in this process.
def test_predicts_quietly_each_image_beside_it_inverting_one_on_paper(finished_run, tmp_path):
  """One command line (each run costs a TensorFlow start-up): every image's class and
  reconstruction beside it, a black-on-white image inverted with a note, and nothing else on
  standard error: no TensorFlow start-up lines."""
  model_dir, _ = finished_run
  split = helpers.learnable_split(3, seed=9)
  paths = [_write_png(tmp_path / f"item{i}.png", split.images[i]) for i in range(3)]
  # The first digit again as on paper, black on white.
  black_on_white = _write_png(tmp_path / "paper.png", 255 - split.images[0])
  result = _predict(f"--model_dir={model_dir}", *paths, black_on_white)
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stderr.splitlines() == [
      f"note: {black_on_white} has a light background, unlike the images the model was trained "
      "on; inverted it (--invert=never to keep it)"]
  lines = result.stdout.strip().splitlines()
  assert len(lines) == 4
  for path, label, line in zip([*paths, black_on_white], [*split.labels, split.labels[0]], lines):
    match = re.fullmatch(rf"{re.escape(path)}: (\d) \(probability (0\.\d+|1\.0+)\), "
                         rf"reconstruction {re.escape(path[:-4])}_reconstruction\.png", line)
    assert match, line
    assert int(match.group(1)) == label  # The learnable classes are easy: all are right.
    assert _png(path[:-4] + "_reconstruction.png").shape == (28, 28, 1)
  # The reconstruction is of what the model saw: the inverted, white-on-black image.
  reconstructions = [open(tmp_path / f"{name}_reconstruction.png", "rb").read()
                     for name in ["item0", "paper"]]
  assert reconstructions[0] == reconstructions[1]
  assert tf.io.decode_png(reconstructions[1]).numpy().mean() < 127


def test_help_is_its_own_and_exits_0():
  result = _predict("-h")
  assert result.returncode == 0 and result.stderr == ""
  assert result.stdout.startswith(predict.__doc__.strip().splitlines()[0])
  for flag in ("--model_dir=", "--output_dir=''", "--[no]overwrite  (default: off)",
               "--invert=auto", "--[no]resize", "--key=''"):
    assert flag in result.stdout, flag


def test_clashing_names_are_refused_before_tensorflow_starts(tmp_path):
  # A model_dir that is not there: the clash is found first, from the paths alone.
  result = _predict(f"--model_dir={tmp_path}/none", str(tmp_path / "a.png"),
                    str(tmp_path / "a.jpg"))
  helpers.assert_one_error_line(
      result, f"{tmp_path}/a.png and {tmp_path}/a.jpg would both write {tmp_path}/"
      "a_reconstruction.png: rename one of them, or predict them in calls with different "
      "--output_dir", whole=True)
  assert result.stderr.count("\n") == 1 and os.listdir(tmp_path) == []


# The slow tier: each of these runs the command again, in a process forked from one that has
# imported TensorFlow (helpers.run_command_forked; its start-up is paid once, in this tier):
# the real start-up's lines are checked above.


def _predict_forked(*args):
  return helpers.run_command_forked("trainer.predict", *args)


@pytest.mark.slow
def test_a_bad_input_is_one_error_line_the_others_are_predicted_and_the_exit_code_is_2(
    finished_run, tmp_path):
  model_dir, _ = finished_run
  good = _write_png(tmp_path / "good.png", np.zeros((28, 28, 1), np.uint8))
  colour = np.zeros((28, 28, 3), np.uint8)
  colour[..., 0] = 200
  bad = _write_png(tmp_path / "colour.png", colour)
  result = _predict_forked(f"--model_dir={model_dir}", bad, good)
  helpers.assert_one_error_line(
      result, f"{bad}: a colour or transparent image; save it as 8-bit greyscale", whole=True)
  assert result.stdout.startswith(f"{good}: ") and len(result.stdout.splitlines()) == 1
  assert sorted(os.listdir(tmp_path)) == ["colour.png", "good.png", "good_reconstruction.png"]


@pytest.mark.slow
def test_a_missing_export_is_one_error_line(tmp_path):
  image = _write_png(tmp_path / "a.png", np.zeros((28, 28, 1), np.uint8))
  result = _predict_forked(f"--model_dir={tmp_path}/none", image)
  helpers.assert_one_error_line(result, f"no exported model at {tmp_path}/none/export")
  assert os.listdir(tmp_path) == ["a.png"]


@pytest.mark.slow
def test_invert_never_keeps_a_black_on_white_image_as_it_is(finished_run, tmp_path):
  model_dir, _ = finished_run
  split = helpers.learnable_split(1, seed=4)
  black_on_white = _write_png(tmp_path / "paper.png", 255 - split.images[0])
  result = _predict_forked(f"--model_dir={model_dir}", "--invert=never", black_on_white)
  assert result.returncode == 0, result.stderr[-2000:]
  # No note, nothing else: but a forked process's device search logs the failed cuInit
  # unfiltered (the real start-up's standard error is checked whole above).
  assert [line for line in result.stderr.splitlines()
          if "failed call to cuInit" not in line] == [], result.stderr
  assert result.stdout.startswith(f"{black_on_white}: ")


def test_an_empty_aip_model_dir_is_said_to_be_empty(monkeypatch):
  monkeypatch.setenv("AIP_MODEL_DIR", "")
  with pytest.raises(UserInputError, match=r"\$AIP_MODEL_DIR is set but empty: pass a finished "
                                           r"job's --model_dir, or set"):
    predict.check_call(["image.png"], predict.Options(""))
