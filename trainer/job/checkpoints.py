"""The checkpoints on disk: which there are, which read back whole, and where the others go.

The CheckpointManager's state file (`checkpoint`) is a convenience, not the truth: it can be
deleted, name a deleted checkpoint, or hold garbage, and a checkpoint it names can be damaged
(a disk that failed, a copy cut short). So a run finds its checkpoints by their index files,
restores the newest whose every tensor reads back whole, and sets aside (moves, never deletes)
the newer ones that do not, so that later saves cannot overwrite them.
"""

import os
import re
import time
from typing import List, Optional, Tuple

import tensorflow as tf
from absl import logging

from trainer.errors import first_line, UserInputError
from trainer.job import storage

PREFIX = "ckpt"  # The CheckpointManager's default checkpoint_name.
SET_ASIDE = "unreadable"  # The subdirectory unreadable checkpoints are moved into.
_INDEX = re.compile(re.escape(PREFIX) + r"-(\d+)\.index$")


def on_disk(directory: str) -> List[str]:
  """The checkpoints in `directory` (their path prefixes, `DIR/ckpt-N`), oldest first."""
  numbered = []
  for path in tf.io.gfile.glob(os.path.join(directory, f"{PREFIX}-*.index")):
    match = _INDEX.search(os.path.basename(path))
    if match:
      numbered.append((int(match.group(1)), path[:-len(".index")]))
  return [path for _, path in sorted(numbered)]


def read_failure(path: str) -> Optional[str]:
  """Why the checkpoint at `path` cannot be read back (one line), or None where every tensor
  of it reads whole: TensorFlow checks each tensor's checksum as it reads it."""
  try:
    reader = tf.train.load_checkpoint(path)
    for name in reader.get_variable_to_shape_map():
      reader.get_tensor(name)
  except Exception as e:  # pylint: disable=broad-except
    # Damage surfaces as OpErrors (DataLoss, NotFound, OutOfRange) and, for a truncated data
    # file, as an IndexError from the reader: any failure to read is damage.
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else 'unreadable'}"
  return None


def set_aside(path: str) -> str:
  """Moves the files of the checkpoint at `path` into `SET_ASIDE/` beside it (under a new
  name where an earlier one is already there); returns the new path prefix."""
  directory, name = os.path.split(path)
  destination_dir = os.path.join(directory, SET_ASIDE)
  tf.io.gfile.makedirs(destination_dir)
  destination, copy = os.path.join(destination_dir, name), 1
  while tf.io.gfile.glob(destination + ".*"):
    copy += 1
    destination = os.path.join(destination_dir, f"{name}.{copy}")
  for source in tf.io.gfile.glob(path + ".*"):
    tf.io.gfile.rename(source, destination + source[len(path):])
  return destination


def write_state(directory: str) -> None:
  """Rewrites the state file to list the checkpoints on disk, the newest as the latest, so
  that the CheckpointManager keeps and deletes what is really there."""
  kept = [os.path.basename(path) for path in on_disk(directory)]
  if not kept:
    return
  # The CheckpointState text format, with relative paths as the CheckpointManager writes it
  # (TensorFlow's own writer for it is deprecated and says so on the log).
  # Timestamps after the last preserved one: the manager deletes only checkpoints so stamped.
  now = time.time()
  lines = [f'model_checkpoint_path: "{kept[-1]}"']
  lines += [f'all_model_checkpoint_paths: "{name}"' for name in kept]
  lines += [f"all_model_checkpoint_timestamps: {now - len(kept) + index}"
            for index in range(len(kept))]
  lines.append(f"last_preserved_timestamp: {now - len(kept) - 1}")
  storage.write_text(os.path.join(directory, "checkpoint"), "\n".join(lines) + "\n")


def newest_readable(directory: str) -> Tuple[Optional[str], List[str]]:
  """The newest checkpoint in `directory` that reads back whole (None if none does), and the
  newer ones that do not, each named in a warning as it is passed over."""
  unreadable = []
  for path in reversed(on_disk(directory)):
    failure = read_failure(path)
    if failure is None:
      return path, unreadable
    logging.warning("The checkpoint %s cannot be read (%s); trying the one before it.", path,
                    failure)
    unreadable.append(path)
  return None, unreadable


def restore(checkpoint: tf.train.Checkpoint, path: str) -> None:
  """Restores `checkpoint` from `path`, which reads back whole (`read_failure`): a failure
  here means it holds another model, and is refused with one line."""
  try:
    checkpoint.restore(path).assert_existing_objects_matched()
  except (AssertionError, ValueError, tf.errors.OpError) as e:
    raise UserInputError(
        f"the checkpoint {path} holds another model ({_clipped(first_line(e))}); run it with "
        "the flags it was trained with (e.g. --latent_dim), or use a new --model_dir") from None


def tidy(directory: str, unreadable: List[str]) -> None:
  """Before the first save into `directory`: sets `unreadable` checkpoints aside, removes what
  interrupted saves left, and makes the state file list what is on disk."""
  for path in unreadable:
    logging.warning("Set the unreadable checkpoint %s aside as %s (kept: delete it once looked "
                    "at).", path, set_aside(path))
  storage.clean_stale_temporaries(directory)
  write_state(directory)


def _clipped(text: str, limit: int = 160) -> str:
  """`text` cut at a word boundary to about `limit` characters, marked where it was cut."""
  return text if len(text) <= limit else text[:limit].rsplit(" ", 1)[0] + " ..."
