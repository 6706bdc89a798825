"""Tests of trainer.multitask.problem: the multitask task, as the job (train.Task) sees it.

Its training through the whole job is tests/train_test.py's; here, what the task itself
promises: its factory checks before it builds, its metrics' definitions, and what it hands the
job for metrics.json and history.
"""

import numpy as np
import pytest
import tensorflow as tf

from tests import helpers
from trainer import config, errors
from trainer.multitask import CLASSIFIER, DECODER, problem


def _config(**changes):
  settings = dict(dataset="npz:given-by-the-test", model_dir="unused", batch_size=32,
                  latent_dim=16, width=8)
  return config.TrainConfig(**{**settings, **changes})


def test_make_task_plans_the_batches_and_builds_under_the_strategy():
  task = problem.make_task(_config(), tf.distribute.get_strategy(), "float32",
                           helpers.learnable_splits(train=320))
  assert (task.steps_per_epoch, task.examples_per_step) == (10, 32)
  assert task.model.dtype_policy.name == "float32"
  assert set(task.model.output_names) == {CLASSIFIER, DECODER}


def test_make_task_refuses_a_batch_that_does_not_divide_before_building(two_replicas,
                                                                         monkeypatch):
  built = []
  monkeypatch.setattr(problem, "MultitaskTask", lambda *args, **kwargs: built.append(1))
  with pytest.raises(errors.UserInputError, match="--batch_size=33"):
    problem.make_task(_config(batch_size=33), two_replicas, "float32",
                      helpers.learnable_splits())
  assert not built


def test_the_metrics_are_means_over_the_examples_each_task_counts():
  weights = {CLASSIFIER: tf.constant([1.0, 1.0, 0.0, 0.0]), DECODER: tf.ones([4])}
  sums = problem.batch_sums(tf.constant([0.5, 1.5, 9.0, 9.0]), tf.constant([0.1, 0.2, 0.3, 0.4]),
                            tf.constant([1.0, 0.0, 1.0, 1.0]), weights)
  means = problem.means({name: float(value) for name, value in sums.items()})
  # Classification over the two labelled examples only; reconstruction over all four.
  assert means == pytest.approx({"classifier_loss": 1.0, "reconstruction_mse": 0.25,
                                 "accuracy": 0.5})
  assert set(sums) == set(problem.SUMS)


def test_what_the_task_hands_the_job_for_its_records():
  splits = helpers.learnable_splits(train=320)
  task = problem.make_task(_config(labeled_examples=40), tf.distribute.get_strategy(),
                           "float32", splits)
  facts = task.run_facts()
  assert (facts["train_examples"], facts["labeled_examples"]) == (320, 40)
  assert facts["class_names"] == list(splits.class_names)
  assert facts["input_background"] == "dark"
  assert task.epoch_state() == {"loss_weights": {CLASSIFIER: 1.0, DECODER: 8.0}}
  assert set(task.headline) <= set(task.evaluate("validation"))
  logs = task.train_logs({**{name: 1.0 for name in problem.SUMS}, "loss": 6.0}, steps=3)
  assert list(logs)[0] == "loss" and logs["loss"] == 2.0  # The epoch line starts with it.
  assert np.isclose(task.learning_rate(0, 100), 0.0)  # The warm-up starts from zero.
