"""Tests of the task losses: labelled-only classification, and fixed and learned task weights."""

import numpy as np
import pytest
import tensorflow as tf

from tests import helpers
from trainer.multitask import CLASSIFIER, DECODER, losses, problem
from trainer.multitask.model import build_model


@pytest.fixture(scope="module")
def model():
  return build_model(16, width=8)


def _task_losses(model, images, labels, labeled):
  targets = {CLASSIFIER: tf.constant(labels), DECODER: tf.constant(images)}
  weights = {CLASSIFIER: tf.constant(labeled, tf.float32), DECODER: tf.ones([len(labels)])}
  cross_entropy, mse, _ = losses.per_example_losses(model, tf.constant(images), targets, False)
  return losses.task_losses(cross_entropy, mse, weights, losses.global_counts(weights)), (
      cross_entropy.numpy(), mse.numpy())


def test_classifier_loss_ignores_unlabeled_examples_and_the_decoder_loss_does_not(model):
  split = helpers.learnable_split(8)
  labeled = np.array([1, 1, 0, 0, 1, 0, 0, 0], np.float32)
  task, (cross_entropy, mse) = _task_losses(model, split.images, split.labels, labeled)
  np.testing.assert_allclose(task[CLASSIFIER], cross_entropy[labeled > 0].mean(), rtol=1e-6)
  np.testing.assert_allclose(task[DECODER], mse.mean(), rtol=1e-6)

  # Other labels on the unlabelled examples change nothing; other images there change the
  # decoder's loss (it learns from them) but not the classifier's.
  relabeled = np.where(labeled > 0, split.labels, (split.labels + 1) % 10).astype(np.int32)
  task_relabeled, _ = _task_losses(model, split.images, relabeled, labeled)
  assert float(task_relabeled[CLASSIFIER]) == float(task[CLASSIFIER])
  repainted = split.images.copy()
  repainted[labeled == 0] = 0
  task_repainted, _ = _task_losses(model, repainted, split.labels, labeled)
  assert float(task_repainted[CLASSIFIER]) == float(task[CLASSIFIER])
  assert abs(float(task_repainted[DECODER]) - float(task[DECODER])) > 1e-3


def test_unlabeled_examples_give_the_classifier_no_gradient(model):
  split = helpers.learnable_split(4)
  classifier_weights = model.get_layer(CLASSIFIER).trainable_variables
  labeled = np.array([1, 0, 0, 0], np.float32)

  def gradients(labels):
    with tf.GradientTape() as tape:
      task, _ = _task_losses(model, split.images, labels, labeled)
    return [g.numpy() for g in tape.gradient(task[CLASSIFIER], classifier_weights)]

  other = np.array([split.labels[0], 9, 9, 9], np.int32)
  for ours, theirs in zip(gradients(split.labels), gradients(other)):
    np.testing.assert_array_equal(ours, theirs)


def test_metrics_from_outputs_agree_with_the_jobs_batch_sums(model):
  split = helpers.learnable_split(50)
  outputs = model(split.images, training=False)
  targets = {CLASSIFIER: tf.constant(split.labels), DECODER: tf.constant(split.images)}
  ones = {CLASSIFIER: tf.ones([50]), DECODER: tf.ones([50])}
  job = problem.means(problem.batch_sums(
      *losses.per_example_losses(model, split.images, targets, False), ones))
  ours = losses.metrics_from_outputs(outputs[CLASSIFIER].numpy(), outputs[DECODER].numpy(), split)
  for name in job:
    np.testing.assert_allclose(ours[name], job[name], rtol=1e-5)


def test_fixed_weighting_is_the_weighted_sum():
  weighting = losses.make_weighting("fixed", {CLASSIFIER: 1.0, DECODER: 0.2})
  total = weighting.total({CLASSIFIER: tf.constant(0.5), DECODER: tf.constant(0.1)}, 1)
  np.testing.assert_allclose(total, 0.52, rtol=1e-6)
  assert weighting.trainable_variables == []
  assert weighting.weights() == {CLASSIFIER: 1.0, DECODER: 0.2}


def test_uncertainty_weighting_follows_kendall_et_al_and_learns_to_weigh_the_small_loss_up():
  weighting = losses.make_weighting("uncertainty", {})
  assert weighting.weights() == {CLASSIFIER: 1.0, DECODER: 0.5}  # exp(-0) / c, c = 1 and 2.
  task = {CLASSIFIER: tf.constant(0.4), DECODER: tf.constant(0.02)}
  weighting.log_variances.assign([0.5, -1.0])
  expected = (np.exp(-0.5) * 0.4 + 0.25) + (np.exp(1.0) / 2 * 0.02 - 0.5)
  np.testing.assert_allclose(weighting.total(task, 1), expected, rtol=1e-6)
  # Split over replicas, the shares add up to the same total.
  np.testing.assert_allclose(2 * weighting.total({k: v / 2 for k, v in task.items()}, 2),
                             expected, rtol=1e-6)

  # Gradient descent moves each weight towards its optimum 1 / (2 L_t).
  weighting.log_variances.assign([0.0, 0.0])
  for _ in range(400):
    with tf.GradientTape() as tape:
      total = weighting.total(task, 1)
    gradient = tape.gradient(total, weighting.log_variances)
    weighting.log_variances.assign_sub(0.5 * gradient)
  learned = weighting.weights()
  np.testing.assert_allclose(learned[CLASSIFIER], 1 / (2 * 0.4), rtol=1e-3)
  np.testing.assert_allclose(learned[DECODER], 1 / (2 * 0.02), rtol=1e-3)


def _unlabeled(kind, input_probabilities, view_probabilities, labeled, threshold=0.9):
  weights = {CLASSIFIER: tf.constant(labeled, tf.float32),
             DECODER: tf.ones([len(labeled)])}
  return float(losses.unlabeled_loss(kind, tf.constant(input_probabilities, tf.float32),
                                     tf.constant(view_probabilities, tf.float32), weights,
                                     losses.global_counts(weights), threshold))


def test_pseudo_labels_come_from_confident_answers_on_unlabelled_images_only():
  sure, unsure = [0.95, 0.05] + [0.0] * 8, [0.6, 0.4] + [0.0] * 8
  view = [0.5, 0.5] + [0.0] * 8
  # The labelled first example and the unsure third add nothing, but the third still counts
  # in the mean over the two unlabelled images, as in FixMatch.
  loss = _unlabeled("pseudo_label", [sure, sure, unsure], [view] * 3, [1, 0, 0])
  np.testing.assert_allclose(loss, -np.log(0.5) / 2, rtol=1e-5)
  assert _unlabeled("pseudo_label", [unsure] * 3, [view] * 3, [1, 0, 0]) == 0.0


def test_consistency_is_the_squared_difference_of_the_answers():
  first, second = [1.0, 0.0] + [0.0] * 8, [0.5, 0.5] + [0.0] * 8
  np.testing.assert_allclose(_unlabeled("consistency", [first, first], [second, first], [0, 0]),
                             0.5 / 2, rtol=1e-6)


def test_no_gradient_flows_through_the_answers_that_serve_as_targets():
  answers = tf.Variable([[0.7, 0.3] + [0.0] * 8])
  view = tf.Variable([[0.5, 0.5] + [0.0] * 8])
  weights = {CLASSIFIER: tf.zeros([1]), DECODER: tf.ones([1])}
  for kind in ("pseudo_label", "consistency"):
    with tf.GradientTape() as tape:
      loss = losses.unlabeled_loss(kind, answers, view, weights, losses.global_counts(weights),
                                   0.5)
    to_answers, to_view = tape.gradient(loss, [answers, view])
    assert to_answers is None and to_view is not None
