"""The controller: the training loop of any task, under any tf.distribute strategy.

After Orbit's `Controller` driving a `StandardTrainer`: the controller owns the schedule and
the task owns the computation. The controller keeps one checkpointed global step (the epoch is
derived from it) and the running sums of the epoch in progress, so that a resumed epoch's
metrics are whole. Each call into the device runs `min(steps_per_loop, steps to the next
action)` steps (fewer under `Schedule.max_call_seconds`) of the task's `train_step` in one
`tf.function`, and the host adds their outputs to the epoch's sums a step at a time (the same
sums however steps are grouped into calls: a resume is exact); then it asks each periodic action
whether it is its time (big_vision's `itstime`): the epoch's end, the caller's actions, a
checkpoint, a preemption stop.

It imports nothing of the model, the data or the losses: tests drive it with a stand-in task
of a few variables (tests/controller_test.py).

Faults: a step whose outputs are not finite, or whose `nonfinite_*` counters are not zero,
stops the job before anything from that call is saved (`Diverged`). SIGTERM is agreed on by
every worker inside the call, so all stop at the same step, save, and raise `Preempted`; so is
Ctrl-C (a second one stops at once).
"""

import dataclasses
import time
from typing import Callable, Dict, Optional, Protocol, Sequence, Tuple

import numpy as np
import tensorflow as tf

from trainer.errors import JobError, UserInputError
from trainer.job import checkpoints, preemption, storage
from trainer.job import progress as progress_lib

# A task's step output whose name starts so counts the replicas where something went
# non-finite (gradients, weights): any count above zero is a divergence.
HEALTH_PREFIX = "nonfinite_"


class Task(Protocol):
  """What the controller trains (after Orbit's StandardTrainer and Model Garden's Task).

  `train_outputs` names, in a fixed order, the scalars `train_step` returns; each is summed
  over the replicas and the steps of a call, so a replica returns its share of a global value.
  """
  train_outputs: Tuple[str, ...]

  def checkpoint_items(self) -> Dict[str, tf.Module]:
    """What the checkpoint holds besides the controller's step and sums, by name."""

  def train_dataset(self, start_step: int):
    """The distributed training batches from global step `start_step` on, without end."""

  def train_step(self, inputs) -> Dict[str, tf.Tensor]:
    """One replica's step on its batch: updates the state, returns `train_outputs`."""

  def train_logs(self, sums: Dict[str, float], steps: int) -> Dict[str, float]:
    """The metrics to log for `steps` steps whose outputs summed to `sums`."""

  def summaries(self) -> Dict[str, float]:
    """Scalars of the task's state to log with the metrics (a learning rate, say)."""


@dataclasses.dataclass(frozen=True)
class Schedule:
  """When things happen, in global steps."""
  total_steps: int
  steps_per_epoch: int
  steps_per_loop: int
  checkpoint_every_steps: int
  examples_per_step: int  # The global batch: for images per second.
  # Seconds a call may last, at the measured speed (0: no cap; see progress.CallCap). Must
  # stay 0 under multi-worker: every worker must run the same steps per call, and each would
  # measure its own speed.
  max_call_seconds: float = 0.0


@dataclasses.dataclass(frozen=True)
class Action:
  """`run(global_step)` every `every` steps (0: never), after the step's epoch end, if any."""
  every: int
  run: Callable[[int], None]


class Diverged(JobError):
  """Training went non-finite; nothing from the call where it happened was saved."""


def itstime(step: int, every: int) -> bool:
  """Whether a periodic action of period `every` steps (0: never) is due at `step`."""
  return every > 0 and step > 0 and step % every == 0


def steps_to_next(step: int, every: int) -> Optional[int]:
  """Steps from `step` to the next multiple of `every` (None for 0: never)."""
  return every - step % every if every > 0 else None


def divergence(sums: Dict[str, float]) -> Optional[str]:
  """What went non-finite in a call's summed outputs, or None where training is healthy: a
  health counter first, then the loss, then any other output."""
  for name, value in sums.items():
    if name.startswith(HEALTH_PREFIX) and value:
      return f"non-finite {name[len(HEALTH_PREFIX):]}"
  for name in sorted(sums, key=lambda name: name != "loss"):
    if not np.isfinite(sums[name]):
      return f"a non-finite {name} ({sums[name]})"
  return None


def describe_step(step: int, steps_per_epoch: int) -> str:
  """'step N (epoch E, step S)' for the N-th training step of the run, counted from 1."""
  return (f"step {step} (epoch {(step - 1) // steps_per_epoch + 1}, step "
          f"{(step - 1) % steps_per_epoch + 1})")


def make_train_loop(strategy: tf.distribute.Strategy, task: Task):
  """A `tf.function(iterator, num_steps, stop_requested)` that runs `num_steps` task steps.

  Returns each step's `train_outputs` summed over the replicas (a [num_steps, outputs] float32
  matrix, columns in that order), and whether any worker's `stop_requested` was true: every
  worker gets the same answer, so all stop at the same step. There is no data-dependent exit:
  the host reads the outputs once per call, and sums them step by step (`fold_steps`), so that
  an epoch's sums do not depend on how its steps were grouped into calls.
  """
  names = task.train_outputs

  def replica_step(inputs):
    outputs = task.train_step(inputs)
    # One vector: MultiWorkerMirroredStrategy's reduce takes no dicts.
    return tf.stack([tf.cast(outputs[name], tf.float32) for name in names])

  @tf.function
  def train_loop(iterator, num_steps, stop_requested):
    steps = tf.TensorArray(tf.float32, size=num_steps, element_shape=[len(names)])
    for index in tf.range(num_steps):
      steps = steps.write(index, strategy.reduce(
          tf.distribute.ReduceOp.SUM, strategy.run(replica_step, args=(next(iterator),)),
          axis=None))
    requests = strategy.reduce(tf.distribute.ReduceOp.SUM,
                               strategy.run(tf.identity, args=(stop_requested,)), axis=None)
    return steps.stack(), requests > 0

  return train_loop


def first_unhealthy(step_outputs: np.ndarray, names: Sequence[str]) -> int:
  """The index of the first row of `step_outputs` (a step's outputs, columns `names`) with a
  non-finite value or a `nonfinite_*` count above zero; -1 where every step is healthy."""
  health = [index for index, name in enumerate(names) if name.startswith(HEALTH_PREFIX)]
  bad = ~np.all(np.isfinite(step_outputs), axis=1)
  if health:
    bad |= step_outputs[:, health].sum(axis=1) > 0
  return int(np.argmax(bad)) if bad.any() else -1


def fold_steps(sums: np.ndarray, step_outputs: np.ndarray) -> np.ndarray:
  """`sums` plus each row of `step_outputs`, one step at a time, in float64.

  The same float64 additions in the same order, however the steps were grouped into calls:
  a resumed epoch's sums equal the uninterrupted one's to the last bit.
  """
  sums = np.array(sums, dtype=np.float64)
  for row in np.asarray(step_outputs, dtype=np.float64):
    sums += row
  return sums


class Controller:
  """Trains `task` to `schedule.total_steps`, checkpointing into `save_dir`.

  `checkpoint_dir` is where every worker restores from; `save_dir` where this worker saves
  (a non-chief worker saves into scratch: saving is collective under multi-worker). With
  `write_summaries` (the chief's), the task's logs of every call go to TensorBoard at the
  global step, as a list of (step, scalars) at each checkpoint. `before_save()` runs before each checkpoint, and stops the job by raising where it may
  no longer write (its run directory taken over, say); `after_first_save()` runs once, after
  this process's first checkpoint: by then every check has passed and training has proven
  sound, and a file it writes never stands for a checkpoint that is not there.
  """

  def __init__(self, strategy: tf.distribute.Strategy, task: Task, schedule: Schedule,
               checkpoint_dir: str, checkpoints_to_keep: int, save_dir: Optional[str] = None,
               write_summaries: Optional[Callable[[Sequence[Tuple[int, Dict[str, float]]]],
                                                 None]] = None,
               show_progress: bool = False,
               before_save: Optional[Callable[[], None]] = None,
               after_first_save: Optional[Callable[[], None]] = None,
               clock: Callable[[], float] = time.perf_counter):
    self.strategy, self.task, self.schedule, self._clock = strategy, task, schedule, clock
    self.checkpoint_dir = checkpoint_dir
    self._summary_sink, self._show_progress = write_summaries, show_progress
    self._before_save, self._after_first_save = before_save, after_first_save
    self._saved_once = False
    # Training scalars wait in memory for this process's first checkpoint: a job refused or
    # diverging before it leaves no file behind.
    self._unsaved_summaries = []
    self._epoch_names = [n for n in task.train_outputs if not n.startswith(HEALTH_PREFIX)]
    with strategy.scope():
      self.global_step = tf.Variable(0, dtype=tf.int64, trainable=False, name="global_step")
      self.epoch_sums = tf.Variable(tf.zeros([len(self._epoch_names)], tf.float64),
                                    trainable=False, name="epoch_sums")
    self.checkpoint = tf.train.Checkpoint(global_step=self.global_step,
                                          epoch_sums=self.epoch_sums, **task.checkpoint_items())
    self._checkpoints_to_keep, self.unreadable = checkpoints_to_keep, []
    self._save_dir, self._manager = save_dir or checkpoint_dir, None
    self.latest_checkpoint = None  # The one restored, then the last saved.
    self.throughput = progress_lib.Throughput()
    self._call_cap = progress_lib.CallCap(schedule.max_call_seconds)

  @property
  def manager(self) -> tf.train.CheckpointManager:
    """Made at its first use (the first save): on the chief, after `checkpoints.tidy` has made
    the state file list what is on disk, since the manager reads it and a damaged one (empty,
    not text) would stop it."""
    if self._manager is None:
      if self._save_dir == self.checkpoint_dir:  # The chief's own checkpoints.
        checkpoints.tidy(self.checkpoint_dir, self.unreadable)
      self._manager = tf.train.CheckpointManager(self.checkpoint, self._save_dir,
                                                 max_to_keep=self._checkpoints_to_keep)
    return self._manager

  @property
  def step(self) -> int:
    return int(self.global_step.numpy())

  @property
  def epochs_done(self) -> int:
    return self.step // self.schedule.steps_per_epoch

  def restore(self) -> Optional[str]:
    """Restores the newest checkpoint in `checkpoint_dir` that reads back whole; returns its
    path, or None where none does (or there is none).

    Those that cannot be read are named in a warning and kept in `unreadable`, to be set
    aside at the first save (trainer.job.checkpoints). Raises `UserInputError` for a checkpoint
    of another trainer or another model.
    """
    latest, self.unreadable = checkpoints.newest_readable(self.checkpoint_dir)
    if latest is None:
      return None
    saved = {name for name, _ in tf.train.list_variables(latest)}
    if "global_step/.ATTRIBUTES/VARIABLE_VALUE" not in saved:
      raise UserInputError(
          f"the checkpoint {latest} was written by an older version of this trainer (an epoch "
          "and a step counter, no global step); finish that run with the version that "
          "started it, or start this one in a new --model_dir")
    checkpoints.restore(self.checkpoint, latest)
    self.latest_checkpoint = latest
    return latest

  def save(self) -> str:
    """Saves a checkpoint numbered by the global step; returns its path."""
    if self._before_save:
      self._before_save()
    with storage.writing(self._save_dir, "a checkpoint"):
      path = self.latest_checkpoint = self.manager.save(checkpoint_number=self.step)
    if not self._saved_once and self._after_first_save:
      self._after_first_save()
    self._saved_once = True
    self._flush_summaries()
    return path

  def train(self, on_epoch_end: Callable[[int, Dict[str, float], Optional[float]], None],
            actions: Sequence[Action] = ()) -> None:
    """Trains to `total_steps`. At each epoch's end, `on_epoch_end(global_step, the epoch's
    train logs, its examples/s or None)` runs, then a checkpoint is saved; then `actions`,
    in order; then the periodic checkpoint, unless one was saved at that step; and one at
    the last step in any case.

    Raises `Diverged` and, after saving, `preemption.Preempted` on SIGTERM or Ctrl-C.
    """
    schedule = self.schedule
    train_loop = make_train_loop(self.strategy, self.task)
    iterator = iter(self.task.train_dataset(self.step))
    periods = [schedule.steps_per_epoch, schedule.checkpoint_every_steps]
    periods += [action.every for action in actions]
    progress = self._progress()
    with preemption.stop_flag() as termination:
      while self.step < schedule.total_steps:
        step = self.step
        steps = self._call_cap.steps(min(
            [schedule.steps_per_loop, schedule.total_steps - step]
            + [s for s in (steps_to_next(step, every) for every in periods) if s]))
        _, stop = self._call(train_loop, iterator, steps, termination.requested)
        if progress:  # Before the epoch's end resets its sums: the bar ends on its numbers.
          progress.update(self.step, self._epoch_logs())
        saved = self._after_call(on_epoch_end, actions)
        if saved is None and self.step == schedule.total_steps:
          saved = self.save()  # The end: a run again finds it finished.
        if stop:
          raise preemption.Preempted(
              f"checkpoint {saved or self.save()} saved at epoch {self.epochs_done + 1}, "
              f"step {self.step % schedule.steps_per_epoch}", termination.signal_number)
      if termination.requested:  # Caught after the last call: training is saved, and done.
        raise preemption.Preempted(f"checkpoint {self.latest_checkpoint} saved at the end of "
                                   "training", termination.signal_number)

  def _call(self, train_loop, iterator, steps: int, stop_requested: bool):
    """One call into the device: `steps` steps, checked, counted and logged; returns the
    call's train logs and whether every worker agreed to stop."""
    started = self._clock()
    step_outputs, stop = train_loop(iterator, tf.constant(steps),
                                    tf.constant(float(stop_requested)))
    step_outputs = step_outputs.numpy()
    seconds = self._clock() - started
    names = self.task.train_outputs
    sums = dict(zip(names, fold_steps(np.zeros(len(names)), step_outputs).tolist()))
    first_bad = first_unhealthy(step_outputs, names)
    if first_bad >= 0:
      bad_step = describe_step(self.step + first_bad + 1, self.schedule.steps_per_epoch)
      raise Diverged(
          f"training diverged: {divergence(sums)} at {bad_step}; stopped without saving; the "
          f"last good checkpoint is {self.latest_checkpoint or 'none: nothing was saved'}; "
          "lower --learning_rate or check the data")
    self.throughput.add(steps * self.schedule.examples_per_step, seconds)
    self._call_cap.add(steps, seconds)
    self.global_step.assign_add(steps)
    epoch_columns = [names.index(name) for name in self._epoch_names]
    self.epoch_sums.assign(fold_steps(self.epoch_sums.numpy(), step_outputs[:, epoch_columns]))
    logs = self.task.train_logs(sums, steps)
    self._write_summaries(logs, steps / seconds)
    return logs, bool(stop)

  def _after_call(self, on_epoch_end, actions) -> Optional[str]:
    """Runs what is due at the step reached; returns the checkpoint saved there, if any."""
    step, schedule, saved = self.step, self.schedule, None
    if itstime(step, schedule.steps_per_epoch):
      # The caller records the epoch before the checkpoint: a job stopped between the two
      # trains the epoch again and rewrites its record, where the other order would lose it.
      on_epoch_end(step, self._epoch_logs(), self.throughput.end_epoch())
      self.epoch_sums.assign(tf.zeros_like(self.epoch_sums))
      saved = self.save()
    for action in actions:
      if itstime(step, action.every):
        action.run(step)
    if saved is None and itstime(step, schedule.checkpoint_every_steps):
      saved = self.save()
    return saved

  def _epoch_logs(self) -> Dict[str, float]:
    """The train logs of the epoch so far (at its end, the whole epoch's), steps trained
    before a resume included: from its running sums."""
    sums = dict(zip(self._epoch_names, self.epoch_sums.numpy().tolist()))
    return self.task.train_logs(sums, (self.step - 1) % self.schedule.steps_per_epoch + 1)

  def _progress(self) -> Optional[progress_lib.Progress]:
    """One for the whole run, on the chief: see progress.Progress."""
    if not self._show_progress:
      return None
    schedule = self.schedule
    return progress_lib.Progress(schedule.total_steps // schedule.steps_per_epoch,
                                 schedule.steps_per_epoch, schedule.examples_per_step,
                                 clock=self._clock)

  def _write_summaries(self, logs: Dict[str, float], steps_per_second: float) -> None:
    """Keeps the logs of one call for TensorBoard, at the global step it reached (chief only).

    They are written at the next checkpoint: a flush per call would hold the other workers
    at the next collective while the chief writes (on gs://, rewrites) its event file.
    """
    if not self._summary_sink:
      return
    self._unsaved_summaries.append((self.step, {
        **logs, **self.task.summaries(), "steps_per_second": steps_per_second}))

  def _flush_summaries(self) -> None:
    if self._unsaved_summaries:
      self._summary_sink(self._unsaved_summaries)
    self._unsaved_summaries = []
