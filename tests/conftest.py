"""Shared test set-up: two logical CPU devices, so MirroredStrategy has two replicas on CPU."""

import os

import pytest

# Quiet TensorFlow's C++ start-up noise in test logs.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

# Must happen before TensorFlow initialises its devices, hence at import time of conftest.
_cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(
    _cpu, [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()])

@pytest.fixture(autouse=True)
def _reset_precision():
  """Each test starts, and leaves, with the float32 policy: the policy is process-global."""
  keras.mixed_precision.set_dtype_policy("float32")
  yield
  keras.mixed_precision.set_dtype_policy("float32")


@pytest.fixture(scope="session")
def two_replicas():
  """One MirroredStrategy over the two logical CPUs for the whole session.

  Separate strategy objects in one process number their collective ops alike, and the
  collectives of one can collide with those of another.
  """
  return tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory):
  """A finished 2-epoch job on learnable data saved as an npz: (model_dir, --dataset value).

  For the tests of what comes after training: the report, evaluate and predict.
  """
  from tests import helpers
  from trainer import config
  from trainer.job import train
  from trainer.multitask import problem
  root = tmp_path_factory.mktemp("finished_run")
  everything = helpers.learnable_split(640, seed=5)
  dataset = helpers.write_npz(str(root / "data.npz"), X=everything.images.reshape(-1, 784),
                              y=everything.labels)
  model_dir = str(root / "run")
  # The narrow test model at a high rate, without warm-up (as tests/train_test.py trains it);
  # 16 steps an epoch, in calls of 5 so that an epoch holds several.
  settings = config.TrainConfig(dataset=dataset, model_dir=model_dir, epochs=2, batch_size=32,
                                latent_dim=16, width=8, learning_rate=1e-2, warmup_steps=0,
                                steps_per_loop=5)
  train.configure_process(settings, tf.distribute.get_strategy())
  train.run(settings, tf.distribute.get_strategy(), problem.make_task)
  return model_dir, dataset
