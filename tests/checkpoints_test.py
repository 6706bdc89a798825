"""Tests of trainer.job.checkpoints: checkpoints found by their files, damage found by reading them
back, unreadable ones set aside, and a state file that lists what is on disk."""

import os

import pytest
import tensorflow as tf

from trainer.errors import UserInputError
from trainer.job import checkpoints


def _save(directory, steps, size=1000, keep=10):
  """Saves a checkpoint of a `size`-float variable at each of `steps`; returns the checkpoint."""
  checkpoint = tf.train.Checkpoint(weights=tf.Variable(tf.range(size, dtype=tf.float32)),
                                   step=tf.Variable(0, dtype=tf.int64))
  manager = tf.train.CheckpointManager(checkpoint, str(directory), max_to_keep=keep)
  for step in steps:
    checkpoint.step.assign(step)
    manager.save(checkpoint_number=step)
  return checkpoint


def _damage(prefix, how):
  data, index = f"{prefix}.data-00000-of-00001", f"{prefix}.index"
  if how == "data truncated":
    os.truncate(data, 100)
  elif how == "index truncated":
    os.truncate(index, 30)
  else:  # Bytes overwritten inside the tensor data: only its checksum tells.
    with open(data, "r+b") as f:
      f.seek(2000)
      f.write(b"\xff" * 64)


def test_checkpoints_are_found_by_their_files_in_step_order(tmp_path):
  _save(tmp_path, [9, 62, 100])
  (tmp_path / "checkpoint").unlink()  # The state file is not needed.
  assert checkpoints.on_disk(str(tmp_path)) == [str(tmp_path / f"ckpt-{n}") for n in (9, 62, 100)]
  assert checkpoints.on_disk(str(tmp_path / "missing")) == []


@pytest.mark.parametrize("how", ["data truncated", "index truncated", "bytes overwritten"])
def test_the_newest_readable_checkpoint_is_chosen_and_the_damaged_one_named(tmp_path, how):
  _save(tmp_path, [10, 20])
  assert checkpoints.read_failure(str(tmp_path / "ckpt-20")) is None
  _damage(tmp_path / "ckpt-20", how)
  assert checkpoints.read_failure(str(tmp_path / "ckpt-20"))
  latest, unreadable = checkpoints.newest_readable(str(tmp_path))
  assert latest == str(tmp_path / "ckpt-10") and unreadable == [str(tmp_path / "ckpt-20")]
  restored = _save(tmp_path / "other", [])
  checkpoints.restore(restored, latest)
  assert int(restored.step.numpy()) == 10


def test_nothing_readable_is_none_with_every_damaged_one_named(tmp_path):
  _save(tmp_path, [10, 20])
  for step in (10, 20):
    _damage(tmp_path / f"ckpt-{step}", "data truncated")
  assert checkpoints.newest_readable(str(tmp_path)) == (
      None, [str(tmp_path / "ckpt-20"), str(tmp_path / "ckpt-10")])


def test_another_models_checkpoint_is_refused_in_one_line_cut_at_a_word(tmp_path):
  _save(tmp_path, [10], size=1000)
  other = _save(tmp_path / "other", [], size=7)
  with pytest.raises(UserInputError) as raised:
    checkpoints.restore(other, str(tmp_path / "ckpt-10"))
  message = str(raised.value)
  assert "holds another model" in message and "\n" not in message
  assert message.endswith("run it with the flags it was trained with (e.g. --latent_dim), or "
                          "use a new --model_dir")
  detail = message[message.index("(") + 1:message.index("); run it")]
  assert len(detail) <= 164 and (detail.endswith(" ...") or len(detail) <= 160)


def test_unreadable_checkpoints_are_set_aside_kept_and_the_state_rewritten(tmp_path):
  _save(tmp_path, [10, 20, 30])
  _damage(tmp_path / "ckpt-30", "data truncated")
  damaged = (tmp_path / "ckpt-30.index").read_bytes()
  stale = tmp_path / "ckpt-40_temp"
  stale.mkdir()
  (stale / "part-00000-of-00001.data-00000-of-00001").write_bytes(b"half a save")
  checkpoints.tidy(str(tmp_path), [str(tmp_path / "ckpt-30")])
  assert (tmp_path / "unreadable" / "ckpt-30.index").read_bytes() == damaged
  assert not stale.exists() and not (tmp_path / "ckpt-30.index").exists()
  assert tf.train.latest_checkpoint(str(tmp_path)) == str(tmp_path / "ckpt-20")
  # A second damaged ckpt-30 goes beside the first, not over it.
  _save(tmp_path, [30])
  assert checkpoints.set_aside(str(tmp_path / "ckpt-30")) == str(tmp_path / "unreadable" /
                                                                 "ckpt-30.2")


def test_the_rewritten_state_lets_the_manager_delete_old_checkpoints_again(tmp_path):
  _save(tmp_path, [10, 20, 30])
  (tmp_path / "checkpoint").write_text("garbage {{")
  checkpoints.write_state(str(tmp_path))
  _save(tmp_path, [40, 50], keep=3)
  assert [os.path.basename(p) for p in checkpoints.on_disk(str(tmp_path))] == [
      "ckpt-30", "ckpt-40", "ckpt-50"]
