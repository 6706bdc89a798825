"""The report a person looks at after training: images of what the model does, and report.md.

`write_report` draws, from the exported model and the test split, under `directory`:
  reconstructions.png  test images (odd rows) above the export's reconstructions (even rows)
  confusion_matrix.png the test confusion matrix, its axes labelled with the class names
  curves.png           both task losses, accuracy and reconstruction MSE per epoch, train and
                       validation
  latent.png           the encoder's output on test images, projected to 2-D by PCA, by class
                       (a one-dimensional output: its value, a row per class)
  report.md            the final metrics and the four images
and, given a writer, sends the same images to TensorBoard. It reads the export, not the
training model, so it shows exactly what ships, whatever the strategy was. The class names
are the metrics' `class_names` (the dataset's, see `trainer.data.sources`), else the digits.
"""

import io
import os
from typing import Dict, List, Optional, Sequence

import matplotlib
import numpy as np
import tensorflow as tf
from matplotlib import ticker
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sklearn import decomposition, metrics as sk_metrics

from trainer.data.sources import DIGITS, NUM_CLASSES, Split
from trainer.job import run_directory
from trainer.multitask import export as export_lib

IMAGES = ("reconstructions", "confusion_matrix", "curves", "latent")
# The reconstruction grid: two examples of each class, each image scaled up this many times.
EXAMPLES_PER_CLASS = 2
PIXEL_SCALE = 3
FIGURE_DPI = 100
LATENT_POINTS = 2000  # Enough to see the clusters; more only hides them under each other.


def reconstruction_grid(images: np.ndarray, reconstructions: np.ndarray, columns: int
                        ) -> np.ndarray:
  """uint8 (H, W) grid: each row of `columns` test images above a row of their reconstructions,
  2-pixel grey gaps between cells."""
  cells = np.stack([images.reshape(-1, 28, 28).astype(np.float32) / 255.0,
                    reconstructions.reshape(-1, 28, 28)], axis=1)  # (N, 2, 28, 28)
  rows = -(-len(cells) // columns)
  gap = 2
  grid = np.full(((rows * 2) * (28 + gap) + gap, columns * (28 + gap) + gap), 0.5, np.float32)
  for index, pair in enumerate(cells):
    row, column = divmod(index, columns)
    for kind in range(2):
      top = (row * 2 + kind) * (28 + gap) + gap
      left = column * (28 + gap) + gap
      grid[top:top + 28, left:left + 28] = pair[kind]
  grid = np.kron(grid, np.ones((PIXEL_SCALE, PIXEL_SCALE), np.float32))
  return np.round(np.clip(grid, 0.0, 1.0) * 255).astype(np.uint8)


def _png(figure: Figure) -> bytes:
  buffer = io.BytesIO()
  FigureCanvasAgg(figure).print_png(buffer)  # Fixed size: figsize x dpi, no tight cropping.
  return buffer.getvalue()


def confusion_matrix_figure(labels: np.ndarray, predictions: np.ndarray,
                            class_names: Sequence[str] = DIGITS) -> Figure:
  """The test confusion matrix, counts in each cell, true class down, predicted across, both
  axes labelled with `class_names` (by label)."""
  figure = Figure(figsize=(6, 6), dpi=FIGURE_DPI)
  axes = figure.add_subplot()
  matrix = sk_metrics.confusion_matrix(labels, predictions, labels=range(NUM_CLASSES))
  # Names longer than a digit or two would run into each other along the bottom: slanted.
  slanted = any(len(name) > 2 for name in class_names)
  sk_metrics.ConfusionMatrixDisplay(matrix, display_labels=list(class_names)).plot(
      ax=axes, colorbar=False, values_format="d", xticks_rotation=45 if slanted else "horizontal")
  if slanted:
    for tick in axes.get_xticklabels():
      tick.set(horizontalalignment="right", rotation_mode="anchor")
  axes.set_title(f"test confusion matrix (accuracy {np.mean(labels == predictions):.4f})")
  figure.tight_layout()
  return figure


def curves_png(history: List[Dict]) -> bytes:
  """Per-epoch curves, train and validation: classifier loss, reconstruction MSE, accuracy,
  and the weight each task's loss had (learned ones move)."""
  figure = Figure(figsize=(10, 7), dpi=FIGURE_DPI)
  epochs = [entry["epoch"] for entry in history]
  panels = (("classifier_loss", "classifier loss (cross-entropy)"),
            ("reconstruction_mse", "decoder loss (reconstruction MSE)"),
            ("accuracy", "accuracy"), (None, "task loss weights"))
  for index, (name, title) in enumerate(panels):
    axes = figure.add_subplot(2, 2, index + 1)
    if name:
      for split in ("train", "validation"):
        axes.plot(epochs, [entry[split][name] for entry in history], marker="o", label=split)
    else:
      for task in history[0]["loss_weights"] if history else ():
        axes.plot(epochs, [entry["loss_weights"][task] for entry in history], marker="o",
                  label=task)
    axes.set_title(title)
    axes.set_xlabel("epoch")
    axes.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))  # No epoch 1.2.
    axes.grid(alpha=0.3)
    axes.legend()
  figure.tight_layout()
  return _png(figure)


def latent_view(dimensions: int) -> str:
  """What latent.png shows of a latent of `dimensions`: the end of its title and caption."""
  return "first two principal components" if dimensions >= 2 else "its one value, a row per class"


def latent_figure(latent: np.ndarray, labels: np.ndarray, class_names: Sequence[str] = DIGITS
                  ) -> Figure:
  """The latent vectors (N, D) on a plane, coloured by class and named in the legend by
  `class_names`: their first two principal components, or where D is 1, the value across and
  the class down (its rows named), each point moved a little up or down so that they do not
  hide each other."""
  if latent.shape[1] >= 2:
    points = decomposition.PCA(n_components=2, random_state=0).fit_transform(latent)
  else:  # --latent_dim=1 is a valid setting: its report shows the one value, not an error.
    jitter = np.random.default_rng(0).uniform(-0.3, 0.3, len(labels))
    points = np.stack([latent[:, 0], labels + jitter], axis=1)
  figure = Figure(figsize=(7, 6), dpi=FIGURE_DPI)
  axes = figure.add_subplot()
  colours = matplotlib.colormaps["tab10"]
  for label in range(NUM_CLASSES):
    chosen = labels == label
    axes.scatter(points[chosen, 0], points[chosen, 1], s=4, color=colours(label),
                 label=class_names[label])
  if latent.shape[1] < 2:
    axes.set_yticks(range(NUM_CLASSES), class_names)
    axes.invert_yaxis()  # The first class on top, as in the confusion matrix.
    axes.set_xlabel("latent value")
  axes.set_title(f"latent space of test images, {latent_view(latent.shape[1])}")
  axes.legend(title="class", markerscale=3, loc="best", fontsize="small")
  figure.tight_layout()
  return figure


def latent_png(latent: np.ndarray, labels: np.ndarray, class_names: Sequence[str] = DIGITS
               ) -> bytes:
  """`latent_figure(...)` as a PNG."""
  return _png(latent_figure(latent, labels, class_names))


def _markdown(metrics: Dict, history: List[Dict], latent_dimensions: int) -> str:
  rows = [("test accuracy", f"{metrics['test_accuracy']:.4f}"),
          ("test reconstruction MSE", f"{metrics['test_reconstruction_mse']:.5f}"),
          ("test classifier loss", f"{metrics['test_classifier_loss']:.4f}"),
          ("validation accuracy", f"{metrics['validation_accuracy']:.4f}"),
          ("validation reconstruction MSE", f"{metrics['validation_reconstruction_mse']:.5f}"),
          ("epochs", str(metrics["epochs"])),
          ("dataset", str(metrics["dataset"]))]
  if history:
    weights = ", ".join(f"{task} {value:.3g}" for task, value in
                        history[-1]["loss_weights"].items())
    rows.append((f"task loss weights ({metrics['config']['loss_weighting']})", weights))
  lines = ["# Training report", "", "| metric | value |", "|---|---|"]
  lines += [f"| {name} | {value} |" for name, value in rows]
  captions = {
      "reconstructions": "Test images (odd rows) and their reconstructions (even rows), two "
                         "of each class.",
      "confusion_matrix": "Test confusion matrix: true class down, predicted class across.",
      "curves": "Per-epoch losses, accuracy and task loss weights, train and validation.",
      "latent": f"The shared encoder's output on test images, {latent_view(latent_dimensions)}.",
  }
  for name in IMAGES:
    lines += ["", f"## {name.replace('_', ' ').capitalize()}", "", captions[name], "",
              f"![{name}]({name}.png)"]
  return "\n".join(lines) + "\n"


def write_report(export_dir: str, test: Split, history: List[Dict], metrics: Dict,
                 directory: str, writer: Optional[tf.summary.SummaryWriter] = None) -> None:
  """Writes the report's images and report.md under `directory` (local or gs://)."""
  exported = export_lib.load(export_dir)
  class_names = tuple(metrics.get("class_names") or DIGITS)
  examples = np.concatenate([np.flatnonzero(test.labels == label)[:EXAMPLES_PER_CLASS]
                             for label in range(NUM_CLASSES)])
  outputs = export_lib.predict_batches(exported, test.images)
  latent = export_lib.predict_batches(exported, test.images[:LATENT_POINTS], "latent")["latent"]
  grid = reconstruction_grid(test.images[examples], outputs["decoder"][examples],
                             columns=NUM_CLASSES)
  pngs = {
      "reconstructions": tf.io.encode_png(grid[..., np.newaxis]).numpy(),
      "confusion_matrix": _png(confusion_matrix_figure(
          test.labels, np.argmax(outputs["classifier"], axis=-1), class_names)),
      "curves": curves_png(history),
      "latent": latent_png(latent, test.labels[:LATENT_POINTS], class_names),
  }
  tf.io.gfile.makedirs(directory)
  for name, png in pngs.items():
    with tf.io.gfile.GFile(os.path.join(directory, f"{name}.png"), "wb") as f:
      f.write(png)
  with tf.io.gfile.GFile(os.path.join(directory, run_directory.REPORT_PAGE), "w") as f:
    f.write(_markdown(metrics, history, latent.shape[1]))
  if writer is not None:
    with writer.as_default(step=metrics["epochs"]):
      for name, png in pngs.items():
        tf.summary.image(f"report/{name}", tf.io.decode_png(png)[tf.newaxis])
    writer.flush()
