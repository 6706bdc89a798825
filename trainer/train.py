"""The job: the multitask task (`trainer.multitask`) trained by the controller
(`trainer.controller`), with the run directory's outputs (`trainer.outputs`).

Keras 3.15's `model.fit` fails under MultiWorkerMirroredStrategy, so the package owns its loop,
as the Model Garden's trainers do. `run` reads in three stages: `prepare` (checks, builds,
restores), `fit`, `finalize` (test, export, report, metrics.json).
"""

import dataclasses
import os
from typing import Callable, Dict, List, Optional

import keras
import tensorflow as tf
from absl import logging

from trainer import errors
from trainer import config as config_lib
from trainer import controller as controller_lib
from trainer import distribution
from trainer import lease as lease_lib
from trainer import multitask
from trainer import outputs as outputs_lib
from trainer import preemption
from trainer import progress
from trainer import sources
from trainer import storage
from trainer import tuning
from trainer.config import TrainConfig

Evaluate = Callable[[str], Dict[str, float]]
OnEvaluation = Callable[[int, Evaluate], None]
default_model = multitask.default_model
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
  task: multitask.MultitaskTask
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


def prepare(config: TrainConfig, strategy: tf.distribute.Strategy,
            splits: Optional[sources.Splits] = None,
            model_fn: Callable[[TrainConfig], keras.Model] = default_model) -> Job:
  """Checks the data and the outputs, takes the run directory's lease (chief), checks the
  run's saved settings, in that order and before anything is written; builds the task and the
  controller, and restores the newest checkpoint that reads back whole. Call `close()` on the
  job it returns (`run` does)."""
  precision = _checked_precision(config, strategy)
  # Only a single worker may cap its calls by its own measured speed (see Schedule), and a
  # TPU's calls are short and costly to retrace; a given --steps_per_loop is taken as given.
  cap_calls = (not config.steps_per_loop and
               distribution.strategy_name(strategy) in ("default", "mirrored", "one_device"))
  if not config.steps_per_loop:
    config = dataclasses.replace(config,
                                 steps_per_loop=distribution.default_steps_per_loop(strategy))
  splits = splits or sources.load_splits(config.dataset, config.data_dir)
  plan = multitask.plan_batches(config, strategy.num_replicas_in_sync, splits.train)
  outputs = outputs_lib.RunOutputs(config, is_chief(strategy))
  # One job per run directory; the chief's lease stands for every worker of a cluster.
  created = outputs.chief and not tf.io.gfile.exists(config.model_dir)
  lease = lease_lib.Lease.acquire(config.model_dir) if outputs.chief else None
  try:
    # A restart that would change what the run computes is refused before the checkpoint is
    # read: its own error would name a symptom, not the change.
    saved = outputs.read_config()
    for change in config_lib.resume_changes(saved, config) if saved else []:
      logging.info("Changed since this run was last started: %s", change)
    if saved and outputs_lib.saved_precision(saved) not in (None, precision.policy):
      # `auto` resolves on each start: a run resumed on another CPU may compute otherwise.
      logging.info("Changed since this run was last started: precision %s -> %s (%s)",
                   outputs_lib.saved_precision(saved), precision.policy, precision.reason)
    task = multitask.MultitaskTask(config, strategy, splits, plan, precision.policy, model_fn)
    schedule = controller_lib.Schedule(
        total_steps=config.epochs * plan.steps_per_epoch, steps_per_epoch=plan.steps_per_epoch,
        steps_per_loop=config.steps_per_loop,
        checkpoint_every_steps=config.checkpoint_every_steps,
        examples_per_step=plan.global_batch,
        max_call_seconds=(0.0 if not cap_calls else BAR_CALL_SECONDS
                          if outputs.chief and progress.on_terminal() else MAX_CALL_SECONDS))
    controller = controller_lib.Controller(
        strategy, task, schedule, outputs_lib.checkpoint_dir(config),
        config.checkpoints_to_keep, save_dir=outputs.checkpoints, summary_dir=outputs.train_logs,
        show_progress=outputs.chief, before_save=lease.check if lease else None,
        after_first_save=lambda: outputs.write_config(config, precision.policy))
    job = Job(config, precision, outputs, task, controller, history=[], lease=lease,
              created_model_dir=created)
    job.finished = outputs.finished_metrics(config.epochs)
    export_problem = job.finished is not None and outputs.export_problem()
    if export_problem:
      logging.warning("%s says this run has finished, but %s; exporting it again from its last "
                      "checkpoint.", outputs.metrics_path, export_problem)
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
    old_dir = (saved or {}).get("checkpoint_dir") or os.path.join(config.model_dir, "checkpoints")
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
  steps_per_epoch = job.task.plan.steps_per_epoch
  if latest and saved and saved["epochs"] < config.epochs:
    _log_extension(config, saved["epochs"], controller.step, steps_per_epoch)
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
  steps_per_epoch = job.task.plan.steps_per_epoch
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


def _log_extension(config: TrainConfig, old_epochs: int, step: int, steps_per_epoch: int) -> None:
  """Says that a larger --epochs stretches the learning-rate schedule, and what that does to
  the rate where training resumes: it rises again where the old run had decayed it."""
  old_total, new_total = old_epochs * steps_per_epoch, config.epochs * steps_per_epoch
  rate = {total: float(multitask.learning_rate_schedule(config, total)(step))
          for total in (old_total, new_total)}
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
  config, task, steps_per_epoch = job.config, job.task, job.task.plan.steps_per_epoch
  last = {}

  def end_epoch(step: int, train_logs: Dict[str, float], images_per_second) -> None:
    validation = last["validation"] = task.evaluate("validation")
    entry = {"epoch": step // steps_per_epoch, "train": train_logs, "validation": validation,
             "loss_weights": task.weighting.weights()}
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
    logging.info("step %d: validation accuracy %.4f, reconstruction_mse %.4f", step,
                 metrics["accuracy"], metrics["reconstruction_mse"])
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
  metrics = {
      "test_accuracy": test["accuracy"],
      "test_reconstruction_mse": test["reconstruction_mse"],
      "test_classifier_loss": test["classifier_loss"],
      "validation_accuracy": validation["accuracy"],
      "validation_reconstruction_mse": validation["reconstruction_mse"],
      "epochs": config.epochs,
      "global_batch_size": task.plan.global_batch,
      "num_replicas": task.strategy.num_replicas_in_sync,
      "strategy": distribution.strategy_name(task.strategy),
      "precision": job.precision.policy,
      "precision_reason": job.precision.reason,
      "train_images_per_second": job.controller.throughput.overall(),
      "dataset": config.dataset,
      # What the model was trained on, for trainer.predict: its class names, and whether its
      # images' background is dark or light (predict inverts images whose background is not).
      "class_names": list(task.splits.class_names),
      "input_background": sources.background(task.splits.train.images),
      "train_examples": len(task.splits.train),
      "labeled_examples": (len(task.splits.train) if task.plan.labeled is None
                           else len(task.plan.labeled)),
      "loss_weights_final": task.weighting.weights(),
      "config": dataclasses.asdict(config),
  }
  job.check_lease()
  outputs.unmark_complete()
  with storage.writing(outputs.export, "the export"):
    task.export(outputs.export)
  if config.report:
    outputs.write_report(task.splits.test, job.history, metrics)
  job.check_lease()  # The export and the report take seconds: another job may have come.
  outputs.write_metrics(metrics)
  # Reported at the last epoch's end already, unless history.json lost it.
  job.report_evaluation(job.controller.step, validation)
  if outputs.chief:
    logging.info("Done: %s", outputs_lib.results_line(metrics, config.model_dir))
  return metrics


def run(config: TrainConfig, strategy: tf.distribute.Strategy,
        splits: Optional[sources.Splits] = None,
        on_evaluation: Optional[OnEvaluation] = None,
        model_fn: Callable[[TrainConfig], keras.Model] = default_model) -> Dict[str, object]:
  """Trains, evaluates and exports the multitask model; returns the final metrics.

  `splits` defaults to the source `config.dataset` names; tests and notebooks may pass their
  own. Resumes from the latest checkpoint when there is one; a finished job returns its
  metrics and writes nothing. Raises `UserInputError` for bad input and divergence
  (`controller.Diverged`), `preemption.Preempted` after saving on SIGTERM or Ctrl-C, and
  `preemption.Stopped` for either while it evaluates and exports.
  `on_evaluation`: see `fit`. `model_fn(config)` builds the model (benchmarks/levers.py
  passes variants of the default).
  """
  with preemption.stage("starting", "nothing was trained or written; run the same command to "
                        "start") as now:
    job = prepare(config, strategy, splits, model_fn)
    try:
      if job.finished is not None:  # Run again: say where its results are, and write nothing.
        trained = job.finished["epochs"]
        logging.info("This job has already trained %s; its results: %s",
                     f"its {trained} epochs" if trained == config.epochs else
                     f"{trained} epochs (more than --epochs={config.epochs})",
                     outputs_lib.results_line(job.finished, config.model_dir))
        return job.finished
      # Until the loop takes the signals over (it saves first), and after it.
      now("training", "the newest checkpoint is kept; run the same command to resume")
      validation = fit(job, on_evaluation)
      now("evaluating and exporting", "training is done and saved in its last checkpoint, "
          "metrics.json is not yet written; run the same command to finish")
      return finalize(job, validation)
    finally:
      job.close()
