"""Vertex AI hyperparameter tuning: a trial reports its metric at every evaluation.

Vertex AI reads a trial's measurements, each with its global step, from the file
`cloudml-hypertune` writes ($CLOUD_ML_HP_METRIC_FILE), and its early stopping compares trials by
them. Each `HyperTune` object rewrites that whole file from its own queue (of the last 100
reports), so a job reports through one object, its `Reporter`; and a resumed job first reports
again the evaluations of the steps its checkpoint had trained, from history.json (epoch ends)
and the run's tuning record (the evaluations between them, which no other file keeps), so that
the file holds the whole curve.

Only the chief of a tuning trial reports: Vertex AI sets $CLOUD_ML_TRIAL_ID in each trial, and a
local run or a plain custom job has no one to read the file. The library is optional (the
`tuning` extra): where it is not installed, nothing is reported.
"""

import os
from typing import Callable, Dict, List, Optional, Sequence

from absl import logging

from trainer import config as config_lib
from trainer import errors
from trainer.job import run_directory, storage
from trainer.job.outputs import read_json

TRIAL_ID_VARIABLE = "CLOUD_ML_TRIAL_ID"
# Under --model_dir: the evaluations between epoch ends a trial reported.


def in_tuning_trial() -> bool:
  """Whether this process is a trial of a Vertex AI hyperparameter-tuning job."""
  return bool(os.environ.get(TRIAL_ID_VARIABLE))


def metric_value(metric: str, validation: Dict[str, float]) -> float:
  """`metric` (a key of config.TUNING_METRICS) in an evaluation's validation metrics, which
  name it without its `validation_` prefix."""
  return validation[metric[len("validation_"):]]


class Reporter:
  """Reports a trial's `metric` at each evaluation, through one `HyperTune` object, at most
  once per global step and in increasing steps.

  Evaluations between epoch ends (every `steps_per_epoch`) are also kept in the JSON file at
  `record_path`, written through tf.io.gfile after `before_write()` (the run directory's lease
  check), so that `resume` can report them again.
  """

  def __init__(self, hypertune, metric: str, steps_per_epoch: int, record_path: str,
               before_write: Optional[Callable[[], None]] = None):
    self._hypertune, self.metric = hypertune, metric
    self._steps_per_epoch, self._record_path = steps_per_epoch, record_path
    self._before_write = before_write or (lambda: None)
    self._between_epochs: List[Dict] = []
    self.last_step = 0

  def resume(self, history: Sequence[Dict], trained_steps: int) -> int:
    """Reports again, in step order, the evaluations of the first `trained_steps` steps (what
    the restored checkpoint had trained): each epoch's of `history` (history.json's records)
    and those between epoch ends in the record, whose later ones are dropped (they will be
    trained and evaluated again). Returns how many it reported."""
    self._between_epochs = [entry for entry in self._read_record()
                            if entry["step"] <= trained_steps]
    epochs = [{"step": entry["epoch"] * self._steps_per_epoch, "validation": entry["validation"]}
              for entry in history if entry["epoch"] * self._steps_per_epoch <= trained_steps]
    earlier = sorted(epochs + self._between_epochs, key=lambda entry: entry["step"])
    return sum(self._report(entry["step"], entry["validation"]) for entry in earlier)

  def report(self, step: int, validation: Dict[str, float]) -> bool:
    """Reports the evaluation at global `step` (its validation metrics); returns False, and
    does nothing, for a step already reported (the final metrics at the last epoch's end)."""
    if step <= self.last_step:
      return False
    if step % self._steps_per_epoch:
      self._between_epochs.append({"step": step, "validation": dict(validation)})
      self._before_write()
      storage.write_json(self._record_path, {"evaluations": self._between_epochs})
    return self._report(step, validation)

  def _report(self, step: int, validation: Dict[str, float]) -> bool:
    if step <= self.last_step:  # Two records of one step (history.json edited by hand).
      return False
    self._hypertune.report_hyperparameter_tuning_metric(
        hyperparameter_metric_tag=self.metric, metric_value=metric_value(self.metric, validation),
        global_step=step)
    self.last_step = step
    return True

  def _read_record(self) -> List[Dict]:
    """The record's evaluations; none where there is no record, or a damaged one (said in a
    warning: the trial goes on, its curve only lacks them)."""
    lost = ("the evaluations between epoch ends before this restart are not reported to the "
            "tuning trial again")
    try:
      record = read_json(self._record_path, lost) or {"evaluations": []}
    except errors.UserInputError as e:
      logging.warning("%s", e)
      return []
    evaluations = record.get("evaluations")
    if isinstance(evaluations, list) and all(map(_is_evaluation, evaluations)):
      return evaluations
    logging.warning("%s is damaged: its \"evaluations\" are not a list of evaluations; %s",
                    self._record_path, lost)
    return []


def _is_evaluation(entry) -> bool:
  return (isinstance(entry, dict) and isinstance(entry.get("step"), int)
          and isinstance(entry.get("validation"), dict)
          and all(isinstance(value, (int, float)) for value in entry["validation"].values()))


def trial_reporter(metric: str, model_dir: str, steps_per_epoch: int,
                   before_write: Optional[Callable[[], None]] = None) -> Optional[Reporter]:
  """A new `Reporter` of `metric` for the job in `model_dir`, if this process is a tuning
  trial's (call it on the chief only, once per job: its HyperTune object rewrites the file);
  None outside a trial, or where cloudml-hypertune is not installed (said in a warning)."""
  if not in_tuning_trial():
    return None
  try:
    import hypertune  # pylint: disable=import-outside-toplevel
  except ImportError:
    # A trial that cannot report is a tuning job that learns nothing: say so in its log.
    logging.warning("this is tuning trial %s, but cloudml-hypertune is not installed: %s is not "
                    "reported; install the package's [tuning] extra in the image",
                    os.environ[TRIAL_ID_VARIABLE], metric)
    return None
  logging.info("Tuning trial %s: reporting %s (to %s) at every evaluation.",
               os.environ[TRIAL_ID_VARIABLE], metric, config_lib.TUNING_METRICS[metric])
  return Reporter(hypertune.HyperTune(), metric, steps_per_epoch,
                  run_directory.of(model_dir).tuning_record, before_write)
