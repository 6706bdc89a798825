"""The job: a task trained by the controller, evaluated and exported in its run directory.

It owns only the order of things. The task (`Task`, built by the factory the caller passes:
`trainer.multitask.problem.make_task` for this package's problem) owns the problem: its model,
data, metrics and export; the controller (`trainer.job.controller`) the loop; the run directory's
outputs (`trainer.job.outputs`) the disk. It imports nothing of the problem: tests drive it with a
stand-in task (tests/train_test.py).

Keras 3.15's `model.fit` fails under MultiWorkerMirroredStrategy, so the package owns its loop,
as the Model Garden's trainers do. `run` reads in three stages: `prepare` (checks, builds,
restores), `fit`, `finalize` (test, export, report, metrics.json).
"""

import dataclasses
from typing import Callable, Dict, List, Optional, Protocol, Tuple

import keras
import tensorflow as tf
from absl import logging

from trainer import config as config_lib
from trainer import errors
from trainer.config import TrainConfig
from trainer.job import controller as controller_lib
from trainer.job import distribution, preemption, progress, run_directory, storage, tuning
from trainer.job import lease as lease_lib
from trainer.job import outputs as outputs_lib

Evaluate = Callable[[str], Dict[str, float]]
OnEvaluation = Callable[[int, Evaluate], None]


class Task(controller_lib.Task, Protocol):
  """What the job trains and finishes (after Model Garden's Task): the controller's training
  step, and what a run needs at its epochs' ends and its end. Metric names are the task's:
  the job writes whatever `evaluate` returns, under `test_` and `validation_` in metrics.json.
  """
  steps_per_epoch: int
  examples_per_step: int  # The global batch.
  headline: Tuple[str, ...]  # The test metrics the job's closing line names.

  def evaluate(self, split: str) -> Dict[str, float]:
    """The metrics of the split "validation" or "test"."""

  def epoch_state(self) -> Dict[str, Dict[str, float]]:
    """Learned values to record with each epoch (task weights, say), by name; their last
    values go into metrics.json as `NAME_final`."""

  def learning_rate(self, step: int, total_steps: int) -> float:
    """The learning rate at `step` of a run of `total_steps` (said when a run is extended)."""

  def export(self, path: str) -> None:
    """Writes the trained model for serving to the directory `path`."""

  def export_problem(self, path: str) -> Optional[str]:
    """What is missing or damaged in the export at `path`, or None where it is whole."""

  def run_facts(self) -> Dict[str, object]:
    """What metrics.json says of the problem beside its metrics (the data it learned, say)."""

  def write_report(self, export_dir: str, history: List[Dict], metrics: Dict[str, object],
                   report_dir: str, summary_writer) -> None:
    """Draws the run's report into `report_dir`, and its images to TensorBoard."""


# Builds the task of a configuration under a strategy, its variables under the Keras dtype
# policy it is given (already in force); checks its data and batch plan first.
TaskFactory = Callable[[TrainConfig, tf.distribute.Strategy, str], Task]
# Off a terminal a progress line is promised about every 30 s, and SIGTERM and checkpoints
# wait for a device call's end: where steps per call are ours to pick, no call lasts longer.
MAX_CALL_SECONDS = 10.0
# On a terminal the bar moves at each call's end: shorter calls, so that it moves smoothly.
BAR_CALL_SECONDS = 1.0


def is_chief(strategy: tf.distribute.Strategy) -> bool:
  """True on the one worker that writes shared outputs (every single-host strategy's)."""
  return bool(strategy.extended.should_checkpoint)


def configure_process(config: TrainConfig,
                      strategy: tf.distribute.Strategy) -> distribution.Precision:
  """Makes the process-wide settings a job needs, once, before any model is built: the seeds,
  op determinism and the Keras dtype policy. The entry point calls it, and so do notebooks
  and tests, before `run`, which checks the policy. Returns the policy and why it was chosen."""
  keras.utils.set_random_seed(config.seed)
  if config.deterministic:
    # The input pipeline is deterministic anyway; this makes the kernels so.
    tf.config.experimental.enable_op_determinism()
  precision = distribution.resolve_precision(config.precision, strategy)
  distribution.set_precision(precision)
  return precision


@dataclasses.dataclass
class Job:
  """What the stages share, set up once. `finished` holds the metrics of a job that has
  already trained all its epochs (it is not trained again); None where there is work left.
  `close()` ends it: it gives back the chief's lease on the run directory."""
  config: TrainConfig
  precision: distribution.Precision
  outputs: outputs_lib.RunOutputs
  task: Task
  controller: controller_lib.Controller
  history: List[Dict]
  finished: Optional[Dict[str, object]] = None
  lease: Optional[lease_lib.Lease] = None
  created_model_dir: bool = False  # By this job: it goes again if the job writes nothing.
  tuning_reporter: Optional[tuning.Reporter] = None  # The chief's, in a tuning trial.

  def check_lease(self) -> None:
    """Raises `lease.LeaseLost` where another job has taken the run directory over."""
    if self.lease:
      self.lease.check()

  def report_evaluation(self, step: int, validation: Dict[str, float]) -> None:
    """Reports the validation metrics of the evaluation at `step` to the tuning trial this
    process is the chief of, if any."""
    if self.tuning_reporter:
      self.tuning_reporter.report(step, validation)

  def close(self) -> None:
    _give_back(self.lease, self.config.model_dir, self.created_model_dir)


def _give_back(lease: Optional[lease_lib.Lease], model_dir: str, created: bool) -> None:
  """Releases the lease; removes the run directory if this job created it and wrote nothing."""
  if lease:
    lease.release()
  if created:
    storage.remove_if_empty(model_dir)


def _checked_precision(config: TrainConfig,
                       strategy: tf.distribute.Strategy) -> distribution.Precision:
  precision = distribution.resolve_precision(config.precision, strategy)
  if keras.mixed_precision.dtype_policy().name != precision.policy:
    raise RuntimeError(f"the Keras dtype policy is {keras.mixed_precision.dtype_policy().name}, "
                       f"but the configuration asks for {precision.policy}: call "
                       "train.configure_process(config, strategy) before train.run")
  return precision


def run_directory_of(config: TrainConfig) -> run_directory.RunDirectory:
  """The run directory `config` names, with its --checkpoint_dir and --tensorboard_dir."""
  return run_directory.RunDirectory(config.model_dir, config.checkpoint_dir,
                                    config.tensorboard_dir)


def make_schedule(config: TrainConfig, task: Task, strategy: tf.distribute.Strategy,
                  chief: bool = True) -> controller_lib.Schedule:
  """When things happen in a run of `task`: --steps_per_loop's 0 resolved here, by platform
  (the configuration keeps 0, so a run resumed on another platform changes nothing)."""
  # Only a single worker may cap its calls by its own measured speed (see Schedule), and a
  # TPU's calls are short and costly to retrace; a given --steps_per_loop is taken as given.
  cap_calls = (not config.steps_per_loop and
               distribution.strategy_name(strategy) in ("default", "mirrored", "one_device"))
  return controller_lib.Schedule(
      total_steps=config.epochs * task.steps_per_epoch, steps_per_epoch=task.steps_per_epoch,
      steps_per_loop=config.steps_per_loop or distribution.default_steps_per_loop(strategy),
      checkpoint_every_steps=config.checkpoint_every_steps,
      examples_per_step=task.examples_per_step,
      max_call_seconds=(0.0 if not cap_calls else BAR_CALL_SECONDS
                        if chief and progress.on_terminal() else MAX_CALL_SECONDS))


def prepare(config: TrainConfig, strategy: tf.distribute.Strategy,
            make_task: TaskFactory) -> Job:
  """Builds the task (which checks its data and batch plan), checks the outputs, takes the run
  directory's lease (chief), checks the run's saved settings, in that order and before
  anything is written; builds the controller, and restores the newest checkpoint that reads
  back whole. Call `close()` on the job it returns (`run` does)."""
  precision = _checked_precision(config, strategy)
  task = make_task(config, strategy, precision.policy)
  outputs = outputs_lib.RunOutputs(run_directory_of(config), is_chief(strategy))
  # One job per run directory; the chief's lease stands for every worker of a cluster.
  created = outputs.chief and not tf.io.gfile.exists(config.model_dir)
  lease = lease_lib.Lease.acquire(config.model_dir) if outputs.chief else None
  try:
    # A restart that would change what the run computes is refused before the checkpoint is
    # read: its own error would name a symptom, not the change.
    saved = outputs.read_config()
    for change in config_lib.resume_changes(saved, config) if saved else []:
      logging.info("Changed since this run was last started: %s", change)
    previous = outputs_lib.saved_precision(saved) if saved else None
    if previous not in (None, precision.policy):
      # `auto` resolves on each start: a run resumed on another CPU may compute otherwise.
      logging.info("Changed since this run was last started: precision %s -> %s (%s)",
                   previous, precision.policy, precision.reason)
    controller = controller_lib.Controller(
        strategy, task, make_schedule(config, task, strategy, outputs.chief),
        outputs.paths.checkpoints, config.checkpoints_to_keep, save_dir=outputs.checkpoints,
        write_summaries=outputs.summaries_of("train"), show_progress=outputs.chief,
        before_save=lease.check if lease else None,
        after_first_save=lambda: outputs.write_config(dataclasses.asdict(config),
                                                      precision.policy))
    job = Job(config, precision, outputs, task, controller, history=[], lease=lease,
              created_model_dir=created)
    job.finished = outputs.finished_metrics(config.epochs, task.headline)
    export_problem = job.finished is not None and task.export_problem(outputs.paths.export)
    if export_problem:
      logging.warning("%s says this run has finished, but %s; exporting it again from its last "
                      "checkpoint.", outputs.paths.metrics, export_problem)
      job.finished = None
    if job.finished is None:
      _resume(job, saved)
    if outputs.chief:
      job.tuning_reporter = _tuning_reporter(job)
    return job
  except BaseException:
    _give_back(lease, config.model_dir, created)
    raise


def _resume(job: Job, saved: Optional[Dict]) -> None:
  """Restores the newest readable checkpoint and the history of its epochs; refuses to start
  over in silence where the run's own files show it has trained."""
  config, outputs, controller = job.config, job.outputs, job.controller
  latest, trained_files = controller.restore(), outputs.trained_files()
  if latest is None and trained_files:
    where, unreadable = controller.checkpoint_dir, len(controller.unreadable)
    state = (f"none of the {unreadable} checkpoints in {where} can be read" if unreadable
             else f"there is no checkpoint in {where}")
    old_dir = (saved or {}).get("checkpoint_dir") or outputs.paths.own_checkpoints
    elsewhere = f" (it saved them in {old_dir})" if old_dir != controller.checkpoint_dir else ""
    raise errors.UserInputError(
        f"this run has trained ({', '.join(trained_files)}) but {state}{elsewhere}; "
        "point --checkpoint_dir at its checkpoints, or start over in a new --model_dir")
  if controller.epochs_done > config.epochs:
    raise errors.UserInputError(
        f"--epochs={config.epochs} is fewer than the {controller.epochs_done} epochs the "
        f"checkpoint {latest} has trained; pass --epochs={controller.epochs_done} or more, or "
        "a new --model_dir")
  job.history = outputs.read_history(controller.epochs_done)
  steps_per_epoch = job.task.steps_per_epoch
  if latest and saved and saved["epochs"] < config.epochs:
    _log_extension(job, saved["epochs"])
  if latest and controller.epochs_done == config.epochs:
    logging.info("Resuming from %s: all %d epochs are trained; evaluating and exporting.",
                 latest, config.epochs)
  elif latest:
    logging.info("Resuming from %s: epoch %d of %d, step %d of %d.", latest,
                 controller.epochs_done + 1, config.epochs,
                 controller.step % steps_per_epoch, steps_per_epoch)


def _tuning_reporter(job: Job) -> Optional[tuning.Reporter]:
  """In a tuning trial, the reporter of the job's evaluations, having reported again those of
  the steps trained before this process (every one, where the job has finished); None
  elsewhere."""
  steps_per_epoch = job.task.steps_per_epoch
  reporter = tuning.trial_reporter(job.config.tuning_metric, job.config.model_dir,
                                   steps_per_epoch, before_write=job.check_lease)
  if reporter is None:
    return None
  if job.finished is None:
    history, trained_steps = job.history, job.controller.step
  else:  # Not restored: its metrics say how far it trained.
    epochs = job.finished["epochs"]
    history, trained_steps = job.outputs.read_history(epochs), epochs * steps_per_epoch
  reported = reporter.resume(history, trained_steps)
  if reported:
    logging.info("Reported the %d evaluations of the first %d steps to the tuning trial again.",
                 reported, trained_steps)
  return reporter


def _log_extension(job: Job, old_epochs: int) -> None:
  """Says that a larger --epochs stretches the learning-rate schedule, and what that does to
  the rate where training resumes: it rises again where the old run had decayed it."""
  config, step, steps_per_epoch = job.config, job.controller.step, job.task.steps_per_epoch
  old_total, new_total = old_epochs * steps_per_epoch, config.epochs * steps_per_epoch
  rate = {total: job.task.learning_rate(step, total) for total in (old_total, new_total)}
  logging.info("Extending this run from %d to %d epochs (%d to %d steps): the learning rate's "
               "cosine schedule is stretched over the new total, so at step %d it is %.3g "
               "instead of %.3g (peak %.3g).", old_epochs, config.epochs, old_total, new_total,
               step, rate[new_total], rate[old_total], config.learning_rate)


def fit(job: Job, on_evaluation: Optional[OnEvaluation] = None) -> Optional[Dict[str, float]]:
  """Trains to the last step of the last epoch; returns the last validation metrics (None
  where no epoch ended in this process).

  `on_evaluation(global_step, evaluate)` runs every `eval_every_steps` and at each epoch's
  end; without it, validation metrics are logged every `eval_every_steps`. In a tuning trial
  the validation metrics of each epoch's end are reported, and between epoch ends those
  the job (or `on_evaluation`) computed.
  """
  config, task, steps_per_epoch = job.config, job.task, job.task.steps_per_epoch
  last = {}

  def end_epoch(step: int, train_logs: Dict[str, float], images_per_second) -> None:
    validation = last["validation"] = task.evaluate("validation")
    entry = {"epoch": step // steps_per_epoch, "train": train_logs, "validation": validation,
             **task.epoch_state()}
    job.check_lease()  # Before its record: two jobs' epochs must not mix.
    job.history = job.outputs.record_epoch(job.history, entry, config.epochs, step,
                                           images_per_second)
    job.report_evaluation(step, validation)

  def evaluate_between_epochs(step: int) -> None:
    if controller_lib.itstime(step, steps_per_epoch):
      return  # The epoch's end has evaluated.
    if on_evaluation:
      evaluated = {}

      def evaluate(split: str) -> Dict[str, float]:  # What the hook computes is reported.
        evaluated[split] = task.evaluate(split)
        return evaluated[split]

      on_evaluation(step, evaluate)
      if "validation" in evaluated:
        job.report_evaluation(step, evaluated["validation"])
      return
    metrics = task.evaluate("validation")
    logging.info("step %d: validation %s", step, outputs_lib.metrics_text(metrics))
    job.report_evaluation(step, metrics)

  # The hook at an epoch's end runs after the epoch's checkpoint: one that raises (to stop
  # early, say) loses nothing.
  at_epoch_end = ([controller_lib.Action(steps_per_epoch, lambda step: on_evaluation(
      step, task.evaluate))] if on_evaluation else [])
  job.controller.train(end_epoch, at_epoch_end + [
      controller_lib.Action(config.eval_every_steps, evaluate_between_epochs)])
  return last.get("validation")


def finalize(job: Job, validation: Optional[Dict[str, float]]) -> Dict[str, object]:
  """Evaluates on test, exports, draws the report and writes metrics.json, in that order:
  metrics.json, written last, marks the outputs complete. Returns the metrics."""
  config, outputs, task = job.config, job.outputs, job.task
  test = task.evaluate("test")
  validation = validation or task.evaluate("validation")  # Trained before, not yet exported.
  strategy = job.controller.strategy
  metrics = {
      **{f"test_{name}": value for name, value in test.items()},
      **{f"validation_{name}": value for name, value in validation.items()},
      "epochs": config.epochs,
      "global_batch_size": task.examples_per_step,
      "num_replicas": strategy.num_replicas_in_sync,
      "strategy": distribution.strategy_name(strategy),
      "precision": job.precision.policy,
      "precision_reason": job.precision.reason,
      "train_images_per_second": job.controller.throughput.overall(),
      **task.run_facts(),
      **{f"{name}_final": value for name, value in task.epoch_state().items()},
      "config": dataclasses.asdict(config),
  }
  job.check_lease()
  outputs.unmark_complete()
  with storage.writing(outputs.export, "the export"):
    task.export(outputs.export)
  if config.report:
    outputs.write_report(task, job.history, metrics)
  job.check_lease()  # The export and the report take seconds: another job may have come.
  preemption.raise_if_stopped()  # metrics.json marks the job finished: not after a stop.
  outputs.write_metrics(metrics)
  # Reported at the last epoch's end already, unless history.json lost it.
  job.report_evaluation(job.controller.step, validation)
  if outputs.chief:
    logging.info("Done: %s", outputs.results_line(metrics, task.headline))
  return metrics


def run(config: TrainConfig, strategy: tf.distribute.Strategy, make_task: TaskFactory,
        on_evaluation: Optional[OnEvaluation] = None) -> Dict[str, object]:
  """Trains, evaluates and exports the task `make_task` builds; returns the final metrics.

  Resumes from the latest checkpoint when there is one; a finished job returns its metrics
  and writes nothing. Raises `errors.UserInputError` for bad input, `errors.JobError` for a
  divergence (`controller.Diverged`), a failed write or a lost lease, `preemption.Preempted`
  after saving on SIGTERM or Ctrl-C, and `preemption.Stopped` for either while it evaluates
  and exports. `on_evaluation`: see `fit`.
  """
  with preemption.stage("starting", "nothing was trained or written; run the same command to "
                        "start") as now:
    job = prepare(config, strategy, make_task)
    try:
      if job.finished is not None:  # Run again: say where its results are, and write nothing.
        trained = job.finished["epochs"]
        logging.info("This job has already trained %s; its results: %s",
                     f"its {trained} epochs" if trained == config.epochs else
                     f"{trained} epochs (more than --epochs={config.epochs})",
                     job.outputs.results_line(job.finished, job.task.headline))
        return job.finished
      # Until the loop takes the signals over (it saves first), and after it.
      now("training", "the newest checkpoint is kept; run the same command to resume")
      validation = fit(job, on_evaluation)
      now("evaluating and exporting", "training is done and saved in its last checkpoint, "
          "metrics.json is not yet written; run the same command to finish")
      return finalize(job, validation)
    finally:
      job.close()
