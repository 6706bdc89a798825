"""What a job writes in its run directory, and reads back when run again.

`RunOutputs` owns the chief's shared outputs (checkpoints' directory, history.json, the
TensorBoard runs, the export, the report, metrics.json: their names are
`trainer.job.run_directory`'s) and gives every other worker a private scratch directory instead,
so the training loop writes through it without asking who is chief. It holds the run's one
TensorBoard writer per TensorBoard run. Every file goes through `tf.io.gfile`, so gs:// works
as a local path does.
"""

import atexit
import json
import os
import shutil
import tempfile
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import tensorflow as tf
from absl import logging

from trainer import config as config_lib
from trainer.errors import first_line, UserInputError
from trainer.job import run_directory, storage

# A step's TensorBoard scalars, by tag; and what writes a list of them to one TensorBoard run.
Scalars = Dict[str, float]
WriteSummaries = Callable[[Sequence[Tuple[int, Scalars]]], None]


def metrics_text(metrics: Dict[str, float]) -> str:
  """'name 0.1234, other 0.5678': metrics as the log lines give them, in their order."""
  return ", ".join(f"{name} {value:.4f}" for name, value in metrics.items())


class SummaryWriters:
  """The TensorBoard writers of the runs under `logs` (train, validation, report), one per
  run, made at its first use; writes go through `storage.writing` (a full disk is one line)."""

  def __init__(self, logs: str):
    self.logs, self._writers = logs, {}

  def writer(self, run: str):
    if run not in self._writers:
      with storage.writing(self.logs, "the TensorBoard logs"):
        self._writers[run] = tf.summary.create_file_writer(os.path.join(self.logs, run))
    return self._writers[run]

  def write(self, run: str, entries: Sequence[Tuple[int, Scalars]]) -> None:
    """Writes each (step, scalars) of `entries` to the run `run`, and flushes."""
    writer = self.writer(run)
    with storage.writing(self.logs, "the TensorBoard logs"):
      for step, scalars in entries:
        with writer.as_default(step=step):
          for name, value in scalars.items():
            tf.summary.scalar(name, value)
      writer.flush()


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
  path = run_directory.of(model_dir).config
  saved = read_json(path, fix)
  problem = saved is not None and config_lib.saved_config_problem(saved)
  if problem:
    raise UserInputError(f"{path} is damaged: {problem}; {fix}")
  return saved


class RunOutputs:
  """Where this worker writes: under --model_dir on the chief, a local scratch dir elsewhere.

  Non-chief workers must still take part in saving checkpoints (it is collective under
  multi-worker), so they save into a private scratch directory, deleted when the process
  exits however it ends; the rest of what they would write is dropped.
  """

  def __init__(self, paths: run_directory.RunDirectory, chief: bool):
    self.chief = chief
    self.paths = paths  # The shared run directory, on every worker.
    if chief:
      for flag, directory in (("model_dir", paths.model_dir),
                              ("checkpoint_dir", paths.checkpoints),
                              ("tensorboard_dir", paths.tensorboard_dir)):
        if directory:
          storage.check_writable(flag, directory)
      own = self.paths
    else:
      own = run_directory.of(tempfile.mkdtemp(prefix="trainer-worker-"))
      atexit.register(shutil.rmtree, own.model_dir, ignore_errors=True)
    # Where this worker writes: the run directory on the chief, its scratch elsewhere.
    self.checkpoints, self.export = own.checkpoints, own.export
    # Made at a run's first write: a job that stops before writes no TensorBoard file.
    self._summaries = SummaryWriters(own.logs)

  def read_config(self) -> Optional[Dict]:
    """The configuration the run saved after its first checkpoint (and each resume's); None if
    there is none. A run directory with checkpoints but no config.json (deleted by hand)
    adopts the current flags: trainers too old to write one are refused by their checkpoint.
    """
    return read_saved_config(self.paths.model_dir, "restore it, or delete it to adopt this "
                             "command's flags")

  def trained_files(self) -> List[str]:
    """The files of this run that show it has trained (config.json is written after its first
    checkpoint, history.json at its first epoch's end)."""
    return [path for path in (self.paths.config, self.paths.history)
            if tf.io.gfile.exists(path)]

  def write_config(self, settings: Dict[str, object], precision: str) -> None:
    """Saves the settings (chief only), once every check has passed, with the dtype policy
    their `--precision` resolved to in this job (`auto` may resolve otherwise on another
    CPU)."""
    if self.chief:
      storage.write_json(self.paths.config, {**settings, RESOLVED: {"precision": precision}})

  def read_history(self, epochs_done: int) -> List[Dict]:
    """The per-epoch entries of the epochs a restored checkpoint has done (none if no file)."""
    fix = "delete it (the report's curves then start at the resumed epoch)"
    history = read_json(self.paths.history, fix) or {"epochs": []}
    entries = history.get("epochs")
    if not isinstance(entries, list) or not all(map(_is_history_entry, entries)):
      raise UserInputError(f"{self.paths.history} is damaged: its \"epochs\" are not a list "
                           f"of epoch records; {fix}")
    return [entry for entry in entries if entry["epoch"] <= epochs_done]

  def summaries_of(self, run: str) -> Optional[WriteSummaries]:
    """What writes (step, scalars) entries to the TensorBoard run `run`; None on workers
    other than the chief, which write none."""
    return (lambda entries: self._summaries.write(run, entries)) if self.chief else None

  def record_epoch(self, history: List[Dict], entry: Dict, epochs: int, global_step: int,
                   images_per_second: Optional[float]) -> List[Dict]:
    """Logs an epoch's line and writes its entry to history.json, and its validation metrics
    to TensorBoard at `global_step` (the controller writes the train run at every call, under
    the same tags, so the two share a chart); returns the history. The entry holds the
    epoch's number, its "train" and "validation" metrics and the task's other records (its
    `epoch_state`), each named values."""
    history = [old for old in history if old["epoch"] < entry["epoch"]] + [entry]
    state = " | ".join(
        f"{name.replace('_', ' ')} " + ", ".join(f"{key} {value:.4g}" for key, value in
                                                 values.items())
        for name, values in entry.items() if name not in ("epoch", "train", "validation"))
    logging.info("epoch %d/%d: %s | validation: %s | %s%s images/s", entry["epoch"], epochs,
                 metrics_text(entry["train"]), metrics_text(entry["validation"]),
                 f"{state} | " if state else "",
                 "-" if images_per_second is None else f"{images_per_second:.0f}")
    if not self.chief:
      return history
    storage.write_json(self.paths.history, {"epochs": history})
    self._summaries.write("validation", [(global_step, entry["validation"])])
    return history

  def finished_metrics(self, epochs: int,
                       headline: Sequence[str]) -> Optional[Dict[str, object]]:
    """The metrics of a job of `epochs` epochs or more that has finished, or None where it has
    not. They must hold the test metrics named in `headline`.

    metrics.json is written last, after the export, and removed before an export is replaced,
    so metrics.json of `epochs` epochs means those epochs are trained and exported, whatever
    has since happened to the checkpoints. A larger --epochs extends a finished job; a
    smaller one finds it finished (its export has trained longer than asked).
    """
    metrics = read_json(self.paths.metrics, "delete it and run the same command again to "
                        "evaluate and export the trained model")
    if metrics is None:
      return None
    needed = {"epochs": (int,), **{f"test_{name}": (int, float) for name in headline}}
    for name, kinds in needed.items():
      if not config_lib.json_is(metrics.get(name), kinds):
        raise UserInputError(
            f"{self.paths.metrics} is damaged: no {name} number in it; delete it and run the "
            "same command again to evaluate and export the trained model")
    return metrics if metrics["epochs"] >= epochs else None

  def results_line(self, metrics: Dict[str, object], headline: Sequence[str]) -> str:
    """The closing line of a job: its test metrics named in `headline`, and where its outputs
    are (the report where it was drawn: --noreport, or a failure to draw it, leaves none)."""
    where = [f"metrics {self.paths.metrics}", f"export {self.paths.export}"]
    if tf.io.gfile.exists(self.paths.report_page):
      where.append(f"report {self.paths.report_page}")
    tested = ", ".join(f"{name} {metrics[f'test_{name}']:.4f}" for name in headline)
    return f"test {tested}; {', '.join(where)}"

  def unmark_complete(self) -> None:
    """Removes metrics.json before the export is replaced: where it exists, the export beside
    it is complete, even on object stores, where a directory cannot be renamed atomically."""
    if self.chief and tf.io.gfile.exists(self.paths.metrics):
      tf.io.gfile.remove(self.paths.metrics)

  def write_metrics(self, metrics: Dict[str, object]) -> None:
    """Writes metrics.json, last: it marks the run's outputs complete."""
    if self.chief:
      storage.write_json(self.paths.metrics, metrics)

  def write_report(self, task, history: List[Dict], metrics: Dict[str, object]) -> None:
    """Has `task` draw its report (chief only); a failure is logged, not raised: the trained
    job must not be lost to it. Its images go to TensorBoard as a run of their own, `report`."""
    if not self.chief:
      return
    try:
      task.write_report(self.export, history, metrics, self.paths.report,
                        self._summaries.writer("report"))
    except Exception as e:  # pylint: disable=broad-except
      logging.warning("the report could not be drawn (%s: %s); the model is exported, and "
                      "metrics.json comes next", type(e).__name__, first_line(e))


def _is_history_entry(entry) -> bool:
  """An epoch's record: its number, and named values ("train", "validation" and the task's)."""
  return (isinstance(entry, dict) and isinstance(entry.get("epoch"), int)
          and all(key in entry for key in ("train", "validation"))
          and all(config_lib.json_numbers(value)
                  for key, value in entry.items() if key != "epoch"))
