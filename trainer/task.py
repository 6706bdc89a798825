"""Entry point: `python -m trainer.task --flag=value ...`. Defines the flags and nothing else.

Bad input the user can fix ends the job with one `error:` line and exit code 2.
"""

import sys

from absl import app
from absl import flags
from absl import logging

from trainer import cli
from trainer import config as config_lib
from trainer import preemption

FLAGS = flags.FLAGS

flags.DEFINE_string(
    "dataset", "mnist",
    "mnist (TFDS, downloaded into --data_dir), tfds:NAME (another 28x28 grey TFDS set), "
    "mnist_sample (5,000 real digits shipped with the package), idx:DIR (the four MNIST IDX "
    "files), npz:PATH (X (N, 784) uint8 and y (N,) labels).")
flags.DEFINE_string("data_dir", "", "TFDS data directory (local or gs://); TFDS's default if empty.")
flags.DEFINE_string("model_dir", config_lib.default_model_dir(),
                    "Where checkpoints, logs, the export and metrics.json go (local or gs://); "
                    "defaults to $AIP_MODEL_DIR.")
flags.DEFINE_string("checkpoint_dir", config_lib.default_checkpoint_dir(),
                    "Where checkpoints go (local or gs://); defaults to $AIP_CHECKPOINT_DIR, "
                    "else --model_dir/checkpoints.")
flags.DEFINE_enum("strategy", "auto", list(config_lib.STRATEGIES),
                  "Distribution strategy; auto picks TPU, multi-worker, mirrored or default.")
flags.DEFINE_string("tpu", "", "TPU address or name; empty or 'local' on a Cloud TPU VM.")
flags.DEFINE_enum("precision", "auto", list(config_lib.PRECISIONS),
                  "auto: mixed_bfloat16 on TPU, mixed_float16 on GPU, float32 on CPU.")
flags.DEFINE_integer("batch_size", config_lib.TrainConfig.batch_size,
                     "Global batch size, split evenly over the replicas.")
flags.DEFINE_integer("epochs", config_lib.TrainConfig.epochs, "Passes over the training split.")
flags.DEFINE_float("learning_rate", config_lib.TrainConfig.learning_rate,
                   "Peak learning rate of Adam's cosine decay to zero over the run.")
flags.DEFINE_string("loss_weights", "classifier=1.0,decoder=0.2",
                    "Weight of each task's loss in the total, as NAME=WEIGHT pairs.")
flags.DEFINE_enum("loss_weighting", config_lib.TrainConfig.loss_weighting,
                  list(config_lib.LOSS_WEIGHTINGS),
                  "fixed: --loss_weights; uncertainty: learned per-task weights (Kendall, Gal and "
                  "Cipolla, 2018), logged each epoch.")
flags.DEFINE_integer("labeled_examples", config_lib.TrainConfig.labeled_examples,
                     "Semi-supervised: the classifier learns from this many training labels "
                     "(balanced by class, chosen by --seed), the decoder from every image; "
                     "0: every label.")
flags.DEFINE_integer("steps_per_loop", config_lib.TrainConfig.steps_per_loop,
                     "Training steps run per call into the device; 0: the platform's default "
                     "(TPU 500, GPU 200, CPU 50).")
flags.DEFINE_integer("checkpoint_every_steps", config_lib.TrainConfig.checkpoint_every_steps,
                     "Save a checkpoint every this many training steps, and at each epoch's end.")
flags.DEFINE_integer("checkpoints_to_keep", config_lib.TrainConfig.checkpoints_to_keep,
                     "How many of the latest checkpoints to keep.")
flags.DEFINE_integer("eval_every_steps", config_lib.TrainConfig.eval_every_steps,
                     "Also log validation metrics every this many steps; 0: at epoch ends only.")
flags.DEFINE_bool("jit_compile", config_lib.TrainConfig.jit_compile,
                  "XLA-compile each replica's forward and backward pass (measured 2.3x slower "
                  "on CPU; try it on GPU).")
flags.DEFINE_integer("latent_dim", config_lib.TrainConfig.latent_dim,
                     "Size of the shared encoder's output.")
flags.DEFINE_integer("shift_pixels", config_lib.TrainConfig.shift_pixels,
                     "Augmentation: training images move by up to this many pixels each way "
                     "(the decoder rebuilds the moved image); 0 turns it off.")
flags.DEFINE_integer("seed", config_lib.TrainConfig.seed, "Seed for initialisation and shuffling.")
flags.DEFINE_bool("report", config_lib.TrainConfig.report,
                  "Draw the report (images and report.md) under --model_dir/report at the end.")
flags.DEFINE_bool("deterministic", config_lib.TrainConfig.deterministic,
                  "Deterministic ops (slower): the same flags give the same metrics.")




def config_from_flags() -> config_lib.TrainConfig:
  """The validated configuration the flags describe."""
  return config_lib.TrainConfig(
      dataset=FLAGS.dataset, data_dir=FLAGS.data_dir, model_dir=FLAGS.model_dir,
      checkpoint_dir=FLAGS.checkpoint_dir,
      strategy=FLAGS.strategy, tpu=FLAGS.tpu, precision=FLAGS.precision,
      batch_size=FLAGS.batch_size, epochs=FLAGS.epochs, learning_rate=FLAGS.learning_rate,
      loss_weights=config_lib.parse_loss_weights(FLAGS.loss_weights),
      loss_weighting=FLAGS.loss_weighting, labeled_examples=FLAGS.labeled_examples,
      steps_per_loop=FLAGS.steps_per_loop, checkpoint_every_steps=FLAGS.checkpoint_every_steps,
      checkpoints_to_keep=FLAGS.checkpoints_to_keep, eval_every_steps=FLAGS.eval_every_steps,
      jit_compile=FLAGS.jit_compile, latent_dim=FLAGS.latent_dim,
      shift_pixels=FLAGS.shift_pixels, seed=FLAGS.seed, deterministic=FLAGS.deterministic,
      report=FLAGS.report)


def main(argv):
  if len(argv) > 1:
    cli.fail(f"unexpected arguments {' '.join(argv[1:])}: every setting is a --flag=value")
  try:
    config = config_from_flags()
  except config_lib.UserInputError as e:
    cli.fail(str(e))
  # TensorFlow is imported only now: the strategy must be the first thing it sets up.
  from trainer import distribution, train
  try:
    strategy = distribution.get_strategy(config.strategy, config.tpu)
    train.run(config, strategy)
  except config_lib.UserInputError as e:
    logging.error("%s", e)
    cli.fail(str(e))
  except preemption.Preempted as e:
    print(f"preempted: {e}; run the same command to resume", file=sys.stderr)
    sys.exit(preemption.PREEMPTED_EXIT_CODE)
  except distribution.PEER_FAILURES as e:
    if distribution.cluster_workers() < 2:
      raise
    cli.fail(f"lost contact with another worker ({distribution.describe_op_error(e)}); restart "
          "every worker with the same command to resume from the latest checkpoint", exit_code=1)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
