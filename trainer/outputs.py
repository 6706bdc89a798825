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
import zipfile
from typing import Dict, List, Optional

import tensorflow as tf
from absl import logging
from google.protobuf import message
from tensorflow.core.protobuf import saved_model_pb2

from trainer import storage
from trainer.export import KERAS_FILE
from trainer.config import TrainConfig
from trainer.errors import UserInputError, first_line

# What a JSON value of each setting's type must be, and its name in an error line.
_JSON_TYPES = {str: ((str,), "a string"), int: ((int,), "an integer"),
               float: ((int, float), "a number"), bool: ((bool,), "true or false")}

def checkpoint_dir(config: TrainConfig) -> str:
  """Where checkpoints are read (by every worker) and written (by the chief)."""
  return config.checkpoint_dir or os.path.join(config.model_dir, "checkpoints")


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


def read_json(path: str, fix: str, kind=dict):
  """The JSON value of the file at `path` if it is a `kind`; None if there is no file. Raises
  `UserInputError` naming the file, the problem and `fix` otherwise."""
  if not tf.io.gfile.exists(path):
    return None
  try:
    with tf.io.gfile.GFile(path) as f:
      value = json.load(f)
  except (ValueError, UnicodeDecodeError) as e:
    raise UserInputError(f"{path} is damaged: not JSON ({first_line(e)}); {fix}") from None
  if not isinstance(value, kind):
    raise UserInputError(f"{path} is damaged: not a JSON object; {fix}")
  return value


# The key of config.json that holds what the settings resolved to, beside the settings.
RESOLVED = "resolved"


def saved_precision(saved: Dict) -> Optional[str]:
  """The dtype policy a saved configuration's job resolved `--precision` to; None where its
  file does not say (written before it did)."""
  resolved = saved.get(RESOLVED)
  precision = resolved.get("precision") if isinstance(resolved, dict) else None
  return precision if isinstance(precision, str) else None


def read_saved_config(model_dir: str, fix: str) -> Optional[Dict]:
  """The configuration a run saved in `model_dir`/config.json, its fields' types checked; None
  if there is none. A damaged file raises `UserInputError` ending in `fix`."""
  path = os.path.join(model_dir, "config.json")
  saved = read_json(path, fix)
  problem = saved is not None and _config_problem(saved)
  if problem:
    raise UserInputError(f"{path} is damaged: {problem}; {fix}")
  return saved


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
      for flag, directory in (("model_dir", root), ("checkpoint_dir", checkpoint_dir(config)),
                              ("tensorboard_dir", config.tensorboard_dir)):
        if directory:
          storage.check_writable(flag, directory)
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
    """The configuration the run saved after its first checkpoint (and each resume's); None if
    there is none. A run directory with checkpoints but no config.json (deleted by hand)
    adopts the current flags: trainers too old to write one are refused by their checkpoint.
    """
    return read_saved_config(self.model_dir, "restore it, or delete it to adopt this "
                             "command's flags")

  def trained_files(self) -> List[str]:
    """The files of this run that show it has trained (config.json is written after its first
    checkpoint, history.json at its first epoch's end)."""
    return [path for path in (self.config_path, self.history_path) if tf.io.gfile.exists(path)]

  def write_config(self, config: TrainConfig, precision: str) -> None:
    """Saves the configuration (chief only), once every check has passed, with the dtype policy
    its `--precision` resolved to in this job (`auto` may resolve otherwise on another CPU)."""
    if self.chief:
      storage.write_json(self.config_path,
                         {**dataclasses.asdict(config), RESOLVED: {"precision": precision}})

  def read_history(self, epochs_done: int) -> List[Dict]:
    """The per-epoch entries of the epochs a restored checkpoint has done (none if no file)."""
    fix = "delete it (the report's curves then start at the resumed epoch)"
    history = read_json(self.history_path, fix) or {"epochs": []}
    entries = history.get("epochs")
    if not isinstance(entries, list) or not all(map(_is_history_entry, entries)):
      raise UserInputError(f"{self.history_path} is damaged: its \"epochs\" are not a list "
                           f"of epoch records; {fix}")
    return [entry for entry in entries if entry["epoch"] <= epochs_done]

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
    storage.write_json(self.history_path, {"epochs": history})
    with storage.writing(self.logs, "the TensorBoard logs"):
      self._validation_writer = self._validation_writer or tf.summary.create_file_writer(
          os.path.join(self.logs, "validation"))
      with self._validation_writer.as_default(step=global_step):
        for name, value in validation.items():
          tf.summary.scalar(name, value)
      self._validation_writer.flush()
    return history

  def finished_metrics(self, epochs: int) -> Optional[Dict[str, object]]:
    """The metrics of a job of `epochs` epochs or more that has finished, or None where it has
    not.

    metrics.json is written last, after the export, and removed before an export is replaced,
    so metrics.json of `epochs` epochs means those epochs are trained and exported, whatever
    has since happened to the checkpoints. A larger --epochs extends a finished job; a
    smaller one finds it finished (its export has trained longer than asked).
    """
    metrics = read_json(self.metrics_path, "delete it and run the same command again to "
                              "evaluate and export the trained model")
    if metrics is None:
      return None
    for name, kinds in _METRICS_TYPES.items():
      if not _is_a(metrics.get(name), kinds):
        raise UserInputError(
            f"{self.metrics_path} is damaged: no {name} number in it; delete it and run the "
            "same command again to evaluate and export the trained model")
    return metrics if metrics["epochs"] >= epochs else None

  def export_problem(self) -> Optional[str]:
    """What is missing or unreadable in the run's shared export (under --model_dir on every
    worker, so that all agree), or None where it is whole: the SavedModel's graph and
    variables, and the Keras file."""
    export = os.path.join(self.model_dir, "export")
    graph = os.path.join(export, "saved_model.pb")
    needed = [graph, os.path.join(export, "variables", "variables.index"),
              os.path.join(export, KERAS_FILE)]
    missing = [path for path in needed if not tf.io.gfile.exists(path)]
    if missing:
      return f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} missing"
    try:
      with tf.io.gfile.GFile(graph, "rb") as f:
        saved_model_pb2.SavedModel.FromString(f.read())
      with tf.io.gfile.GFile(needed[2], "rb") as f, zipfile.ZipFile(f) as keras_file:
        keras_file.getinfo("config.json")
    except (message.DecodeError, zipfile.BadZipFile, KeyError) as e:
      return f"the export is damaged ({first_line(e)})"
    return None

  def unmark_complete(self) -> None:
    """Removes metrics.json before the export is replaced: where it exists, the export beside
    it is complete, even on object stores, where a directory cannot be renamed atomically."""
    if self.chief and tf.io.gfile.exists(self.metrics_path):
      tf.io.gfile.remove(self.metrics_path)

  def write_metrics(self, metrics: Dict[str, object]) -> None:
    """Writes metrics.json, last: it marks the run's outputs complete."""
    if self.chief:
      storage.write_json(self.metrics_path, metrics)

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
      logging.warning("the report could not be drawn (%s: %s); the model is exported, and "
                      "metrics.json comes next", type(e).__name__, first_line(e))


_METRICS_TYPES = {"epochs": (int,), "test_accuracy": (int, float),
                  "test_reconstruction_mse": (int, float)}


def _is_a(value, kinds) -> bool:
  """Whether `value` is one of `kinds`, a bool counting only where `kinds` has bool (to Python
  a bool is an int)."""
  return isinstance(value, kinds) and (bool in kinds or not isinstance(value, bool))


def _numbers(value) -> bool:
  """Whether `value` is a JSON object of numbers."""
  return isinstance(value, dict) and all(_is_a(v, (int, float)) for v in value.values())


def _config_problem(saved: Dict) -> Optional[str]:
  """What is wrong with the types of a saved configuration, or None: each setting it holds
  must be a JSON value of the setting's type (an older trainer's file may lack some)."""
  for field in dataclasses.fields(TrainConfig):
    if field.name not in saved:
      continue
    value = saved[field.name]
    if field.name == "loss_weights":
      value_ok, expected = _numbers(value), "NAME: WEIGHT pairs"
    else:
      kinds, expected = _JSON_TYPES[field.type]
      value_ok = _is_a(value, kinds)
    if not value_ok:
      return f"{field.name} is {json.dumps(value)}, not {expected}"
  return None


def _is_history_entry(entry) -> bool:
  return (isinstance(entry, dict) and isinstance(entry.get("epoch"), int)
          and all(_numbers(entry.get(key)) for key in ("train", "validation", "loss_weights")))
