"""A stand-in task for the job (`trainer.job.train.Task`): four weights fitted to a line, no model.

The job's tests train it through the whole job (checkpoints, a stop and a resume, evaluation,
export, metrics.json and history), so that the job is tested apart from the multitask problem
and in seconds. Its metric, `distance`, is made up: the mean absolute error of its fit. Its
state after N steps depends on the order of the steps it saw, so an exact resume shows in its
numbers.

    python -m tests.stand_in_task MODEL_DIR [SECONDS_PER_STEP]

runs the job on it as a process (a test kills that with SIGKILL and runs it again).
"""

import json
import os
import sys
import time
from typing import Dict, List, Optional

import numpy as np
import tensorflow as tf

# y = x . TRUE_WEIGHTS, for the inputs x of each step and split.
TRUE_WEIGHTS = np.array([0.5, -1.0, 2.0, 0.25], np.float32)
BATCH = 8
LEARNING_RATE = 0.2
EXPORT_FILE = "weights.json"  # The stand-in's whole export.


def _inputs(seed: int, rows: int) -> np.ndarray:
  return np.random.default_rng(seed).normal(size=(rows, 4)).astype(np.float32)


class StandInTask:
  """Fits `weights` to TRUE_WEIGHTS by plain gradient descent on the squared error, a batch of
  BATCH rows a step (step i's rows come from seed i, whatever the call it falls in)."""
  train_outputs = ("loss", "absolute_error", "examples", "nonfinite_weights")
  headline = ("distance",)

  def __init__(self, config, strategy: tf.distribute.Strategy, policy: str,
               steps_per_epoch: int = 6, seconds_per_step: float = 0.0):
    del policy  # Its weights stay float32 whatever the policy.
    self.config, self.strategy = config, strategy
    self.steps_per_epoch, self.examples_per_step = steps_per_epoch, BATCH
    self.seconds_per_step = seconds_per_step
    with strategy.scope():
      self.weights = tf.Variable(tf.zeros([4]), name="weights")
    self.exports: List[str] = []

  def checkpoint_items(self) -> Dict[str, tf.Module]:
    return {"stand_in": tf.train.Checkpoint(weights=self.weights)}

  def train_dataset(self, start_step: int):
    def batch(step):
      x = tf.numpy_function(lambda s: _inputs(int(s), BATCH), [step], tf.float32)
      x = tf.ensure_shape(x, [BATCH, 4])
      return x, tf.linalg.matvec(x, TRUE_WEIGHTS)
    return self.strategy.experimental_distribute_dataset(
        tf.data.Dataset.range(start_step, 10 ** 9).map(batch))

  def train_step(self, inputs) -> Dict[str, tf.Tensor]:
    x, y = inputs
    if self.seconds_per_step:  # Slow enough for a test to kill it mid-run.
      tf.numpy_function(lambda: time.sleep(self.seconds_per_step) or np.float32(0), [],
                        tf.float32)
    error = tf.linalg.matvec(x, self.weights) - y
    self.weights.assign_sub(LEARNING_RATE * tf.linalg.matvec(x, error, transpose_a=True) / BATCH)
    return {"loss": tf.reduce_mean(tf.square(error)),
            "absolute_error": tf.reduce_sum(tf.abs(error)), "examples": float(BATCH),
            "nonfinite_weights": 1.0 - tf.cast(tf.reduce_all(tf.math.is_finite(self.weights)),
                                               tf.float32)}

  def train_logs(self, sums: Dict[str, float], steps: int) -> Dict[str, float]:
    return {"loss": sums["loss"] / steps, "distance": sums["absolute_error"] / sums["examples"]}

  def summaries(self) -> Dict[str, float]:
    return {"weights_norm": float(tf.norm(self.weights).numpy())}

  def evaluate(self, split: str) -> Dict[str, float]:
    x = _inputs({"validation": -1, "test": -2}[split] % 1000 + 10 ** 6, 64)
    error = x @ self.weights.numpy() - x @ TRUE_WEIGHTS
    return {"distance": float(np.mean(np.abs(error))),
            "largest_miss": float(np.max(np.abs(error)))}

  def epoch_state(self) -> Dict[str, Dict[str, float]]:
    return {"first_weight": {"value": float(self.weights.numpy()[0])}}

  def learning_rate(self, step: int, total_steps: int) -> float:
    return LEARNING_RATE

  def export(self, path: str) -> None:
    tf.io.gfile.makedirs(path)
    with tf.io.gfile.GFile(os.path.join(path, EXPORT_FILE), "w") as f:
      json.dump(self.weights.numpy().tolist(), f)
    self.exports.append(path)

  def export_problem(self, path: str) -> Optional[str]:
    whole = tf.io.gfile.exists(os.path.join(path, EXPORT_FILE))
    return None if whole else f"{path}/{EXPORT_FILE} is missing"

  def run_facts(self) -> Dict[str, object]:
    return {"stand_in": "four weights fitted to a line"}

  def write_report(self, export_dir, history, metrics, report_dir, summary_writer) -> None:
    tf.io.gfile.makedirs(report_dir)
    with tf.io.gfile.GFile(os.path.join(report_dir, "stand_in.txt"), "w") as f:
      f.write(f"distance {metrics['test_distance']:.4f} after {len(history)} epochs\n")


def config(model_dir: str, **changes):
  """A configuration the job runs the stand-in with: 3 epochs of 6 steps, a checkpoint every
  4 steps, calls of 2 steps."""
  from trainer.config import TrainConfig
  settings = dict(model_dir=model_dir, epochs=3, steps_per_loop=2, checkpoint_every_steps=4,
                  checkpoints_to_keep=20, report=True)
  return TrainConfig(**{**settings, **changes})


def factory(**options):
  """A `train.TaskFactory` of the stand-in; `options` go to its constructor."""
  return lambda config, strategy, policy: StandInTask(config, strategy, policy, **options)


def main(argv: List[str]) -> None:
  from absl import logging
  from trainer.job import train
  logging.set_verbosity(logging.INFO)  # As trainer.task logs: "Resuming from ...".
  seconds_per_step = float(argv[2]) if len(argv) > 2 else 0.0
  settings = config(argv[1])
  strategy = tf.distribute.get_strategy()
  train.configure_process(settings, strategy)
  metrics = train.run(settings, strategy, factory(seconds_per_step=seconds_per_step))
  print(json.dumps({"test_distance": metrics["test_distance"]}))


if __name__ == "__main__":
  main(sys.argv)
