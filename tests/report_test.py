"""Tests of the report drawn at the end of training (trainer.multitask.report, through train.run)."""

import os
import re

import numpy as np
import tensorflow as tf

from trainer.multitask import report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _png_size(path):
  with open(path, "rb") as f:
    header = f.read(24)
  assert header[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
  return int.from_bytes(header[16:20], "big"), int.from_bytes(header[20:24], "big")


def test_report_images_are_pngs_of_the_expected_sizes_and_report_md_links_them(finished_run):
  model_dir, _ = finished_run
  directory = os.path.join(model_dir, "report")
  cell = 28 + 2
  expected = {
      "reconstructions": ((10 * cell + 2) * report.PIXEL_SCALE,
                          (2 * report.EXAMPLES_PER_CLASS * cell + 2) * report.PIXEL_SCALE),
      "confusion_matrix": (600, 600), "curves": (1000, 700), "latent": (700, 600)}
  for name, size in expected.items():
    assert _png_size(os.path.join(directory, f"{name}.png")) == size, name
    image = tf.io.decode_png(open(os.path.join(directory, f"{name}.png"), "rb").read()).numpy()
    assert image.std() > 10, f"{name}.png is blank"
  markdown = open(os.path.join(directory, "report.md")).read()
  assert sorted(re.findall(r"!\[\w+\]\((\w+)\.png\)", markdown)) == sorted(expected)
  assert re.search(r"\| test accuracy \| [01]\.\d{4} \|", markdown)
  assert "| task loss weights (fixed) | classifier 1, decoder 8 |" in markdown


def test_reconstruction_grid_puts_each_image_above_its_reconstruction():
  images = np.zeros((3, 28, 28, 1), np.uint8)
  images[1] = 255
  reconstructions = np.full((3, 28, 28, 1), 0.0, np.float32)
  reconstructions[2] = 1.0
  grid = report.reconstruction_grid(images, reconstructions, columns=2)
  scale, cell = report.PIXEL_SCALE, 30

  def centre(row, column):
    return grid[(row * cell + 2 + 14) * scale, (column * cell + 2 + 14) * scale]

  # Row 0: images 0 and 1; row 1: their reconstructions; rows 2-3: image 2 and its own.
  assert [centre(0, 0), centre(0, 1), centre(1, 0), centre(1, 1)] == [0, 255, 0, 0]
  assert [centre(2, 0), centre(3, 0)] == [0, 255]


def test_the_confusion_matrix_names_its_classes_on_both_axes():
  from trainer.data import sources
  labels = np.arange(100) % 10
  figure = report.confusion_matrix_figure(labels, (labels + 1) % 10,
                                          sources.FASHION_MNIST_CLASSES)
  (axes,) = figure.axes
  for ticks in (axes.get_xticklabels(), axes.get_yticklabels()):
    assert [tick.get_text() for tick in ticks] == list(sources.FASHION_MNIST_CLASSES)
  assert axes.get_ylabel() == "True label" and axes.get_xlabel() == "Predicted label"
  assert axes.get_xticklabels()[0].get_rotation() == 45  # Long names are slanted to fit.
  # A run's report takes the names from its metrics; digits by default, upright.
  digits = report.confusion_matrix_figure(labels, labels).axes[0]
  assert [tick.get_text() for tick in digits.get_xticklabels()] == list("0123456789")
  assert digits.get_xticklabels()[0].get_rotation() == 0


def test_a_one_dimensional_latent_is_drawn_by_class(tmp_path):
  """--latent_dim=1 is valid: its report shows the one value, a row per class, where the
  principal components of the wider latents would fail."""
  from trainer.data import sources
  labels = np.arange(200) % 10
  latent = (labels + np.random.default_rng(0).normal(0, 0.2, 200))[:, np.newaxis]
  path = tmp_path / "latent.png"
  path.write_bytes(report.latent_png(latent.astype(np.float32), labels))
  assert _png_size(path) == (700, 600)
  assert tf.io.decode_png(path.read_bytes()).numpy().std() > 10
  figure = report.latent_figure(latent, labels, sources.FASHION_MNIST_CLASSES)
  (axes,) = figure.axes
  assert axes.get_title() == "latent space of test images, its one value, a row per class"
  assert [tick.get_text() for tick in axes.get_yticklabels()] == list(
      sources.FASHION_MNIST_CLASSES)


def test_the_report_images_go_to_tensorboard_too(finished_run):
  model_dir, _ = finished_run
  tags = set()
  for run in ("train", "report"):
    for path in tf.io.gfile.glob(os.path.join(model_dir, "logs", run, "events.out.tfevents.*")):
      for event in tf.compat.v1.train.summary_iterator(path):
        tags.update(value.tag for value in event.summary.value)
  assert {f"report/{name}" for name in report.IMAGES} <= tags
  assert {"loss_weight/classifier", "loss_weight/decoder"} <= tags


def test_history_holds_every_epochs_train_and_validation_metrics(finished_run):
  import json
  model_dir, _ = finished_run
  with open(os.path.join(model_dir, "history.json")) as f:
    history = json.load(f)["epochs"]
  assert [entry["epoch"] for entry in history] == [1, 2]
  for entry in history:
    assert set(entry["train"]) >= {"classifier_loss", "reconstruction_mse", "accuracy", "loss"}
    assert set(entry["validation"]) == {"classifier_loss", "reconstruction_mse", "accuracy"}
    assert entry["loss_weights"] == {"classifier": 1.0, "decoder": 8.0}
