"""Faults, end to end: kills, preemption, lost workers and bad input, against real processes.

Every bad input must end in one `error:` line naming the problem and the fix, a non-zero
exit, and the files of an existing run left byte for byte as they were.
"""

import glob
import os
import re
import signal
import subprocess
import time

import numpy as np
import pytest
import tensorflow as tf
from absl import flags

from tests import helpers
from trainer import cli, errors, task

# The narrow model on small learnable data (a global batch of 32 over 512 training images: 16
# steps an epoch): these prove what survives a fault, and that the resumed run still learns.
MULTI_WORKER_FLAGS = ("--width=8", "--latent_dim=16", "--noreport", "--steps_per_loop=2",
                      "--batch_size=32", "--warmup_steps=0", "--learning_rate=0.01")
STEPS_PER_EPOCH = 512 // 32


@pytest.fixture(scope="module")
def learnable_data(tmp_path_factory):
  """640 learnable images in an npz (512 train, 64 validation, 64 test): the --dataset flag."""
  everything = helpers.learnable_split(640, seed=5)
  return "--dataset=" + helpers.write_npz(str(tmp_path_factory.mktemp("data") / "data.npz"),
                                          X=everything.images.reshape(-1, 784),
                                          y=everything.labels)


def _start_workers(log_dir, prefix: str, *flags, workers: int = 2) -> list:
  """helpers.start_workers, each worker forked (helpers.start_command_forked): still a process
  of its own with its pid and $TF_CONFIG, talking to the others over loopback, without a
  TensorFlow start-up each (the runner has imported TensorFlow but made no context)."""
  import json
  import portpicker  # Only the multi-worker tests need it.
  cluster = {"worker": [f"localhost:{portpicker.pick_unused_port()}" for _ in range(workers)]}
  def tf_config(index):
    return json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})
  return [helpers.start_command_forked(os.path.join(log_dir, f"{prefix}-worker{index}.log"),
                                       "trainer.task", *flags, env={"TF_CONFIG": tf_config(index)})
          for index in range(workers)]


def _checkpoint_numbers(model_dir):
  return sorted(int(re.search(r"ckpt-(\d+)\.index$", path).group(1))
                for path in glob.glob(os.path.join(model_dir, "checkpoints", "ckpt-*.index")))


def _wait_for_checkpoint(process, model_dir, at_least, timeout=600):
  """Waits until a checkpoint numbered `at_least` or more exists; fails if the job ended."""
  deadline = time.monotonic() + timeout
  while not any(n >= at_least for n in _checkpoint_numbers(model_dir)):
    assert process.poll() is None, f"the job ended (exit {process.returncode}) before step {at_least}"
    assert time.monotonic() < deadline, f"no checkpoint at step {at_least} after {timeout} s"
    time.sleep(0.05)


def _latest_step(model_dir):
  latest = tf.train.latest_checkpoint(os.path.join(model_dir, "checkpoints"))
  return latest, int(latest.rsplit("-", 1)[1])


# A kill -9 mid-epoch, SIGTERM and Ctrl-C, each resumed to the uninterrupted run's outputs:
# tests/chaos_test.py, 20 of them at random moments.


def _wait_all(processes, timeout):
  try:
    for process in processes:
      process.wait(timeout=timeout)
  finally:
    for process in processes:
      process.kill()


@pytest.mark.slow
@pytest.mark.alone  # Two workers' heartbeats: see pytest.ini.
def test_a_lost_worker_stops_the_other_with_a_clear_error_and_a_restart_resumes(
    tmp_path, learnable_data):
  model_dir = str(tmp_path / "run")
  run_flags = (learnable_data, *MULTI_WORKER_FLAGS, "--epochs=2", "--checkpoint_every_steps=4",
               f"--model_dir={model_dir}")
  chief, worker = _start_workers(tmp_path, "first", *run_flags)
  try:
    _wait_for_checkpoint(chief, model_dir, at_least=4)
    worker.send_signal(signal.SIGKILL)
    killed = time.monotonic()
    chief.wait(timeout=120)  # Bounded: it must not hang on the dead peer.
    print(f"survivor stopped {time.monotonic() - killed:.1f} s after its peer was killed")
  finally:
    _wait_all([chief, worker], timeout=0)
  log = (tmp_path / "first-worker0.log").read_text()
  line = helpers.assert_one_error_line(
      subprocess.CompletedProcess(chief.args, chief.returncode, "", log),
      "lost contact with another worker", exit_code=1)
  assert "restart every worker" in line
  latest, _ = _latest_step(model_dir)

  workers = _start_workers(tmp_path, "second", *run_flags)
  _wait_all(workers, timeout=900)
  logs = [(tmp_path / f"second-worker{i}.log").read_text() for i in range(2)]
  assert [p.returncode for p in workers] == [0, 0], logs[0][-3000:] + logs[1][-3000:]
  assert all(f"Resuming from {latest}" in log for log in logs)
  assert "Strategy: multi_worker_mirrored" in logs[1]
  metrics = helpers.read_metrics(model_dir)
  assert metrics["strategy"] == "multi_worker_mirrored" and metrics["num_replicas"] == 2
  assert metrics["test_accuracy"] > 0.9 and metrics["test_reconstruction_mse"] < 0.1, metrics
  # Only the chief (worker 0) writes shared outputs: one set of them, and no trace of worker 1.
  assert sorted(os.listdir(model_dir)) == ["checkpoints", "config.json", "export",
                                          "history.json", "logs", "metrics.json"]


@pytest.mark.slow
@pytest.mark.alone  # Two workers' heartbeats: see pytest.ini.
def test_sigterm_to_one_worker_stops_both_at_the_same_step(tmp_path, learnable_data):
  model_dir = str(tmp_path / "run")
  # Epochs enough that the job is still training when the signal lands, however late; the
  # only checkpoints are the epochs' ends and the preemption's.
  workers = _start_workers(tmp_path, "run", learnable_data, *MULTI_WORKER_FLAGS, "--epochs=50",
                           "--checkpoint_every_steps=100000", f"--model_dir={model_dir}")
  try:
    _wait_for_checkpoint(workers[0], model_dir, at_least=STEPS_PER_EPOCH)
    workers[1].send_signal(signal.SIGTERM)  # Only the non-chief is told.
  finally:
    _wait_all(workers, timeout=120)
  logs = [(tmp_path / f"run-worker{i}.log").read_text() for i in range(2)]
  assert [p.returncode for p in workers] == [errors.PREEMPTED_EXIT_CODE] * 2, (
      logs[0][-3000:] + logs[1][-3000:])
  saved_at = [re.search(r"preempted: checkpoint \S+ saved (at epoch (\d+), step \d+)", log)
              for log in logs]
  latest, step = _latest_step(model_dir)
  assert saved_at[0].group(1) == saved_at[1].group(1), [m.group(1) for m in saved_at]
  epoch = int(saved_at[0].group(2))
  assert epoch >= 2, (latest, saved_at[0].group(1))
  assert saved_at[0].group(1) == (
      f"at epoch {epoch}, step {step - (epoch - 1) * STEPS_PER_EPOCH}"), (latest, saved_at)


# Bad input, run through the entry point in this process (one TensorFlow start-up for all),
# against a finished run whose files must not change.

# The settings of the session's finished run (tests/conftest.py): 2 epochs of 16 steps.
BASE_FLAGS = ("--epochs=2", "--batch_size=32", "--latent_dim=16", "--width=8",
              "--warmup_steps=0", "--learning_rate=0.01", "--steps_per_loop=5")


def _run_task(argv, capsys) -> subprocess.CompletedProcess:
  """Runs `python -m trainer.task ARGV` in this process; returns its exit code and output."""
  flags.FLAGS.unparse_flags()
  return helpers.run_in_process(
      capsys, lambda: task.main(cli.parse_flags(["trainer.task", *argv])))


@pytest.fixture
def finished(finished_run):
  """The session's finished run (its files must not change) as (--dataset, model_dir)."""
  model_dir, dataset = finished_run
  return dataset, model_dir


def _bad_data_files(directory):
  """--dataset values for broken files, each with the words its error must contain."""
  for case in ("magic", "short", "counts"):
    (directory / case).mkdir(exist_ok=True)
  images = np.zeros((100, 784), np.uint8)
  return {
      "idx-wrong-magic": (helpers.write_idx_dir(directory / "magic", True, **{
          "train-images-idx3-ubyte": helpers.idx_bytes(np.zeros((60, 28, 28)), 0x801)}),
                          "IDX magic number 0x00000801, expected 0x00000803"),
      "idx-truncated": (helpers.write_idx_dir(directory / "short", True, **{
          "train-images-idx3-ubyte": helpers.idx_bytes(np.zeros((60, 28, 28)), 0x803)[:-100]}),
                        "truncated"),
      "idx-counts-differ": (helpers.write_idx_dir(directory / "counts", True, **{
          "train-labels-idx1-ubyte": helpers.idx_bytes(np.zeros(59), 0x801)}),
                            "60 images but 59 labels"),
      "npz-missing-array": (helpers.write_npz(directory / "missing.npz", X=images),
                            "no array y in the npz"),
      "npz-wrong-shape": (helpers.write_npz(directory / "shape.npz", X=np.zeros((100, 30), np.uint8),
                                            y=np.zeros(100, int)), "expected (N, 784)"),
      "npz-wrong-dtype": (helpers.write_npz(directory / "dtype.npz", X=images.astype(np.float32),
                                            y=np.zeros(100, int)), "expected uint8"),
      "npz-labels-out-of-range": (helpers.write_npz(directory / "labels.npz", X=images,
                                                    y=np.full(100, 10)), "expected digits 0-9"),
      "npz-needs-pickle": (helpers.write_npz(directory / "pickle.npz", X=images,
                                             y=np.array([None] * 100)), "without pickle"),
  }


BAD_FLAGS = {
    "unknown-strategy": (["--strategy=horovod"], "flag --strategy=horovod: value should be one of"),
    "unknown-precision": (["--precision=half"], "flag --precision=half: value should be one of"),
    "tpu-without-tpu": (["--strategy=tpu"], "--strategy=tpu but no TPU is reachable"),
    "batch-not-positive": (["--batch_size=0"], "--batch_size=0 must be a positive integer"),
    "batch-not-divisible": (["--strategy=mirrored", "--batch_size=33"],
                            "--batch_size=33 is the global batch and must be a positive multiple "
                            "of the 2 replicas; try --batch_size=32"),
    "batch-leaves-much-unused": (["--batch_size=400"],
                                 "--batch_size=400 leaves 112 of the 512 training examples (22%) "
                                 "unused in every epoch, more than the 10% allowed (each step "
                                 "takes a whole batch); try --batch_size=256"),
    "loss-weights-all-zero": (["--loss_weights=classifier=0,decoder=0"],
                              "must give a non-negative weight to each of classifier, decoder, "
                              "at least one of them above 0"),
    "no-epochs": (["--epochs=0"], "--epochs=0 must be a positive integer"),
    "negative-learning-rate": (["--learning_rate=-0.1"], "--learning_rate=-0.1 must be positive"),
    "dataset-path-missing": (["--dataset=npz:/nonexistent/data.npz"],
                             "no file at /nonexistent/data.npz"),
    "dataset-dir-missing": (["--dataset=idx:/nonexistent"], "no train-images-idx3-ubyte"),
    "dataset-name-typo": (["--dataset=mnist_smaple"], "unknown --dataset='mnist_smaple'"),
    "another-model-shape": (["--latent_dim=32"],
                            "this run was trained with --latent_dim=16, not --latent_dim=32"),
}


@pytest.mark.parametrize("case", sorted(BAD_FLAGS))
def test_bad_flag_is_refused_and_the_run_is_untouched(case, finished, capsys):
  dataset, model_dir = finished
  argv, message = BAD_FLAGS[case]
  before = helpers.directory_state(model_dir)
  result = _run_task(list(helpers.with_flags(
      (f"--dataset={dataset}", f"--model_dir={model_dir}", *BASE_FLAGS), *argv)), capsys)
  helpers.assert_one_error_line(result, message)
  assert helpers.directory_state(model_dir) == before


BAD_FILES = ("idx-wrong-magic", "idx-truncated", "idx-counts-differ", "npz-missing-array",
             "npz-wrong-shape", "npz-wrong-dtype", "npz-labels-out-of-range", "npz-needs-pickle")


@pytest.mark.parametrize("case", BAD_FILES)
def test_bad_data_file_is_refused_and_the_run_is_untouched(case, finished, tmp_path, capsys):
  _, model_dir = finished
  dataset, message = _bad_data_files(tmp_path)[case]
  before = helpers.directory_state(model_dir)
  result = _run_task([f"--dataset={dataset}", f"--model_dir={model_dir}", *BASE_FLAGS], capsys)
  helpers.assert_one_error_line(result, message)
  assert helpers.directory_state(model_dir) == before


def test_unwritable_model_dir_is_refused(finished, tmp_path, capsys):
  dataset, _ = finished
  blocker = tmp_path / "a-file"
  blocker.write_text("in the way")
  before = helpers.directory_state(tmp_path)
  result = _run_task([f"--dataset={dataset}", f"--model_dir={blocker}/run", *BASE_FLAGS],
                     capsys)
  helpers.assert_one_error_line(result, f"cannot write to --model_dir={blocker}/run")
  assert blocker.read_text() == "in the way"
  assert helpers.directory_state(tmp_path) == before  # Nothing written beside it either.


# Resumes and traces the model's step (5 s): the slow tier. The fast tier has the real model
# diverging (train_test), the stop before saving with the last good checkpoint named
# (controller_test), and task.main's UserInputError path to the error line (the refusals here).
@pytest.mark.slow
def test_diverging_loss_stops_at_its_step_and_keeps_the_last_good_checkpoint(finished, capsys):
  dataset, model_dir = finished
  before = helpers.directory_state(model_dir)
  result = _run_task([f"--dataset={dataset}", f"--model_dir={model_dir}", *helpers.with_flags(
      BASE_FLAGS, "--epochs=3", "--learning_rate=1e30")], capsys)
  line = helpers.assert_one_error_line(result, "training diverged: non-finite ")
  assert re.search(r"at step 34 \(epoch 3, step 2\).*last good checkpoint is .*ckpt-32", line)
  assert helpers.directory_state(model_dir) == before
