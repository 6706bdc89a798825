"""Vertex AI hyperparameter tuning: the job reports its final validation accuracy to it.

Vertex AI reads a trial's metric from the file `cloudml-hypertune` writes. Only a tuning
trial reports: Vertex AI sets $CLOUD_ML_TRIAL_ID in each trial, and a local run or a plain
custom job has no one to read the file. The library is optional (the `vertex` extra): where
it is not installed, nothing is reported.
"""

import os

from absl import logging

METRIC = "validation_accuracy"
TRIAL_ID_VARIABLE = "CLOUD_ML_TRIAL_ID"


def in_tuning_trial() -> bool:
  """Whether this process is a trial of a Vertex AI hyperparameter-tuning job."""
  return bool(os.environ.get(TRIAL_ID_VARIABLE))


def report(value: float, global_step: int) -> bool:
  """Reports `value` as the trial's METRIC; returns whether cloudml-hypertune took it.

  Outside a tuning trial nothing is written and the answer is False.
  """
  if not in_tuning_trial():
    return False
  try:
    import hypertune  # pylint: disable=import-outside-toplevel
  except ImportError:
    # A trial that cannot report is a tuning job that learns nothing: say so in its log.
    logging.warning("this is tuning trial %s, but cloudml-hypertune is not installed: %s is not "
                    "reported; install the package's [tuning] extra in the image",
                    os.environ[TRIAL_ID_VARIABLE], METRIC)
    return False
  hypertune.HyperTune().report_hyperparameter_tuning_metric(
      hyperparameter_metric_tag=METRIC, metric_value=value, global_step=global_step)
  logging.info("Reported %s=%.4f to hyperparameter tuning trial %s.", METRIC, value,
               os.environ[TRIAL_ID_VARIABLE])
  return True
