"""What checkpointing costs: seconds per checkpoint, and its share of a training epoch.

    python -m benchmarks.checkpoint_cost [--dataset=mnist_sample] [--saves=20]

Trains the default model for two epochs (the second gives the steady epoch time), then
times `--saves` checkpoint saves of that trained state, the way the training loop saves
them. Prints a table and writes it to benchmarks/checkpoint_cost.json.
"""

import json
import os
import statistics
import tempfile
import time

import tensorflow as tf
from absl import app, flags

from trainer import controller, data, multitask, outputs, sources, train
from trainer.config import TrainConfig

flags.DEFINE_string("dataset", "mnist_sample", "Any --dataset the trainer takes.")
flags.DEFINE_integer("saves", 20, "How many checkpoint saves to time.")
flags.DEFINE_string("output", os.path.join(os.path.dirname(__file__), "checkpoint_cost.json"),
                    "Where to write the results.")
FLAGS = flags.FLAGS


def _directory_bytes(directory: str, prefix: str) -> int:
  return sum(os.path.getsize(os.path.join(directory, name)) for name in os.listdir(directory)
             if name.startswith(prefix))


def main(_):
  strategy = tf.distribute.get_strategy()
  splits = sources.load_splits(FLAGS.dataset)
  with tempfile.TemporaryDirectory() as model_dir:
    config = TrainConfig(dataset=FLAGS.dataset, model_dir=model_dir, epochs=2)
    train.configure_process(config, strategy)
    metrics = train.run(config, strategy, splits)
    steps_per_epoch = data.steps_per_epoch(len(splits.train), config.batch_size)
    epoch_seconds = steps_per_epoch * config.batch_size / metrics["train_images_per_second"]

    # The trained state, saved again and again as the controller would save it.
    plan = multitask.plan_batches(config, 1, splits.train)
    task = multitask.MultitaskTask(config, strategy, splits, plan, "float32")
    schedule = controller.Schedule(config.epochs * steps_per_epoch, steps_per_epoch,
                                   config.steps_per_loop or 50, config.checkpoint_every_steps,
                                   config.batch_size)
    directory = os.path.join(model_dir, "timed")
    saver = controller.Controller(strategy, task, schedule, outputs.checkpoint_dir(config),
                                  config.checkpoints_to_keep, save_dir=directory)
    saver.restore()
    manager = saver.manager
    seconds = []
    for number in range(FLAGS.saves):
      started = time.perf_counter()
      manager.save(checkpoint_number=number)
      seconds.append(time.perf_counter() - started)
    checkpoint_bytes = _directory_bytes(directory, f"ckpt-{FLAGS.saves - 1}.")

  per_checkpoint = statistics.median(seconds[1:])  # The first save also traces the saver.
  saves_per_epoch = -(-steps_per_epoch // config.checkpoint_every_steps)  # And one at its end.
  results = {
      "dataset": FLAGS.dataset,
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
  width = max(map(len, results))
  for name, value in results.items():
    print(f"{name:<{width}}  {value}")
  with tf.io.gfile.GFile(FLAGS.output, "w") as f:
    json.dump(results, f, indent=2)
    f.write("\n")


if __name__ == "__main__":
  app.run(main)
