"""Vertex AI hyperparameter tuning: the job reports its final validation accuracy to it.

Vertex AI reads a trial's metric from the file `cloudml-hypertune` writes. The library is
optional (the `vertex` extra): where it is not installed, nothing is reported.
"""

from absl import logging

METRIC = "validation_accuracy"


def report(value: float, global_step: int) -> bool:
  """Reports `value` as the trial's METRIC; returns whether cloudml-hypertune took it."""
  try:
    import hypertune  # pylint: disable=import-outside-toplevel
  except ImportError:
    return False
  hypertune.HyperTune().report_hyperparameter_tuning_metric(
      hyperparameter_metric_tag=METRIC, metric_value=value, global_step=global_step)
  logging.info("Reported %s=%.4f to hyperparameter tuning.", METRIC, value)
  return True
