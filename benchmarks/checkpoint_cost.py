"""What checkpointing costs: seconds per checkpoint, and its share of a training epoch.

    python -m benchmarks.checkpoint_cost [--dataset=mnist_sample] [--saves=20]
        [--precision=auto]

Trains the default model for two epochs (the second gives the steady epoch time), then
times `--saves` checkpoint saves of that trained state, the way the training loop saves
them. Both under --precision's policy (set once, through train.configure_process; the
resolved policy and its reason are recorded). Prints a table and writes it to
benchmarks/checkpoint_cost.json.
"""

import functools
import json
import os
import statistics
import tempfile
import time
from typing import List, Tuple

import tensorflow as tf
from absl import app, flags

from benchmarks import precision as precision_lib
from trainer.config import PRECISIONS, TrainConfig
from trainer.data import pipeline, sources
from trainer.job import controller, train
from trainer.multitask import problem

FLAGS = flags.FLAGS


def _define_flags() -> None:
  """Defined only when run as a program, so that tests may import this module alongside
  trainer.task (whose --dataset is defined on import)."""
  flags.DEFINE_string("dataset", "mnist_sample", "Any --dataset the trainer takes.")
  flags.DEFINE_integer("saves", 20, "How many checkpoint saves to time.")
  flags.DEFINE_enum("precision", "auto", PRECISIONS, precision_lib.FLAG_HELP)
  flags.DEFINE_string("output", os.path.join(os.path.dirname(__file__), "checkpoint_cost.json"),
                      "Where to write the results.")


def _directory_bytes(directory: str, prefix: str) -> int:
  return sum(os.path.getsize(os.path.join(directory, name)) for name in os.listdir(directory)
             if name.startswith(prefix))


def timed_saves(config: TrainConfig, splits, policy: str, saves: int
                ) -> Tuple[problem.MultitaskTask, List[float], int]:
  """Builds the task under `policy` (already in force), restores the latest checkpoint in
  `config.model_dir` (none: the fresh state), and saves it `saves` times as the controller
  saves it, into model_dir/timed; the task, each save's seconds and the last one's bytes."""
  strategy = tf.distribute.get_strategy()
  task = problem.make_task(config, strategy, policy, splits)
  directory = os.path.join(config.model_dir, "timed")
  saver = controller.Controller(strategy, task, train.make_schedule(config, task, strategy),
                                train.run_directory_of(config).checkpoints,
                                config.checkpoints_to_keep, save_dir=directory)
  saver.restore()
  manager = saver.manager
  seconds = []
  for number in range(saves):
    started = time.perf_counter()
    manager.save(checkpoint_number=number)
    seconds.append(time.perf_counter() - started)
  return task, seconds, _directory_bytes(directory, f"ckpt-{saves - 1}.")


def checkpoint_cost(config: TrainConfig, splits, saves: int) -> dict:
  """Trains `config` (in its model_dir) under its precision's policy, then times `saves`
  checkpoint saves of the trained state as the controller saves them; the figures."""
  strategy = tf.distribute.get_strategy()
  resolved = precision_lib.configure(config, strategy)  # Once, before anything is built.
  metrics = train.run(config, strategy, functools.partial(problem.make_task, splits=splits))
  steps_per_epoch = pipeline.steps_per_epoch(len(splits.train), config.batch_size)
  epoch_seconds = steps_per_epoch * config.batch_size / metrics["train_images_per_second"]
  # The trained state, saved again and again as the controller would save it.
  task, seconds, checkpoint_bytes = timed_saves(config, splits, resolved.policy, saves)

  # The first save also traces the saver (a single save: it is all there is).
  per_checkpoint = statistics.median(seconds[1:] or seconds)
  saves_per_epoch = -(-steps_per_epoch // config.checkpoint_every_steps)  # And one at its end.
  return {
      "dataset": config.dataset,
      "precision": resolved.policy,
      "precision_reason": resolved.reason,
      "precision_flag": config.precision,
      "compute_dtype": task.model.compute_dtype,
      "steps_per_epoch": steps_per_epoch,
      "epoch_seconds": round(epoch_seconds, 3),
      "seconds_per_checkpoint_median": round(per_checkpoint, 4),
      "seconds_first_checkpoint": round(seconds[0], 4),
      "checkpoint_megabytes": round(checkpoint_bytes / 2**20, 2),
      "default_checkpoint_every_steps": config.checkpoint_every_steps,
      "checkpoints_per_epoch_by_default": saves_per_epoch,
      "share_of_epoch_by_default": round(saves_per_epoch * per_checkpoint / epoch_seconds, 4),
      "share_of_epoch_per_checkpoint": round(per_checkpoint / epoch_seconds, 4),
  }


def main(_):
  splits = sources.load_splits(FLAGS.dataset)
  with tempfile.TemporaryDirectory() as model_dir:
    config = TrainConfig(dataset=FLAGS.dataset, model_dir=model_dir, epochs=2,
                         precision=FLAGS.precision)
    results = checkpoint_cost(config, splits, FLAGS.saves)
  width = max(map(len, results))
  for name, value in results.items():
    print(f"{name:<{width}}  {value}")
  with tf.io.gfile.GFile(FLAGS.output, "w") as f:
    json.dump(results, f, indent=2)
    f.write("\n")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
