"""Tests of trainer.data: every source, its splits and errors, and the input pipeline."""

import re

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from tests import helpers
from trainer import data
from trainer.config import UserInputError


def _check_splits(splits, sizes):
  for split, size in zip((splits.train, splits.validation, splits.test), sizes):
    assert split.images.shape == (size, 28, 28, 1) and split.images.dtype == np.uint8
    assert split.labels.shape == (size,) and split.labels.dtype == np.int32


def test_mnist_sample_is_shipped_and_split_80_10_10_by_class():
  splits = data.load_splits("mnist_sample")
  _check_splits(splits, (4000, 500, 500))
  for split in (splits.validation, splits.test):
    assert np.bincount(split.labels).tolist() == [50] * 10


def test_npz_of_70000_uses_the_exercise_split(tmp_path):
  labels = np.arange(70_000) % 10
  images = np.zeros((70_000, 784), np.uint8)
  images[:, 0] = np.arange(70_000) // 1000  # Marks each row's position.
  splits = data.load_splits(helpers.write_npz(tmp_path / "mnist.npz", X=images, y=labels))
  _check_splits(splits, (50_000, 10_000, 10_000))
  assert splits.validation.images[0, 0, 0, 0] == 50 and splits.test.images[0, 0, 0, 0] == 60


@pytest.mark.parametrize("gzipped", [True, False])
def test_idx_files_parse_gzipped_or_not(tmp_path, gzipped):
  splits = data.load_splits(helpers.write_idx_dir(tmp_path, gzipped))
  _check_splits(splits, (50, 10, 20))
  assert splits.train.labels[:3].tolist() == [0, 1, 2]
  assert splits.test.images.max() == 9


@pytest.mark.parametrize("override, message", [
    ({"train-images-idx3-ubyte": helpers.idx_bytes(np.zeros((60, 28, 28)), 0x801)}, "IDX magic number"),
    ({"train-images-idx3-ubyte": helpers.idx_bytes(np.zeros((60, 28, 28)), 0x803)[:-100]}, "truncated"),
    ({"train-labels-idx1-ubyte": helpers.idx_bytes(np.zeros(59), 0x801)}, "60 images but 59 labels"),
    ({"train-labels-idx1-ubyte": helpers.idx_bytes(np.full(60, 11), 0x801)}, "expected digits 0-9"),
])
def test_broken_idx_files_are_refused(tmp_path, override, message):
  with pytest.raises(UserInputError, match=message):
    data.load_splits(helpers.write_idx_dir(tmp_path, gzipped=True, **override))


def test_idx_dir_without_files_is_refused(tmp_path):
  with pytest.raises(UserInputError, match="no train-images-idx3-ubyte"):
    data.load_splits(f"idx:{tmp_path}")


@pytest.mark.parametrize("arrays, message", [
    ({"X": np.zeros((100, 784), np.uint8)}, "no array y"),
    ({"X": np.zeros((100, 30), np.uint8), "y": np.zeros(100)}, "expected \\(N, 784\\)"),
    ({"X": np.zeros((100, 784), np.float32), "y": np.zeros(100, int)}, "expected uint8"),
    ({"X": np.zeros((100, 784), np.uint8), "y": np.full(100, 10)}, "expected digits 0-9"),
    ({"X": np.zeros((100, 784), np.uint8), "y": np.array([None] * 100)}, "without pickle"),
])
def test_broken_npz_files_are_refused(tmp_path, arrays, message):
  with pytest.raises(UserInputError, match=message):
    data.load_splits(helpers.write_npz(tmp_path / "bad.npz", **arrays))


def test_missing_and_unknown_sources_are_refused(tmp_path):
  with pytest.raises(UserInputError, match="no file at"):
    data.load_splits(f"npz:{tmp_path}/absent.npz")
  with pytest.raises(UserInputError, match="unknown --dataset='cifar'"):
    data.load_splits("cifar")
  (tmp_path / "not.npz").write_bytes(b"hello")
  with pytest.raises(UserInputError, match="not a readable npz"):
    data.load_splits(f"npz:{tmp_path}/not.npz")


def test_tfds_source_through_mock_data():
  with tfds.testing.mock_data(num_examples=120):
    splits = data.load_splits("mnist", data_dir="/nonexistent")
  _check_splits(splits, (100, 20, 120))


def test_per_replica_batch_must_divide():
  assert data.per_replica_batch_size(128, 2) == 64
  with pytest.raises(UserInputError, match="--batch_size=100 .* multiple of the 8 replicas; try --batch_size=96"):
    data.per_replica_batch_size(100, 8)


def test_training_pipeline_yields_uint8_images_and_dict_labels():
  split = helpers.learnable_split(50)
  ds = data.training_dataset(split, batch_size=16, steps_per_epoch=3, seed=1, shift_pixels=2)
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
  return data.Split(np.zeros((n, 28, 28, 1), np.uint8), np.arange(n, dtype=np.int32))


def _labels(dataset, batches):
  return np.stack([targets["classifier"].numpy() for _, targets, _ in dataset.take(batches)])


def test_each_epoch_is_a_new_permutation_of_whole_batches():
  epochs = _labels(data.training_dataset(_indexed_split(100), 8, 12, seed=3), 36).reshape(3, -1)
  for epoch in epochs:
    assert len(set(epoch)) == 96  # 12 batches of 8 distinct examples; 4 left out.
  assert not np.array_equal(epochs[0], epochs[1])


def test_resuming_mid_epoch_reads_exactly_the_batches_an_uninterrupted_run_would():
  split = helpers.learnable_split(100)
  whole = list(data.training_dataset(split, 8, 12, seed=3, shift_pixels=2).take(36))
  resumed = list(data.training_dataset(split, 8, 12, seed=3, shift_pixels=2, start_epoch=1,
                                       start_step=5).take(19))
  assert len(resumed) == len(whole[12 + 5:]) == 19
  for (expected, expected_targets, _), (got, targets, _) in zip(whole[12 + 5:], resumed):
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(targets["classifier"], expected_targets["classifier"])


def test_resuming_counts_steps_in_global_batches_when_a_pipeline_feeds_two_replicas():
  context = tf.distribute.InputContext(num_input_pipelines=1, input_pipeline_id=0,
                                       num_replicas_in_sync=2)
  whole = _labels(data.training_dataset(_indexed_split(100), 4, 12, 0, input_context=context), 24)
  resumed = _labels(data.training_dataset(_indexed_split(100), 4, 12, 0, start_step=5,
                                          input_context=context), 14)
  np.testing.assert_array_equal(resumed, whole[10:])


def test_random_shift_moves_whole_images_within_the_limit():
  image = np.zeros((1, 28, 28, 1), np.uint8)
  image[0, 10:14, 12:15] = 200
  batch = np.repeat(image, 512, axis=0)
  shifted = data.random_shift(tf.constant(batch), 2, tf.constant([0, 7], tf.int64)).numpy()
  offsets = set()
  for moved in shifted:
    rows, cols = np.nonzero(moved[..., 0])
    assert moved.sum() == image.sum()  # Nothing falls off the edge for shifts this small.
    offsets.add((rows.min() - 10, cols.min() - 12))
  assert offsets == {(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)}
  again = data.random_shift(tf.constant(batch), 2, tf.constant([0, 7], tf.int64)).numpy()
  np.testing.assert_array_equal(shifted, again)


def test_evaluation_pipeline_pads_to_whole_batches_with_zero_weight():
  split = helpers.learnable_split(50)
  batches = list(data.evaluation_dataset(split, batch_size=16))
  assert [b[0].shape[0] for b in batches] == [16] * 4
  for name in ("classifier", "decoder"):
    weights = np.concatenate([b[2][name] for b in batches])
    assert weights.sum() == 50 and weights[50:].sum() == 0


def test_input_pipelines_shard_disjointly():
  split = _indexed_split(40)
  seen = []
  for pipeline in range(2):
    context = tf.distribute.InputContext(2, pipeline, 2)
    for _, targets, weights in data.evaluation_dataset(split, 4, context):
      seen.append(targets["classifier"].numpy()[weights["classifier"].numpy() > 0])
    train_labels = _labels(data.training_dataset(split, 4, 5, 0, input_context=context), 5)
    assert set(train_labels.ravel() % 2) == {pipeline}  # Training reads its own shard only.
  assert sorted(np.concatenate(seen).tolist()) == list(range(40))


def test_labeled_subset_is_balanced_by_class_and_chosen_by_seed():
  split = _indexed_split(1000)
  split = data.Split(split.images, split.labels % 10)
  chosen = data.labeled_subset(split, 100, seed=0)
  assert len(chosen) == len(set(chosen)) == 100
  assert np.bincount(split.labels[chosen], minlength=10).tolist() == [10] * 10
  assert not np.array_equal(chosen, data.labeled_subset(split, 100, seed=1))
  assert data.labeled_subset(split, 0, seed=0) is None  # 0 and "all" both mean every label.
  assert data.labeled_subset(split, 1000, seed=0) is None
  for bad in (5, 1001):
    with pytest.raises(UserInputError, match=f"--labeled_examples={bad} must be between 10"):
      data.labeled_subset(split, bad, seed=0)
  with pytest.raises(UserInputError, match="--labeled_examples=995: cannot choose that many "
                                           "class by class .*; choose fewer"):
    data.labeled_subset(split, 995, seed=0)  # Five left over cannot hold ten classes.
  with pytest.raises(UserInputError, match="at least 4 examples per replica in a batch, not 2"):
    data.labeled_per_batch(2, chosen)


def test_semi_supervised_batches_mark_only_labeled_examples_and_draw_them_every_step():
  split = _indexed_split(400)  # Labels are indices: a batch shows which examples it holds.
  labeled = np.arange(0, 400, 40)  # Ten labelled examples.
  batches = list(data.training_dataset(split, 16, 25, seed=0, labeled_indices=labeled).take(50))
  for _, targets, weights in batches:
    indices = targets["classifier"].numpy()
    np.testing.assert_array_equal(weights["classifier"], np.isin(indices, labeled))
    np.testing.assert_array_equal(weights["decoder"], np.ones(16))  # The decoder sees all.
    assert np.isin(indices[:4], labeled).all()  # A quarter of each batch is labelled.
  unlabeled_seen = np.concatenate([t["classifier"].numpy()[4:] for _, t, _ in batches[:25]])
  assert len(set(unlabeled_seen)) == 25 * 12  # The rest is an epoch's shuffle of the split.


def _image_file(tmp_path, name, content):
  path = tmp_path / name
  path.write_bytes(content if isinstance(content, bytes) else tf.io.encode_png(content).numpy())
  return str(path)


def test_read_image_file_takes_28x28_grey_and_grey_saved_as_rgb(tmp_path):
  grey = np.arange(784, dtype=np.uint32).reshape(28, 28, 1).astype(np.uint8)
  np.testing.assert_array_equal(data.read_image_file(_image_file(tmp_path, "a.png", grey)), grey)
  rgb = np.repeat(grey, 3, axis=-1)
  np.testing.assert_array_equal(data.read_image_file(_image_file(tmp_path, "b.png", rgb)), grey)


def test_read_image_file_resizes_only_when_asked(tmp_path):
  path = _image_file(tmp_path, "big.png", np.full((56, 84, 1), 200, np.uint8))
  with pytest.raises(UserInputError, match=r"big.png: 84x56 pixels, expected 28x28; pass "
                                           r"--resize to scale it"):
    data.read_image_file(path)
  resized = data.read_image_file(path, resize=True)
  assert resized.shape == (28, 28, 1) and (resized == 200).all()


@pytest.mark.parametrize("name, content, message", [
    ("notes.png", b"these are not pixels", "not an image; give a PNG, JPEG, GIF or BMP file"),
    ("red.png", np.stack([np.full((28, 28), 200, np.uint8)] + [np.zeros((28, 28), np.uint8)] * 2,
                         axis=-1), "a colour or transparent image; convert it to greyscale"),
    ("clear.png", np.concatenate([np.zeros((28, 28, 1), np.uint8),
                                  np.full((28, 28, 1), 100, np.uint8)], axis=-1),
     "a colour or transparent image"),
])
def test_read_image_file_refuses_what_is_not_a_grey_image(tmp_path, name, content, message):
  with pytest.raises(UserInputError, match=re.escape(f"{name}: {message}")):
    data.read_image_file(_image_file(tmp_path, name, content))


def test_denoising_corrupts_the_input_and_keeps_the_decoders_target_clean():
  split = data.Split(np.full((50, 28, 28, 1), 128, np.uint8), np.arange(50, dtype=np.int32) % 10)
  clean = data.training_dataset(split, 16, 3, seed=1, shift_pixels=1)
  noisy = data.training_dataset(split, 16, 3, seed=1, shift_pixels=1, input_noise=0.3)
  (clean_images, _, _), (noisy_images, noisy_targets, _) = next(iter(clean)), next(iter(noisy))
  np.testing.assert_array_equal(noisy_targets["decoder"], clean_images)  # The same shifts.
  assert noisy_images.dtype == tf.uint8
  # Inside the border that shifts may fill with background (where clipping at 0 trims the
  # noise), the noise has its standard deviation, less a little clipping at 0 and 255.
  difference = (noisy_images.numpy().astype(float) - clean_images.numpy())[:, 2:-2, 2:-2]
  assert 0.27 * 255 < difference.std() < 0.3 * 255
  assert abs(difference.mean()) < 0.01 * 255


def test_the_strong_view_erases_a_square_and_is_drawn_afresh_for_each_batch():
  split = data.Split(np.full((50, 28, 28, 1), 200, np.uint8), np.zeros(50, np.int32))
  dataset = data.training_dataset(split, 16, 3, seed=1, shift_pixels=0, second_view=True)
  batches = list(dataset.take(2))
  (images, view), targets, _ = batches[0]
  np.testing.assert_array_equal(images, targets["decoder"])
  erased = view.numpy()[..., 0] == 0
  # A 12x12 square, and up to two rows and columns of background shifted in.
  assert all(144 <= count < 144 + 2 * 2 * 28 for count in erased.sum(axis=(1, 2)))
  assert not np.array_equal(view, batches[1][0][1])


def test_noise_and_views_resume_exactly():
  split = helpers.learnable_split(100)
  settings = dict(seed=3, shift_pixels=1, input_noise=0.2, second_view=True)
  whole = list(data.training_dataset(split, 8, 12, **settings).take(20))
  resumed = list(data.training_dataset(split, 8, 12, start_epoch=1, start_step=5,
                                       **settings).take(3))
  assert len(resumed) == len(whole[17:]) == 3
  for ((expected, expected_view), _, _), ((got, got_view), _, _) in zip(whole[17:], resumed):
    np.testing.assert_array_equal(expected, got)
    np.testing.assert_array_equal(expected_view, got_view)
