"""Shared test set-up: two logical CPU devices, so MirroredStrategy has two replicas on CPU;
and, under pytest-xdist, tests marked `alone` run with no other test beside them."""

import contextlib
import fcntl
import os
from typing import Optional

import pytest

# Quiet TensorFlow's C++ start-up noise in test logs.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

# Must happen before TensorFlow initialises its devices, hence at import time of conftest.
_cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(
    _cpu, [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()])


@contextlib.contextmanager
def _machine_share(alone: bool, directory: Optional[str]):
  """Holds this worker's share of the machine while the block runs: the whole of it if `alone`.

  A readers-writer lock over files in `directory`, which the session's workers share (None: one
  process, where nothing runs beside a test): every test holds the room's lock shared, a test
  alone holds it exclusive. Each passes a turnstile first, which a test alone keeps while it
  waits, so that the other workers' next tests queue behind it.
  """
  if directory is None:
    yield
    return
  prefix = os.path.join(directory, "machine")
  with open(f"{prefix}.turnstile", "a") as turnstile, open(f"{prefix}.room", "a") as room:
    fcntl.flock(turnstile, fcntl.LOCK_EX)
    if not alone:
      fcntl.flock(turnstile, fcntl.LOCK_UN)
    fcntl.flock(room, fcntl.LOCK_EX if alone else fcntl.LOCK_SH)
    yield  # Closing the files releases both locks.


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(items):
  """Tests alone first, then the other slow ones, then the rest, each in collection order: the
  long ones start early and the short ones fill in at the end, so that neither worker finishes
  one long test by itself, nor waits long for a test alone to have the machine."""
  items.sort(key=lambda item: (item.get_closest_marker("alone") is None,
                               item.get_closest_marker("slow") is None))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):  # pylint: disable=unused-argument
  """Each test's set-up (its module's and session's fixtures too), call and teardown hold the
  worker's share of the machine (`_machine_share`)."""
  # Under xdist, each worker's base temp is a folder of the session's own, which pytest prunes.
  basetemp = item.config.option.basetemp if os.environ.get("PYTEST_XDIST_WORKER") else None
  with _machine_share(item.get_closest_marker("alone") is not None,
                      os.path.dirname(os.path.abspath(basetemp)) if basetemp else None):
    yield


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
