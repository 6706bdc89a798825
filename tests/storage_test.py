"""Tests of trainer.job.storage: real full and read-only disks (a 1 MB tmpfs) give one line each."""

import errno
import logging
import os
import signal
import subprocess

import pytest
import tensorflow as tf

from trainer.errors import UserInputError
from trainer.job import preemption, storage

# Bigger than the whole 1 MB disk: 2 MB of float32.
TOO_BIG = 1 << 19


@pytest.fixture
def disk(tmp_path):
  """An empty 1 MB tmpfs, unmounted afterwards; skips where this machine may not mount."""
  mount_point = tmp_path / "disk"
  mount_point.mkdir()
  try:
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount_point)],
                             capture_output=True, text=True, check=False)
  except FileNotFoundError:
    pytest.skip("no mount command here")
  if mounted.returncode != 0:
    pytest.skip(f"cannot mount a tmpfs here (needs root): {mounted.stderr.strip()}")
  yield mount_point
  subprocess.run(["umount", "-l", str(mount_point)], check=True)


def _fill(disk) -> None:
  with pytest.raises(OSError) as full, open(disk / "filler", "wb") as f:
    f.write(b"x" * (2 << 20))
  assert full.value.errno == errno.ENOSPC


def _read_only(disk) -> None:
  subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)


def _one_line(error: BaseException) -> str:
  message = str(error)
  # No "During handling of the above exception" either: the user sees this line alone.
  assert message and "\n" not in message and error.__suppress_context__, message
  return message


def test_a_checkpoint_larger_than_the_disk_fails_naming_the_path_and_the_full_disk(disk):
  directory = str(disk / "checkpoints")
  with pytest.raises(storage.WriteFailed) as failed:
    with storage.writing(directory, "a checkpoint"):
      tf.train.Checkpoint(v=tf.Variable(tf.zeros([TOO_BIG]))).save(os.path.join(directory, "ckpt"))
  message = _one_line(failed.value)
  assert message.startswith(f"could not write a checkpoint at {directory}: the disk is full")
  assert "free space" in message and "run the same command to resume" in message


def test_a_write_on_a_read_only_disk_says_read_only(disk):
  _read_only(disk)
  path = str(disk / "history.json")
  with pytest.raises(storage.WriteFailed) as failed:
    with storage.writing(path):
      with tf.io.gfile.GFile(path, "w") as f:
        f.write("{}")
  message = _one_line(failed.value)
  assert message.startswith(f"could not write {path}: the file system is read-only;")


def test_write_json_on_a_full_disk_keeps_the_earlier_file_and_no_temporary(disk):
  path = disk / "run" / "history.json"
  storage.write_json(str(path), {"epochs": [1]})  # Creates run/ too.
  earlier = path.read_bytes()
  assert earlier == b'{\n  "epochs": [\n    1\n  ]\n}'
  _fill(disk)
  with pytest.raises(storage.WriteFailed) as failed:
    storage.write_json(str(path), {"epochs": [1, 2]})
  assert str(path) in _one_line(failed.value) and "the disk is full" in str(failed.value)
  assert path.read_bytes() == earlier
  assert sorted(os.listdir(path.parent)) == ["history.json"]


def test_check_writable_refuses_a_read_only_disk_in_one_line(disk):
  _read_only(disk)
  for directory in (disk, disk / "run" / "checkpoints"):
    with pytest.raises(UserInputError) as refused:
      storage.check_writable("model_dir", str(directory))
    assert _one_line(refused.value) == (
        f"cannot write to --model_dir={directory} (the file system is read-only); give a "
        "directory this job may write")


def test_check_writable_refuses_a_path_under_a_regular_file(tmp_path):
  (tmp_path / "file").write_text("mine")
  with pytest.raises(UserInputError) as refused:
    storage.check_writable("checkpoint_dir", str(tmp_path / "file" / "run"))
  assert type(refused.value) is UserInputError  # pylint: disable=unidiomatic-typecheck
  assert _one_line(refused.value).startswith(
      f"cannot write to --checkpoint_dir={tmp_path / 'file' / 'run'} (")
  assert "not a directory" in str(refused.value)
  assert (tmp_path / "file").read_text() == "mine"


def test_check_writable_leaves_no_directory_it_created(tmp_path):
  storage.check_writable("model_dir", str(tmp_path / "a" / "b" / "c"))
  assert os.listdir(tmp_path) == []


def test_a_stop_signal_during_the_probe_still_removes_the_directories_it_created(tmp_path,
                                                                                 monkeypatch):
  remove = tf.io.gfile.remove

  def remove_receiving_a_sigterm(path):  # TensorFlow's call: the stop comes out as it returns.
    os.kill(os.getpid(), signal.SIGTERM)
    remove(path)

  monkeypatch.setattr(tf.io.gfile, "remove", remove_receiving_a_sigterm)
  with pytest.raises(preemption.Stopped, match="^SIGTERM while starting"):
    with preemption.stage("starting", "nothing was written"):
      storage.check_writable("model_dir", str(tmp_path / "a" / "b"))
  assert os.listdir(tmp_path) == []


def _contents(directory):
  return {os.path.relpath(os.path.join(root, name), directory): open(
      os.path.join(root, name), "rb").read() for root, _, names in os.walk(directory)
          for name in names}


def test_check_writable_leaves_an_existing_directory_as_it_was(tmp_path):
  (tmp_path / "run" / "checkpoints").mkdir(parents=True)
  (tmp_path / "run" / ".write_test").write_text("the user's")
  (tmp_path / "run" / "checkpoints" / "checkpoint").write_text("state")
  before = _contents(tmp_path)
  storage.check_writable("model_dir", str(tmp_path / "run"))
  assert _contents(tmp_path) == before and len(before) == 2
  assert sorted(os.listdir(tmp_path / "run")) == [".write_test", "checkpoints"]


def test_clean_stale_temporaries_removes_what_a_save_on_a_full_disk_left(disk, caplog):
  directory = str(disk / "checkpoints")
  manager = tf.train.CheckpointManager(tf.train.Checkpoint(v=tf.Variable(tf.ones([10]))),
                                       directory, max_to_keep=3)
  manager.save(checkpoint_number=20)
  big = tf.train.CheckpointManager(tf.train.Checkpoint(v=tf.Variable(tf.zeros([TOO_BIG]))),
                                   directory, max_to_keep=3)
  with pytest.raises(storage.WriteFailed):
    with storage.writing(directory, "a checkpoint"):
      big.save(checkpoint_number=21)
  kept = ["checkpoint", "ckpt-20.data-00000-of-00001", "ckpt-20.index"]
  assert sorted(os.listdir(directory)) == kept + ["ckpt-21_temp"]  # What TensorFlow leaves.
  # The absl logger's own level too: another test may have left it above INFO.
  with caplog.at_level(logging.INFO), caplog.at_level(logging.INFO, logger="absl"):
    removed = storage.clean_stale_temporaries(directory)
  assert removed == [os.path.join(directory, "ckpt-21_temp")]
  assert sorted(os.listdir(directory)) == kept
  assert [record.getMessage() for record in caplog.records if "ckpt-21_temp" in
          record.getMessage()] == [f"Removed {removed[0]}, left by a checkpoint save that did "
                                   "not finish."]
  restored = tf.train.Checkpoint(v=tf.Variable(tf.zeros([10])))
  restored.restore(tf.train.latest_checkpoint(directory)).assert_consumed()
  assert restored.v.numpy().tolist() == [1.0] * 10  # What was saved before is intact.


def test_clean_stale_temporaries_keeps_what_is_not_a_save_s_leftover(tmp_path):
  (tmp_path / "ckpt-20_temp").mkdir()
  (tmp_path / "ckpt-20_temp" / "part-00000-of-00001.data-00000-of-00001.tempstate123").touch()
  (tmp_path / "ckpt-7_temp").mkdir()
  (tmp_path / "ckpt-7_temp" / "notes.txt").write_text("the user's")
  (tmp_path / "ckpt_temp").mkdir()
  (tmp_path / "ckpt-3_temp").write_text("a file, not a directory")
  removed = storage.clean_stale_temporaries(str(tmp_path))
  assert removed == [str(tmp_path / "ckpt-20_temp")]
  assert sorted(os.listdir(tmp_path)) == ["ckpt-3_temp", "ckpt-7_temp", "ckpt_temp"]
  assert storage.clean_stale_temporaries(str(tmp_path / "missing")) == []


# The messages as observed on this machine (see trainer/storage.py), and those not storage's.
SAVE_OP = "{{function_node __wrapped__SaveV2_dtypes_3_device_/job:localhost/replica:0/task:0/" \
          "device:CPU:0}} /run/ckpt-1_temp/part-00000-of-00001.data-00000-of-00001.tempstate1"


@pytest.mark.parametrize("error, cause", [
    (tf.errors.ResourceExhaustedError(None, None, f"{SAVE_OP}; No space left on device "
                                      "[Op:SaveV2]"),
     "the disk is full (no space left on device)"),
    (tf.errors.ResourceExhaustedError(None, None, f"{SAVE_OP} [Op:SaveV2]"),
     "the disk is full (no space left on device)"),
    (tf.errors.PermissionDeniedError(None, None, "/run/a.json; Read-only file system"),
     "the file system is read-only"),
    (tf.errors.PermissionDeniedError(None, None, "/run/a.json; Permission denied"),
     "permission denied"),
    (tf.errors.OutOfRangeError(None, None, "/run/a.json; File too large"),
     "the file is too large for the file system"),
    (tf.errors.UnknownError(None, None, "/run/a.json; Disk quota exceeded"),
     "the disk quota is exceeded"),
    (OSError(errno.ENOSPC, "No space left on device"),
     "the disk is full (no space left on device)"),
    (OSError(errno.EDQUOT, os.strerror(errno.EDQUOT)), "the disk quota is exceeded"),
    (PermissionError(errno.EACCES, "Permission denied", "/run/a"), "permission denied"),
    (OSError(errno.EPERM, "Operation not permitted"),
     "permission denied (operation not permitted)"),
    (OSError(errno.EFBIG, "File too large"), "the file is too large for the file system"),
    (OSError(errno.EROFS, "Read-only file system"), "the file system is read-only"),
    # Memory, not disk: not ours to translate, even from a save.
    (tf.errors.ResourceExhaustedError(None, None, "OOM when allocating tensor with shape[4096,"
                                      "4096] [Op:MatMul]"), None),
    (tf.errors.ResourceExhaustedError(None, None, f"{SAVE_OP} OOM when allocating tensor "
                                      "[Op:SaveV2]"), None),
    (tf.errors.ResourceExhaustedError(None, None, "Out of memory while trying to allocate"), None),
    (tf.errors.NotFoundError(None, None, "/run/a.json; No such file or directory"), None),
    (OSError(errno.ENOENT, "No such file or directory"), None),
    (ValueError("No space left on device"), None),
])
def test_describe_write_error(error, cause):
  assert storage.describe_write_error(error) == cause


def test_writing_passes_other_errors_unchanged():
  out_of_memory = tf.errors.ResourceExhaustedError(None, None, "OOM when allocating tensor")
  for error in (ValueError("bad"), out_of_memory, storage.WriteFailed("already one line")):
    with pytest.raises(type(error)) as raised:
      with storage.writing("/run", "a checkpoint"):
        raise error
    assert raised.value is error
