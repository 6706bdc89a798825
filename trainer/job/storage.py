"""Writing the run's outputs, and one line instead of a traceback when the storage refuses.

A disk that fills, turns read-only or loses its permissions mid-run reaches the job as a
TensorFlow error deep in a save. `writing()` turns it into a `WriteFailed` line naming the path,
the cause and the fix; `check_writable` refuses a directory up front. All goes through
`tf.io.gfile`, so gs:// works as a local path does.
"""

import contextlib
import errno
import json
import os
import re
import uuid
from typing import List, Optional, Tuple

import tensorflow as tf
from absl import logging

from trainer.errors import first_line, JobError, UserInputError

# Each storage failure: its errno, the OS's text for it (TensorFlow keeps only the text), the
# cause in words and its fix. Observed with TF 2.21 on a 1 MB tmpfs, full and remounted `ro`, a
# directory of root's written as uid 65534, and RLIMIT_FSIZE; every GFile write, makedirs,
# Checkpoint and CheckpointManager save, summary writer and tf.saved_model.save raised:
#   full:       ResourceExhaustedError "PATH; No space left on device" (saves: "... [Op:SaveV2]",
#               summaries: "... [Op:CreateSummaryFileWriter]" or "... [Op:WriteSummary]")
#   read-only:  PermissionDeniedError "PATH; Read-only file system"
#   permission: PermissionDeniedError "PATH; Permission denied"
#   file size:  OutOfRangeError "PATH; File too large"
#   Python:     OSError [Errno 28] / [Errno 27]; PermissionError [Errno 13]
# Not observed (tmpfs quotas are not built into this kernel; root is never refused EPERM):
# "Disk quota exceeded" and "Operation not permitted", written as strerror() spells them.
_CAUSES = (
    (errno.ENOSPC, "No space left on device", "the disk is full (no space left on device)",
     "free space there"),
    (errno.EDQUOT, "Disk quota exceeded", "the disk quota is exceeded",
     "free space there or raise the quota"),
    (errno.EROFS, "Read-only file system", "the file system is read-only",
     "make it writable (remount it read-write)"),
    (errno.EACCES, "Permission denied", "permission denied", "give this job write permission"),
    (errno.EPERM, "Operation not permitted", "permission denied (operation not permitted)",
     "give this job write permission"),
    (errno.EFBIG, "File too large", "the file is too large for the file system",
     "raise the file size limit (ulimit -f) or use another file system"),
)
_FULL = _CAUSES[0]
# A ResourceExhaustedError of these ops without the OS's text is still a full disk: the ops
# that write a checkpoint (or a SavedModel's variables).
_SAVE_OPS = re.compile(r"SaveV2|SaveSlices|MergeV2Checkpoints")
# Memory, not disk: "OOM when allocating tensor with shape[...]".
_OUT_OF_MEMORY = re.compile(r"\bOOM\b|when allocating tensor", re.IGNORECASE)
# What TensorFlow's sharded save writes into (`<prefix>_temp/`) before it moves the shards out.
_TEMPORARY_DIR = re.compile(r"-\d+_temp$")
_SHARD_FILE = re.compile(r"^part-\d+-of-\d+\.(index|data-\d+-of-\d+)(\.tempstate\d+)?$")


class WriteFailed(JobError):
  """Writing under the run's outputs failed after the job started (disk full, read-only,
  permission)."""


def _storage_failure(error: BaseException) -> Optional[Tuple[str, str]]:
  """(cause, fix) where `error` is a storage failure, else None."""
  if not isinstance(error, (OSError, tf.errors.OpError)):
    return None
  text = str(error)
  for number, os_text, cause, fix in _CAUSES:
    if (isinstance(error, OSError) and error.errno == number) or os_text.lower() in text.lower():
      return cause, fix
  if (isinstance(error, tf.errors.ResourceExhaustedError) and _SAVE_OPS.search(text)
      and not _OUT_OF_MEMORY.search(text)):
    return _FULL[2], _FULL[3]
  return None


def describe_write_error(error: BaseException) -> Optional[str]:
  """The cause in words when `error` is a storage failure, else None (not ours to translate).

  Recognises OSError by errno and TensorFlow's errors by the OS's text in their message; a
  ResourceExhaustedError from a save without that text is a full disk, unless it is out of
  memory.
  """
  failure = _storage_failure(error)
  return failure[0] if failure else None


@contextlib.contextmanager
def writing(path: str, what: str = ""):
  """Runs the block; a storage failure inside it becomes a one-line `WriteFailed` naming
  `what` (if given) and `path`, the cause and the fix. Other exceptions pass unchanged."""
  try:
    yield
  except Exception as error:  # pylint: disable=broad-except
    failure = _storage_failure(error)
    if failure is None:
      raise
    cause, fix = failure
    where = f"{what} at {path}" if what else path
    raise WriteFailed(
        f"could not write {where}: {cause}; what was saved before is intact; {fix}, then run "
        "the same command to resume") from None


def remove_if_empty(directory: str) -> bool:
  """Removes `directory` where it is an empty directory; says whether it did.

  Never raises for the storage: callers tidy up on their way out of another failure.
  """
  try:
    if not tf.io.gfile.isdir(directory):
      return False
    if "://" not in directory:
      os.rmdir(directory)  # Refuses a directory that is not empty, with no window for a race.
      return True
    if tf.io.gfile.listdir(directory):
      return False
    tf.io.gfile.rmtree(directory)  # An object store's directory: at most its placeholder.
    return True
  except (OSError, tf.errors.OpError):
    return False


def _missing_directories(directory: str) -> List[str]:
  """`directory` and those of its parents that do not exist, deepest first."""
  missing = []
  while directory and not tf.io.gfile.exists(directory):
    missing.append(directory)
    parent = os.path.dirname(directory.rstrip("/"))
    if parent == directory:
      break
    directory = parent
  return missing


def check_writable(flag: str, directory: str) -> None:
  """Raises UserInputError (one line) now, not after the first epoch, where `directory`
  cannot be written.

  Creates what is missing of it, writes and removes a probe file, then removes the directories
  it created, so a start refused later leaves no empty folders (the job's writes make them).
  """
  created = _missing_directories(directory)
  try:
    tf.io.gfile.makedirs(directory)
    # A name of its own: a file the user keeps there must not be overwritten.
    probe = os.path.join(directory, f".write-probe-{uuid.uuid4().hex}")
    with tf.io.gfile.GFile(probe, "w") as f:
      f.write("ok")
    tf.io.gfile.remove(probe)
  except (tf.errors.OpError, OSError) as e:
    raise UserInputError(
        f"cannot write to --{flag}={directory} ({describe_write_error(e) or first_line(e)}); "
        "give a directory this job may write") from None
  finally:
    for path in created:
      remove_if_empty(path)


def clean_stale_temporaries(checkpoint_dir: str) -> List[str]:
  """Removes the `<prefix>-<N>_temp/` directories interrupted saves left in `checkpoint_dir`;
  returns their paths.

  TensorFlow's sharded save writes into such a directory, then moves the shards out; a kill or
  a full disk leaves it behind. Only those holding nothing but shards are removed. Call it
  before the first save: a save under way uses one too.
  """
  if not tf.io.gfile.isdir(checkpoint_dir):
    return []
  removed = []
  for name in sorted(tf.io.gfile.listdir(checkpoint_dir)):
    path = os.path.join(checkpoint_dir, name.rstrip("/"))
    if not _TEMPORARY_DIR.search(name.rstrip("/")) or not tf.io.gfile.isdir(path):
      continue
    if all(_SHARD_FILE.match(entry) for entry in tf.io.gfile.listdir(path)):
      tf.io.gfile.rmtree(path)
      logging.info("Removed %s, left by a checkpoint save that did not finish.", path)
      removed.append(path)
  return removed


def write_json(path: str, content) -> None:
  """Writes `content` as JSON through `write_text`."""
  write_text(path, json.dumps(content, indent=2, sort_keys=True))


def write_text(path: str, text: str) -> None:
  """Writes `text` through a temporary file and a rename, so readers never see a half-written
  file; creates the parent directory. A storage failure raises WriteFailed naming `path`, the
  previous file untouched and the temporary one removed."""
  temporary = path + ".tmp"
  try:
    with writing(path):
      parent = os.path.dirname(path)
      if parent:
        tf.io.gfile.makedirs(parent)
      with tf.io.gfile.GFile(temporary, "w") as f:
        f.write(text)
      tf.io.gfile.rename(temporary, path, overwrite=True)
  except Exception:
    with contextlib.suppress(OSError, tf.errors.OpError):
      if tf.io.gfile.exists(temporary):
        tf.io.gfile.remove(temporary)
    raise
