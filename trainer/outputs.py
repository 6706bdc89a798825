"""The run directory: what a job writes under --model_dir, and reads back when run again.

`RunOutputs` owns the chief's shared outputs (checkpoints' directory, history.json, TensorBoard
runs, the export, the report, metrics.json) and gives every other worker a private scratch
directory instead, so the training loop writes through it without asking who is chief. Every
file goes through `tf.io.gfile`, so gs:// works as a local path does.
"""

import atexit
import dataclasses
import json
import os
import shutil
import tempfile
from typing import Dict, List, Optional

import tensorflow as tf
from absl import logging

from trainer.config import TrainConfig, UserInputError, first_line



def checkpoint_dir(config: TrainConfig) -> str:
  """Where checkpoints are read (by every worker) and written (by the chief)."""
  return config.checkpoint_dir or os.path.join(config.model_dir, "checkpoints")


def write_json(path: str, content: dict) -> None:
  """Writes through a temporary name, so readers never see a half-written file."""
  temporary = path + ".tmp"
  with tf.io.gfile.GFile(temporary, "w") as f:
    json.dump(content, f, indent=2, sort_keys=True)
  tf.io.gfile.rename(temporary, path, overwrite=True)


def _check_writable(flag: str, directory: str) -> None:
  """Fails now, not after the first epoch, where a directory cannot be written."""
  try:
    tf.io.gfile.makedirs(directory)
    probe = os.path.join(directory, ".write_test")
    with tf.io.gfile.GFile(probe, "w") as f:
      f.write("ok")
    tf.io.gfile.remove(probe)
  except (tf.errors.OpError, OSError) as e:
    raise UserInputError(
        f"cannot write to --{flag}={directory} ({type(e).__name__}); "
        "give a directory this job may write") from None


def results_line(metrics: Dict[str, object], model_dir: str) -> str:
  """The closing line of a job: its test metrics, and where its outputs are (the report
  where it was drawn: --noreport, or a failure to draw it, leaves none)."""
  report = os.path.join(model_dir, "report", "report.md")
  outputs = [f"metrics {os.path.join(model_dir, 'metrics.json')}",
             f"export {os.path.join(model_dir, 'export')}"]
  if tf.io.gfile.exists(report):
    outputs.append(f"report {report}")
  return (f"test accuracy {metrics['test_accuracy']:.4f}, reconstruction_mse "
          f"{metrics['test_reconstruction_mse']:.4f}; {', '.join(outputs)}")


class RunOutputs:
  """Where this worker writes: under --model_dir on the chief, a local scratch dir elsewhere.

  Non-chief workers must still take part in saving checkpoints (it is collective under
  multi-worker), so they save into a private scratch directory, deleted when the process
  exits however it ends; the rest of what they would write is dropped.
  """

  def __init__(self, config: TrainConfig, chief: bool):
    self.chief, self.model_dir = chief, config.model_dir
    if chief:
      root = config.model_dir
      for flag, directory in (("model_dir", root), ("checkpoint_dir", checkpoint_dir(config))):
        _check_writable(flag, directory)
    else:
      root = tempfile.mkdtemp(prefix="trainer-worker-")
      atexit.register(shutil.rmtree, root, ignore_errors=True)
    self.checkpoints = checkpoint_dir(config) if chief else os.path.join(root, "checkpoints")
    self.logs = (config.tensorboard_dir if chief else "") or os.path.join(root, "logs")
    self.export = os.path.join(root, "export")
    self.history_path = os.path.join(config.model_dir, "history.json")
    self.metrics_path = os.path.join(config.model_dir, "metrics.json")
    self.config_path = os.path.join(config.model_dir, "config.json")
    # The controller's TensorBoard run of training scalars; none on other workers.
    self.train_logs = os.path.join(self.logs, "train") if chief else None
    # Created at the first epoch's end: a job that stops before logs no validation.
    self._validation_writer = None

  def read_config(self) -> Optional[Dict]:
    """The configuration the run saved when it started or was last resumed; None if none.

    A run directory with checkpoints but no config.json (deleted by hand) adopts the
    current flags: trainers too old to write one are refused by their checkpoint already.
    """
    if not tf.io.gfile.exists(self.config_path):
      return None
    try:
      with tf.io.gfile.GFile(self.config_path) as f:
        saved = json.load(f)
      if not isinstance(saved, dict):
        raise ValueError("not a JSON object")
      return saved
    except ValueError as e:
      raise UserInputError(
          f"{self.config_path} is not a run's configuration ({first_line(e)}); restore it, or "
          "delete it to adopt this command's flags") from None

  def write_config(self, config: TrainConfig) -> None:
    """Saves the configuration (chief only), once every check has passed."""
    if self.chief:
      write_json(self.config_path, dataclasses.asdict(config))

  def read_history(self, epochs_done: int) -> List[Dict]:
    """The per-epoch entries of the epochs a restored checkpoint has done (none if no file)."""
    if not tf.io.gfile.exists(self.history_path):
      return []
    try:
      with tf.io.gfile.GFile(self.history_path) as f:
        return [entry for entry in json.load(f)["epochs"] if entry["epoch"] <= epochs_done]
    except (ValueError, KeyError, TypeError) as e:
      raise UserInputError(
          f"{self.history_path} is not a training history ({first_line(e)}); delete it (the "
          "report's curves then start at the resumed epoch)") from None

  def record_epoch(self, history: List[Dict], entry: Dict, epochs: int, global_step: int,
                   images_per_second: Optional[float]) -> List[Dict]:
    """Logs an epoch's line and writes its entry to history.json, and its validation metrics
    to TensorBoard at `global_step` (the controller writes the train run at every call, under
    the same tags, so the two share a chart); returns the history."""
    history = [old for old in history if old["epoch"] < entry["epoch"]] + [entry]
    train, validation = entry["train"], entry["validation"]
    logging.info(
        "epoch %d/%d: loss %.4f, classifier_loss %.4f, reconstruction_mse %.4f, accuracy %.4f "
        "| validation: accuracy %.4f, reconstruction_mse %.4f | loss weights %s | %s images/s",
        entry["epoch"], epochs, train["loss"], train["classifier_loss"],
        train["reconstruction_mse"], train["accuracy"], validation["accuracy"],
        validation["reconstruction_mse"],
        ", ".join(f"{task} {weight:.4g}" for task, weight in entry["loss_weights"].items()),
        "-" if images_per_second is None else f"{images_per_second:.0f}")
    if not self.chief:
      return history
    write_json(self.history_path, {"epochs": history})
    self._validation_writer = self._validation_writer or tf.summary.create_file_writer(
        os.path.join(self.logs, "validation"))
    with self._validation_writer.as_default(step=global_step):
      for name, value in validation.items():
        tf.summary.scalar(name, value)
    self._validation_writer.flush()
    return history

  def finished_metrics(self, epochs: int, epochs_done: int,
                       checkpoint: Optional[str]) -> Optional[Dict[str, object]]:
    """The metrics of a finished job, or None where there is work left.

    `epochs_done` is what the restored `checkpoint` holds. A job is finished when metrics.json
    of its epochs exists beside a checkpoint of its last epoch's end: metrics.json is written
    last, so a job killed after that checkpoint but before it is not finished, and completes
    its export and report when run again. A larger --epochs extends a finished job; a smaller
    one than the epochs trained is refused.
    """
    if epochs_done > epochs:
      raise UserInputError(
          f"--epochs={epochs} is fewer than the {epochs_done} epochs the checkpoint "
          f"{checkpoint} has trained; pass --epochs={epochs_done} or more, or a new --model_dir")
    if epochs_done < epochs or not tf.io.gfile.exists(self.metrics_path):
      return None
    try:
      with tf.io.gfile.GFile(self.metrics_path) as f:
        metrics = json.load(f)
    except ValueError as e:
      raise UserInputError(
          f"{self.metrics_path} is not a job's metrics ({first_line(e)}); delete it and run "
          "again to evaluate and export the trained model") from None
    # Those of the checkpoint's epoch, not left by a shorter run that this one extended and
    # that stopped (SIGTERM at its last step, say) before replacing them.
    return metrics if metrics.get("epochs") == epochs_done else None

  def unmark_complete(self) -> None:
    """Removes metrics.json before the export is replaced: where it exists, the export beside
    it is complete, even on object stores, where a directory cannot be renamed atomically."""
    if self.chief and tf.io.gfile.exists(self.metrics_path):
      tf.io.gfile.remove(self.metrics_path)

  def write_metrics(self, metrics: Dict[str, object]) -> None:
    """Writes metrics.json, last: it marks the run's outputs complete."""
    if self.chief:
      write_json(self.metrics_path, metrics)

  def write_report(self, test_split, history: List[Dict], metrics: Dict[str, object]) -> None:
    """Draws the report (chief only); a failure is logged, not raised: the trained job must
    not be lost to it. Its images go to TensorBoard as a run of their own, `report`."""
    if not self.chief:
      return
    from trainer import report  # Here, not at the top: matplotlib takes a second to import.
    try:
      report.write_report(self.export, test_split, history, metrics,
                          os.path.join(self.model_dir, "report"),
                          tf.summary.create_file_writer(os.path.join(self.logs, "report")))
    except Exception as e:  # pylint: disable=broad-except
      logging.warning("the report could not be drawn (%s: %s); the model and metrics are saved",
                      type(e).__name__, first_line(e))
