"""Tests of trainer.job.controller, driven by a stand-in task: one variable, a toy step, no model.

The stand-in's state after N steps depends on the order of the steps it saw, so an exact
resume and the alignment of calls to actions both show in a single number.
"""

import os
import re
import shutil
import signal

import numpy as np
import pytest
import tensorflow as tf
from absl import logging

from tests import helpers
from trainer.job import controller as controller_lib
from trainer.job import outputs as outputs_lib
from trainer.job import preemption
from trainer.job import progress as progress_lib

STEPS_PER_EPOCH = 10


class StandInTask:
  """A task of one variable: each step halves it and adds the step's global index, which
  the step reads from its batch; its outputs are the index (as "loss") and the steps taken.
  At `diverge_at` (a global index), the step reports a non-finite `health` output."""
  train_outputs = ("loss", "steps", "nonfinite_values")

  def __init__(self, strategy, diverge_at=-1, health="nonfinite_values"):
    self.strategy, self.diverge_at, self.health = strategy, diverge_at, health
    with strategy.scope():
      self.value = tf.Variable(0.0, dtype=tf.float64, aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
    self.datasets_from = []

  def checkpoint_items(self):
    return {"value": self.value}

  def train_dataset(self, start_step):
    self.datasets_from.append(start_step)
    replicas = self.strategy.num_replicas_in_sync
    # One element per replica and step, each the step's global index.
    return self.strategy.distribute_datasets_from_function(
        lambda context: tf.data.Dataset.range(start_step * replicas, 10 ** 9).map(
            lambda i: tf.reshape(i // replicas, [1])))

  def train_step(self, inputs):
    replicas = self.strategy.num_replicas_in_sync
    self.value.assign(self.value * 0.5 + tf.cast(inputs[0], tf.float64))
    index = tf.cast(inputs[0], tf.float32)
    outputs = {"loss": index / replicas, "steps": 1.0 / replicas, "nonfinite_values": 0.0}
    bad = tf.cast(tf.equal(index, float(self.diverge_at)), tf.float32)
    if self.health == "loss":
      outputs["loss"] = tf.where(bad > 0, float("inf"), outputs["loss"])
    else:
      outputs["nonfinite_values"] = bad / replicas
    return outputs

  def train_logs(self, sums, steps):
    return {"loss": sums["loss"] / steps, "steps": sums["steps"]}

  def summaries(self):
    return {"value": float(self.value.numpy())}


def _summaries(tmp_path):
  """Writes a controller's TensorBoard scalars under tmp_path/logs, as the run's outputs do."""
  writers = outputs_lib.SummaryWriters(str(tmp_path))
  return lambda entries: writers.write("logs", entries)


def _controller(tmp_path, strategy=None, total_steps=25, steps_per_loop=4,
                checkpoint_every_steps=7, task=None, max_call_seconds=0.0, **kwargs):
  strategy = strategy or tf.distribute.get_strategy()
  task = task or StandInTask(strategy)
  schedule = controller_lib.Schedule(total_steps=total_steps, steps_per_epoch=STEPS_PER_EPOCH,
                                     steps_per_loop=steps_per_loop,
                                     checkpoint_every_steps=checkpoint_every_steps,
                                     examples_per_step=8, max_call_seconds=max_call_seconds)
  return controller_lib.Controller(strategy, task, schedule, str(tmp_path / "checkpoints"),
                                   checkpoints_to_keep=100, **kwargs)


class Recorder:
  """Records epoch ends and action calls as they happen."""

  def __init__(self, controller=None):
    self.events, self.controller = [], controller

  def epoch_end(self, step, logs, examples_per_second):
    self.events.append(("epoch", step, logs["loss"], logs["steps"]))

  def action(self, name):
    return lambda step: self.events.append((name, step))


def _saved_steps(tmp_path):
  state = tf.train.get_checkpoint_state(str(tmp_path / "checkpoints"))
  return [int(path.rsplit("-", 1)[1]) for path in state.all_model_checkpoint_paths]


def _expected_value(steps):
  value = 0.0
  for index in range(steps):
    value = value * 0.5 + index
  return value


def test_actions_fire_exactly_at_their_steps_where_calls_do_not_divide_the_epoch(tmp_path):
  calls = []
  controller = _controller(tmp_path, steps_per_loop=4)
  real_call = controller._call
  controller._call = lambda loop, it, steps, stop: (calls.append(steps),
                                                    real_call(loop, it, steps, stop))[1]
  recorder = Recorder()
  controller.train(recorder.epoch_end, [controller_lib.Action(3, recorder.action("every3"))])
  assert controller.step == 25
  assert float(controller.task.value.numpy()) == _expected_value(25)
  # Epoch ends at 10 and 20, with the mean of the epoch's step indices; actions every 3 steps.
  assert recorder.events == [
      ("every3", 3), ("every3", 6), ("every3", 9), ("epoch", 10, 4.5, 10), ("every3", 12),
      ("every3", 15), ("every3", 18), ("epoch", 20, 14.5, 10), ("every3", 21),
      ("every3", 24)]
  # Each call ends at the next action's step (every 3, the checkpoint's 7, the epoch's 10).
  assert np.cumsum(calls).tolist() == [3, 6, 7, 9, 10, 12, 14, 15, 18, 20, 21, 24, 25]
  # Saved every 7 steps, at each epoch's end (at 20 the epoch's save is the only one) and at
  # the last step.
  assert _saved_steps(tmp_path) == [7, 10, 14, 20, 21, 25]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  """A run saved at every step, and what it recorded: (its directory, controller, events)."""
  directory = tmp_path_factory.mktemp("uninterrupted")
  controller, recorder = _controller(directory, checkpoint_every_steps=1), Recorder()
  controller.train(recorder.epoch_end)
  return directory, controller, recorder.events


# In the first epoch, just before, at and just after its end, and after the last epoch's end.
@pytest.mark.parametrize("resume_at", [1, 9, 10, 11, 24])
def test_resuming_from_any_step_ends_as_the_uninterrupted_run(tmp_path, uninterrupted,
                                                             resume_at):
  source, finished, events = uninterrupted
  shutil.copytree(source, tmp_path / "run")
  checkpoints = tmp_path / "run" / "checkpoints"
  # As if killed right after step `resume_at`'s checkpoint: the later ones were never written.
  for later in checkpoints.glob("ckpt-*.*"):
    if int(later.name.split(".")[0].split("-")[1]) > resume_at:
      later.unlink()
  # Saving where the run saves anyway (epoch ends, the last step): a save a step would only
  # slow it, and its calls grouped otherwise must end the same.
  resumed, recorder = _controller(tmp_path / "run", checkpoint_every_steps=100), Recorder()
  assert resumed.restore().endswith(f"ckpt-{resume_at}") and resumed.step == resume_at
  resumed.train(recorder.epoch_end)
  assert resumed.task.datasets_from == [resume_at]
  assert float(resumed.task.value.numpy()) == float(finished.task.value.numpy())
  # An epoch ended after the resume has the whole epoch's sums, steps before it included.
  assert recorder.events == [event for event in events if event[1] > resume_at]
  assert len(recorder.events) == len([end for end in (10, 20) if end > resume_at])


def test_sigterm_stops_every_replica_at_one_step_saves_there_and_resumes(tmp_path,
                                                                         two_replicas):
  def sigterm(step):
    os.kill(os.getpid(), signal.SIGTERM)

  controller = _controller(tmp_path, strategy=two_replicas, checkpoint_every_steps=100)
  # Sent at step 5; the next call (5 to 9) carries the flag, and all replicas stop at its end.
  with pytest.raises(preemption.Preempted, match=r"ckpt-9 saved at epoch 1, step 9$"):
    controller.train(Recorder().epoch_end, [controller_lib.Action(5, sigterm)])
  assert _saved_steps(tmp_path) == [9]
  resumed = _controller(tmp_path, strategy=two_replicas, checkpoint_every_steps=100)
  resumed.restore()
  resumed.train(Recorder().epoch_end)
  assert float(resumed.task.value.numpy()) == _expected_value(25)


def test_sigterm_at_a_saving_step_saves_once(tmp_path):
  def sigterm(step):
    os.kill(os.getpid(), signal.SIGTERM)

  controller = _controller(tmp_path, steps_per_loop=3, checkpoint_every_steps=100)
  # Sent at step 9; the next call ends at the epoch's end (10), whose checkpoint is the stop's.
  with pytest.raises(preemption.Preempted, match=r"ckpt-10 saved at epoch 2, step 0$"):
    controller.train(Recorder().epoch_end, [controller_lib.Action(9, sigterm)])
  assert _saved_steps(tmp_path) == [10]


def test_a_stop_caught_after_the_last_call_still_stops_the_job(tmp_path):
  def sigterm(step):
    os.kill(os.getpid(), signal.SIGTERM)

  controller = _controller(tmp_path, checkpoint_every_steps=100)
  # At the last step, after the last call: the loop has ended, and must still say it stopped.
  with pytest.raises(preemption.Preempted, match=r"ckpt-25 saved at the end of training$"):
    controller.train(Recorder().epoch_end, [controller_lib.Action(25, sigterm)])
  assert _saved_steps(tmp_path)[-1] == 25


@pytest.mark.parametrize("health, problem", [("nonfinite_values", "non-finite values"),
                                             ("loss", "a non-finite loss (inf)")])
def test_divergence_stops_at_its_step_before_saving_anything_of_that_call(tmp_path, health,
                                                                          problem):
  task = StandInTask(tf.distribute.get_strategy(), diverge_at=12, health=health)
  controller = _controller(tmp_path, task=task, steps_per_loop=5, checkpoint_every_steps=100,
                           write_summaries=_summaries(tmp_path))
  recorder = Recorder()
  with pytest.raises(controller_lib.Diverged,
                     match=rf"training diverged: {re.escape(problem)} at step 13 \(epoch 2, step 3\); "
                           r"stopped without saving; the last good checkpoint is .*ckpt-10;"):
    controller.train(recorder.epoch_end)
  assert controller.step == 10  # The call of steps 10 to 15 counts for nothing.
  assert _saved_steps(tmp_path) == [10]
  assert [step for _, step, *_ in recorder.events] == [10]
  assert _logged_steps(tmp_path / "logs", "loss") == [5, 10]


def test_divergence_before_any_checkpoint_says_there_is_none(tmp_path):
  first_saves = []
  task = StandInTask(tf.distribute.get_strategy(), diverge_at=6)
  controller = _controller(tmp_path, task=task, steps_per_loop=2,
                           write_summaries=_summaries(tmp_path),
                           after_first_save=lambda: first_saves.append(1))
  with pytest.raises(controller_lib.Diverged, match=r"at step 7 \(epoch 1, step 7\).*checkpoint is "
                                                    r"none: nothing was saved; lower"):
    controller.train(Recorder().epoch_end)
  # Three good calls before it, and still nothing written: their scalars wait for a checkpoint.
  assert helpers.directory_state(tmp_path) == {}
  assert not first_saves


def test_a_finished_run_trains_and_writes_nothing(tmp_path):
  _controller(tmp_path, write_summaries=_summaries(tmp_path)).train(Recorder().epoch_end)
  before = helpers.directory_state(str(tmp_path))
  finished, recorder = _controller(tmp_path, write_summaries=_summaries(tmp_path)), Recorder()
  finished.restore()
  finished.train(recorder.epoch_end, [controller_lib.Action(1, recorder.action("any"))])
  assert finished.step == 25 and not recorder.events
  assert helpers.directory_state(str(tmp_path)) == before


def test_after_first_save_runs_once_after_the_first_checkpoint(tmp_path):
  # What it writes (the run's config.json) must never stand for a checkpoint not yet there.
  seen = []
  controller = _controller(tmp_path, after_first_save=lambda: seen.append(
      tf.train.latest_checkpoint(str(tmp_path / "checkpoints"))))
  controller.train(Recorder().epoch_end)
  assert seen == [str(tmp_path / "checkpoints" / "ckpt-7")]


def test_before_save_raising_stops_the_job_before_it_writes_anything(tmp_path):
  class TakenOver(Exception):
    pass

  def taken_over():
    raise TakenOver()
  controller = _controller(tmp_path, write_summaries=_summaries(tmp_path), before_save=taken_over)
  with pytest.raises(TakenOver):
    controller.train(Recorder().epoch_end)
  assert controller.step == 7 and helpers.directory_state(tmp_path) == {}


def _logged_steps(directory, tag):
  from tensorboard.backend.event_processing import event_accumulator
  events = event_accumulator.EventAccumulator(str(directory))
  events.Reload()
  return [event.step for event in events.Tensors(tag)]


def test_tensorboard_gets_every_calls_logs_at_the_global_step(tmp_path):
  controller = _controller(tmp_path, steps_per_loop=4, checkpoint_every_steps=100,
                           write_summaries=_summaries(tmp_path))
  controller.train(Recorder().epoch_end)
  # Calls end at 4, 8, 10 (the epoch), 14, 18, 20, 24, 25.
  expected = [4, 8, 10, 14, 18, 20, 24, 25]
  for tag in ("loss", "steps_per_second", "value"):
    assert _logged_steps(tmp_path / "logs", tag) == expected, tag
  from tensorboard.backend.event_processing import event_accumulator
  events = event_accumulator.EventAccumulator(str(tmp_path / "logs"))
  events.Reload()
  losses = [float(tf.make_ndarray(event.tensor_proto)) for event in events.Tensors("loss")]
  assert losses == [1.5, 5.5, 8.5, 11.5, 15.5, 18.5, 21.5, 24.0]  # Each call's mean index.


def test_throughput_leaves_out_the_first_call_and_time_between_calls(tmp_path, monkeypatch):
  clock = _Clock()
  _slow_steps(monkeypatch, clock, 1.0)
  controller = _controller(tmp_path, total_steps=20, steps_per_loop=5, clock=clock)

  def between_calls(step):
    clock.now += 100.0

  controller.train(Recorder().epoch_end, [controller_lib.Action(5, between_calls)])
  # The 15 steps after the first call's 5, of 8 examples and 1 s each; the time between calls
  # (100 s after each action) is not counted.
  assert controller.throughput.run == [15 * 8, 15.0]
  assert controller.throughput.overall() == 8.0


def test_a_checkpoint_without_a_global_step_is_refused_with_the_way_on(tmp_path):
  old = tf.train.Checkpoint(epoch=tf.Variable(1, dtype=tf.int64))
  tf.train.CheckpointManager(old, str(tmp_path / "checkpoints"), max_to_keep=1).save(16)
  with pytest.raises(controller_lib.UserInputError,
                     match=r"ckpt-16 was written by an older version of this trainer"):
    _controller(tmp_path).restore()


def test_divergence_names_what_went_non_finite():
  healthy = {"loss": 1.0, "nonfinite_gradients": 0.0, "nonfinite_weights": 0.0}
  assert controller_lib.divergence(healthy) is None
  for name, value, problem in (("nonfinite_gradients", 1.0, "non-finite gradients"),
                               ("nonfinite_weights", 1.0, "non-finite weights"),
                               ("loss", np.nan, "a non-finite loss (nan)")):
    assert controller_lib.divergence({**healthy, name: value}) == problem


class _Clock:
  def __init__(self):
    self.now = 0.0

  def __call__(self):
    return self.now


def _slow_steps(monkeypatch, clock, seconds_per_step):
  """Makes every call into the device last `seconds_per_step` a step on `clock`."""
  make_train_loop = controller_lib.make_train_loop

  def make(strategy, task):
    train_loop = make_train_loop(strategy, task)

    def timed(iterator, num_steps, stop_requested):
      outputs = train_loop(iterator, num_steps, stop_requested)
      clock.now += seconds_per_step * int(num_steps)
      return outputs
    return timed
  monkeypatch.setattr(controller_lib, "make_train_loop", make)


def _bar_ends(out):
  """(loss, steps) where each epoch's bar ended, from what the bars printed."""
  updates = [re.sub(r"\x1b\[\d+m", "", update) for update in re.split("[\r\n]", out)]
  ends = [update for update in updates if update.startswith(f"{STEPS_PER_EPOCH}/")]
  return [tuple(float(re.search(rf"{name}: ([\d.]+)", end)[1]) for name in ("loss", "steps"))
          for end in ends]


def test_the_bar_ends_each_epoch_on_the_epochs_numbers_a_resumed_one_too(tmp_path,
                                                                         monkeypatch, capsys):
  monkeypatch.setattr(progress_lib, "on_terminal", lambda: True)
  first, recorder = _controller(tmp_path, total_steps=15, show_progress=True), Recorder()
  first.train(recorder.epoch_end)  # Calls end at 4, 7, 10, 14, 15: epoch 2 stops halfway.
  assert _bar_ends(capsys.readouterr().out) == [(4.5, 10)]
  resumed = _controller(tmp_path, total_steps=20, show_progress=True)
  resumed.restore()
  resumed.train(recorder.epoch_end)  # Steps 15 to 19, in calls ending at 19 and 20.
  assert recorder.events == [("epoch", 10, 4.5, 10), ("epoch", 20, 14.5, 10)]
  # The epoch's mean, steps 10 to 14 of the first process included; not the last call's (19).
  assert _bar_ends(capsys.readouterr().out) == [(14.5, 10)]


@pytest.mark.parametrize("steps_per_loop, seconds_per_step, total_steps, expected", [
    # Two calls an epoch, 30 s each: the first of each epoch reports, the first of the
    # process (tracing) without a speed; each epoch's last is its epoch line's.
    (5, 6.0, 20, ["epoch 1/2: step 5/10 (50%), loss 2.0000, - images/s",
                  "epoch 2/2: step 5/10 (50%), loss 12.0000, 1 images/s"]),
    # A line every other call of 20 s: the epoch's running loss, not the call's (2.5, 6.5).
    (2, 10.0, 10, ["epoch 1/1: step 4/10 (40%), loss 1.5000, 1 images/s",
                   "epoch 1/1: step 8/10 (80%), loss 3.5000, 1 images/s"]),
])
def test_off_a_terminal_a_line_comes_every_30_seconds_at_any_call_but_an_epochs_last(
    tmp_path, monkeypatch, caplog, steps_per_loop, seconds_per_step, total_steps, expected):
  logging.set_verbosity(logging.INFO)
  caplog.set_level("INFO")
  monkeypatch.setattr(progress_lib, "on_terminal", lambda: False)
  clock = _Clock()
  _slow_steps(monkeypatch, clock, seconds_per_step)
  controller = _controller(tmp_path, total_steps=total_steps, steps_per_loop=steps_per_loop,
                           checkpoint_every_steps=100, show_progress=True, clock=clock)
  controller.train(Recorder().epoch_end)
  assert [r.getMessage() for r in caplog.records
          if r.getMessage().startswith("epoch ")] == expected


class _IrrationalLossTask(StandInTask):
  """The stand-in with losses that float32 rounds at every addition, as a real loss's are."""

  def train_step(self, inputs):
    outputs = super().train_step(inputs)
    return {**outputs, "loss": tf.sqrt(outputs["loss"] + 2.0) / 3.0}


@pytest.fixture(scope="module")
def irrational_epochs(tmp_path_factory):
  """The epoch ends of the irrational-loss stand-in over 20 steps in calls of 7."""
  reference = Recorder()
  _controller(tmp_path_factory.mktemp("irrational"),
              task=_IrrationalLossTask(tf.distribute.get_strategy()), total_steps=20,
              steps_per_loop=7, checkpoint_every_steps=100).train(reference.epoch_end)
  return reference.events


@pytest.mark.parametrize("steps_per_loop", [1, 3, 10])
def test_an_epochs_sums_do_not_depend_on_how_its_steps_are_grouped_into_calls(
    tmp_path, irrational_epochs, steps_per_loop):
  # Exact resume rests on this: a resumed process groups the epoch's steps in other calls (the
  # call cap times its own steps), and its history.json must equal the uninterrupted run's.
  grouped = Recorder()
  _controller(tmp_path, task=_IrrationalLossTask(tf.distribute.get_strategy()),
              total_steps=20, steps_per_loop=steps_per_loop, checkpoint_every_steps=100).train(
                  grouped.epoch_end)
  assert grouped.events == irrational_epochs  # Exactly: not within round-off.


@pytest.mark.parametrize("max_call_seconds, seconds_per_step, calls", [
    # No cap: calls of steps_per_loop steps, cut at each checkpoint (7, 14, 21) and epoch end.
    (0.0, 3.0, [4, 7, 10, 14, 18, 20, 21, 25]),
    # One step until a call after the first is timed, then floor(10 / 3) = 3 steps a call.
    (10.0, 3.0, [1, 2, 5, 7, 10, 13, 14, 17, 20, 21, 24, 25]),
    # Fast steps: 20 a call would fit, but never more than steps_per_loop (4).
    (10.0, 0.5, [1, 2, 6, 7, 10, 14, 18, 20, 21, 25]),
])
def test_the_call_cap_shortens_slow_calls_and_trains_the_same_steps(
    tmp_path, monkeypatch, max_call_seconds, seconds_per_step, calls):
  clock, steps = _Clock(), []
  _slow_steps(monkeypatch, clock, seconds_per_step)
  controller = _controller(tmp_path, steps_per_loop=4, max_call_seconds=max_call_seconds,
                           clock=clock)
  real_call = controller._call
  controller._call = lambda loop, it, n, stop: (steps.append(n), real_call(loop, it, n, stop))[1]
  recorder = Recorder()
  controller.train(recorder.epoch_end)
  assert np.cumsum(steps).tolist() == calls and max(steps) <= 4
  # The same steps in other calls: the same state, epochs and sums (steps 20 to 24).
  assert controller.step == 25
  assert float(controller.task.value.numpy()) == _expected_value(25)
  assert recorder.events == [("epoch", 10, 4.5, 10), ("epoch", 20, 14.5, 10)]
  assert controller.epoch_sums.numpy().tolist() == [110.0, 5.0]
