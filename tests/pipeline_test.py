"""Tests of trainer.data.pipeline: the input pipeline (batches, resume, sharding, augmentations)."""

import numpy as np
import pytest
import tensorflow as tf

from tests import helpers
from trainer.data import pipeline, sources
from trainer.errors import UserInputError


def test_per_replica_batch_must_divide():
  assert pipeline.per_replica_batch_size(128, 2) == 64
  with pytest.raises(UserInputError, match="--batch_size=100 .* multiple of the 8 replicas; try --batch_size=96"):
    pipeline.per_replica_batch_size(100, 8)


def test_a_batch_that_leaves_over_a_tenth_of_the_split_unused_each_epoch_is_refused():
  pipeline.check_epoch_coverage(4000, 64, 1)  # 32 unused: under 1 %.
  pipeline.check_epoch_coverage(1000, 900, 2)  # 100 unused: the tenth itself is allowed.
  with pytest.raises(UserInputError, match=(
      r"--batch_size=2500 leaves 1500 of the 4000 training examples \(38%\) unused in every "
      r"epoch, more than the 10% allowed \(each step takes a whole batch\); try "
      r"--batch_size=2000$")):
    pipeline.check_epoch_coverage(4000, 2500, 1)
  with pytest.raises(UserInputError, match=r"try --batch_size=26$"):
    pipeline.check_epoch_coverage(55, 32, 2)  # A multiple of the replicas.


def test_training_pipeline_yields_uint8_images_and_dict_labels():
  split = helpers.learnable_split(50)
  ds = pipeline.training_dataset(split, 16, 3, pipeline.TrainingInput(seed=1, shift_pixels=2))
  images, targets, weights = next(iter(ds))
  assert images.dtype == tf.uint8 and images.shape == (16, 28, 28, 1)
  assert set(targets) == {"classifier", "decoder"}
  assert targets["classifier"].dtype == tf.int32 and targets["classifier"].shape == (16,)
  assert targets["decoder"].dtype == tf.uint8
  np.testing.assert_array_equal(targets["decoder"], images)
  assert not np.array_equal(images, split.images[:16])  # Shuffled and shifted.
  for name in ("classifier", "decoder"):  # Every label counts when none is held back.
    np.testing.assert_array_equal(weights[name], np.ones(16, np.float32))


def _indexed_split(n):
  """A split whose labels are the examples' indices, so batches show which examples they hold."""
  return sources.Split(np.zeros((n, 28, 28, 1), np.uint8), np.arange(n, dtype=np.int32))


def _labels(dataset, batches):
  return np.stack([targets["classifier"].numpy() for _, targets, _ in dataset.take(batches)])


def test_each_epoch_is_a_new_permutation_of_whole_batches():
  epochs = _labels(pipeline.training_dataset(_indexed_split(100), 8, 12, pipeline.TrainingInput(seed=3)), 36).reshape(3, -1)
  for epoch in epochs:
    assert len(set(epoch)) == 96  # 12 batches of 8 distinct examples; 4 left out.
  assert not np.array_equal(epochs[0], epochs[1])


def test_resuming_mid_epoch_reads_exactly_the_batches_an_uninterrupted_run_would():
  split = helpers.learnable_split(100)
  settings = pipeline.TrainingInput(seed=3, shift_pixels=2)
  whole = list(pipeline.training_dataset(split, 8, 12, settings).take(36))
  # Global step 17: epoch 1 (of 12 steps), step 5.
  resumed = list(pipeline.training_dataset(split, 8, 12, settings, start_step=17).take(19))
  assert len(resumed) == len(whole[12 + 5:]) == 19
  for (expected, expected_targets, _), (got, targets, _) in zip(whole[12 + 5:], resumed):
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(targets["classifier"], expected_targets["classifier"])


def test_resuming_counts_steps_in_global_batches_when_a_pipeline_feeds_two_replicas():
  context = tf.distribute.InputContext(num_input_pipelines=1, input_pipeline_id=0,
                                       num_replicas_in_sync=2)
  settings = pipeline.TrainingInput()
  whole = _labels(pipeline.training_dataset(_indexed_split(100), 4, 12, settings,
                                        input_context=context), 24)
  resumed = _labels(pipeline.training_dataset(_indexed_split(100), 4, 12, settings, start_step=5,
                                          input_context=context), 14)
  np.testing.assert_array_equal(resumed, whole[10:])


def test_random_shift_moves_whole_images_within_the_limit():
  image = np.zeros((1, 28, 28, 1), np.uint8)
  image[0, 10:14, 12:15] = 200
  batch = np.repeat(image, 512, axis=0)
  shifted = pipeline.random_shift(tf.constant(batch), 2, tf.constant([0, 7], tf.int64)).numpy()
  offsets = set()
  for moved in shifted:
    rows, cols = np.nonzero(moved[..., 0])
    assert moved.sum() == image.sum()  # Nothing falls off the edge for shifts this small.
    offsets.add((rows.min() - 10, cols.min() - 12))
  assert offsets == {(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)}
  again = pipeline.random_shift(tf.constant(batch), 2, tf.constant([0, 7], tf.int64)).numpy()
  np.testing.assert_array_equal(shifted, again)


def test_evaluation_pipeline_pads_to_whole_batches_with_zero_weight():
  split = helpers.learnable_split(50)
  batches = list(pipeline.evaluation_dataset(split, batch_size=16))
  assert [b[0].shape[0] for b in batches] == [16] * 4
  for name in ("classifier", "decoder"):
    weights = np.concatenate([b[2][name] for b in batches])
    assert weights.sum() == 50 and weights[50:].sum() == 0


def test_input_pipelines_shard_disjointly():
  split = _indexed_split(40)
  seen = []
  for shard in range(2):
    context = tf.distribute.InputContext(2, shard, 2)
    for _, targets, weights in pipeline.evaluation_dataset(split, 4, context):
      seen.append(targets["classifier"].numpy()[weights["classifier"].numpy() > 0])
    train_labels = _labels(pipeline.training_dataset(split, 4, 5, pipeline.TrainingInput(),
                                                     input_context=context), 5)
    assert set(train_labels.ravel() % 2) == {shard}  # Training reads its own shard only.
  assert sorted(np.concatenate(seen).tolist()) == list(range(40))


def test_labeled_subset_is_balanced_by_class_and_chosen_by_seed():
  split = _indexed_split(1000)
  split = sources.Split(split.images, split.labels % 10)
  chosen = pipeline.labeled_subset(split, 100, seed=0)
  assert len(chosen) == len(set(chosen)) == 100
  assert np.bincount(split.labels[chosen], minlength=10).tolist() == [10] * 10
  assert not np.array_equal(chosen, pipeline.labeled_subset(split, 100, seed=1))
  assert pipeline.labeled_subset(split, 0, seed=0) is None  # 0 and "all" both mean every label.
  assert pipeline.labeled_subset(split, 1000, seed=0) is None
  for bad in (5, 1001):
    with pytest.raises(UserInputError, match=f"--labeled_examples={bad} must be between 10"):
      pipeline.labeled_subset(split, bad, seed=0)
  with pytest.raises(UserInputError, match="--labeled_examples=995: cannot choose that many "
                                           "class by class .*; choose fewer"):
    pipeline.labeled_subset(split, 995, seed=0)  # Five left over cannot hold ten classes.
  with pytest.raises(UserInputError, match="at least 4 examples per replica in a batch, not 2"):
    pipeline.labeled_per_batch(2, chosen)


def test_semi_supervised_batches_mark_only_labeled_examples_and_draw_them_every_step():
  split = _indexed_split(400)  # Labels are indices: a batch shows which examples it holds.
  labeled = np.arange(0, 400, 40)  # Ten labelled examples.
  batches = list(pipeline.training_dataset(split, 16, 25, pipeline.TrainingInput(labeled_indices=labeled)).take(50))
  for _, targets, weights in batches:
    indices = targets["classifier"].numpy()
    np.testing.assert_array_equal(weights["classifier"], np.isin(indices, labeled))
    np.testing.assert_array_equal(weights["decoder"], np.ones(16))  # The decoder sees all.
    assert np.isin(indices[:4], labeled).all()  # A quarter of each batch is labelled.
  unlabeled_seen = np.concatenate([t["classifier"].numpy()[4:] for _, t, _ in batches[:25]])
  assert len(set(unlabeled_seen)) == 25 * 12  # The rest is an epoch's shuffle of the split.


def test_denoising_corrupts_the_input_and_keeps_the_decoders_target_clean():
  split = sources.Split(np.full((50, 28, 28, 1), 128, np.uint8), np.arange(50, dtype=np.int32) % 10)
  clean = pipeline.training_dataset(split, 16, 3, pipeline.TrainingInput(seed=1, shift_pixels=1))
  noisy = pipeline.training_dataset(
      split, 16, 3, pipeline.TrainingInput(seed=1, shift_pixels=1, input_noise=0.3))
  (clean_images, _, _), (noisy_images, noisy_targets, _) = next(iter(clean)), next(iter(noisy))
  np.testing.assert_array_equal(noisy_targets["decoder"], clean_images)  # The same shifts.
  assert noisy_images.dtype == tf.uint8
  # Inside the border that shifts may fill with background (where clipping at 0 trims the
  # noise), the noise has its standard deviation, less a little clipping at 0 and 255.
  difference = (noisy_images.numpy().astype(float) - clean_images.numpy())[:, 2:-2, 2:-2]
  assert 0.27 * 255 < difference.std() < 0.3 * 255
  assert abs(difference.mean()) < 0.01 * 255


def test_the_strong_view_erases_a_square_and_is_drawn_afresh_for_each_batch():
  split = sources.Split(np.full((50, 28, 28, 1), 200, np.uint8), np.zeros(50, np.int32))
  dataset = pipeline.training_dataset(split, 16, 3, pipeline.TrainingInput(seed=1, second_view=True))
  batches = list(dataset.take(2))
  (images, view), targets, _ = batches[0]
  np.testing.assert_array_equal(images, targets["decoder"])
  erased = view.numpy()[..., 0] == 0
  # A 12x12 square, and up to two rows and columns of background shifted in.
  assert all(144 <= count < 144 + 2 * 2 * 28 for count in erased.sum(axis=(1, 2)))
  assert not np.array_equal(view, batches[1][0][1])


def test_noise_and_views_resume_exactly():
  split = helpers.learnable_split(100)
  settings = pipeline.TrainingInput(seed=3, shift_pixels=1, input_noise=0.2, second_view=True)
  whole = list(pipeline.training_dataset(split, 8, 12, settings).take(20))
  resumed = list(pipeline.training_dataset(split, 8, 12, settings, start_step=17).take(3))
  assert len(resumed) == len(whole[17:]) == 3
  for ((expected, expected_view), _, _), ((got, got_view), _, _) in zip(whole[17:], resumed):
    np.testing.assert_array_equal(expected, got)
    np.testing.assert_array_equal(expected_view, got_view)
