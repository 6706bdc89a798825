"""Entry point: `python -m trainer.task --flag=value ...`: the flags, and process-wide settings.

Bad input the user can fix ends the job with one `error:` line and exit code 2, found
before TensorFlow is imported wherever it can be (importing it takes seconds).
"""

import dataclasses
import functools
import os
import sys

from absl import app
from absl import flags

from trainer import cli
from trainer import config as config_lib
from trainer import preemption

FLAGS = flags.FLAGS

DEFAULTS = config_lib.TrainConfig  # Every default lives there.

flags.DEFINE_string(
    "dataset", DEFAULTS.dataset,
    "mnist (TFDS, downloaded into --data_dir), tfds:NAME (another 28x28 grey TFDS set), "
    "mnist_sample (5,000 real digits shipped with the package), idx:DIR (the four MNIST IDX "
    "files), npz:PATH (X (N, 784) uint8 and y (N,) labels).")
flags.DEFINE_string("data_dir", DEFAULTS.data_dir,
                    "TFDS data directory (local or gs://); TFDS's default if empty.")
flags.DEFINE_string("model_dir", config_lib.default_model_dir(),
                    "Where checkpoints, logs, the export and metrics.json go (local or gs://); "
                    "defaults to $AIP_MODEL_DIR.")
flags.DEFINE_string("checkpoint_dir", config_lib.default_checkpoint_dir(),
                    "Where checkpoints go (local or gs://); defaults to $AIP_CHECKPOINT_DIR, "
                    "else --model_dir/checkpoints.")
flags.DEFINE_string("tensorboard_dir", config_lib.default_tensorboard_dir(),
                    "Where TensorBoard logs go (local or gs://); defaults to "
                    "$AIP_TENSORBOARD_LOG_DIR, else --model_dir/logs.")
flags.DEFINE_enum("strategy", DEFAULTS.strategy, list(config_lib.STRATEGIES),
                  "Distribution strategy; auto picks TPU, multi-worker, mirrored or default.")
flags.DEFINE_string("tpu", DEFAULTS.tpu,
                    "TPU address or name; empty or 'local' on a Cloud TPU VM.")
flags.DEFINE_enum("precision", DEFAULTS.precision, list(config_lib.PRECISIONS),
                  "auto: mixed_bfloat16 on TPU, mixed_float16 on GPU, float32 on CPU.")
flags.DEFINE_integer("batch_size", DEFAULTS.batch_size,
                     "Global batch size, split evenly over the replicas.")
flags.DEFINE_integer("epochs", DEFAULTS.epochs, "Passes over the training split.")
flags.DEFINE_float("learning_rate", DEFAULTS.learning_rate,
                   "Peak learning rate of AdamW, reached after --warmup_steps, then cosine "
                   "decay to zero at the run's end.")
flags.DEFINE_integer("warmup_steps", DEFAULTS.warmup_steps,
                     "Steps of linear learning-rate warm-up from zero to --learning_rate (at "
                     "most a fifth of the run's steps).")
flags.DEFINE_float("weight_decay", DEFAULTS.weight_decay,
                   "AdamW's decoupled weight decay (per unit learning rate).")
flags.DEFINE_string("loss_weights",
                    config_lib.format_loss_weights(config_lib.DEFAULT_LOSS_WEIGHTS),
                    "Weight of each task's loss in the total, as NAME=WEIGHT pairs.")
flags.DEFINE_enum("loss_weighting", DEFAULTS.loss_weighting,
                  list(config_lib.LOSS_WEIGHTINGS),
                  "fixed: --loss_weights; uncertainty: learned per-task weights (Kendall, Gal and "
                  "Cipolla, 2018), logged each epoch.")
flags.DEFINE_integer("labeled_examples", DEFAULTS.labeled_examples,
                     "Semi-supervised: the classifier learns from this many training labels "
                     "(balanced by class, chosen by --seed), the decoder from every image; "
                     "0: every label.")
flags.DEFINE_float("input_noise", DEFAULTS.input_noise,
                   "Denoising: Gaussian noise of this standard deviation (pixels scaled to "
                   "[0, 1]) on the encoder's training input; the decoder rebuilds the clean "
                   "image. 0: none.")
flags.DEFINE_enum("unlabeled_loss", DEFAULTS.unlabeled_loss, list(config_lib.UNLABELED_LOSSES),
                  "Semi-supervised: what the classifier learns from unlabelled images. "
                  "pseudo_label: its confident answers on each image become labels for a "
                  "strongly augmented copy (FixMatch); consistency: its answers on two "
                  "augmented copies must agree. Needs --labeled_examples.")
flags.DEFINE_float("unlabeled_weight", DEFAULTS.unlabeled_weight,
                   "Weight of --unlabeled_loss in the total loss.")
flags.DEFINE_float("pseudo_label_threshold", DEFAULTS.pseudo_label_threshold,
                   "pseudo_label: the probability an answer needs to become a label.")
flags.DEFINE_integer("steps_per_loop", DEFAULTS.steps_per_loop,
                     "Training steps run per call into the device; 0: the platform's default "
                     "(TPU 500, GPU 200, CPU 50).")
flags.DEFINE_integer("checkpoint_every_steps", DEFAULTS.checkpoint_every_steps,
                     "Save a checkpoint every this many training steps, and at each epoch's end.")
flags.DEFINE_integer("checkpoints_to_keep", DEFAULTS.checkpoints_to_keep,
                     "How many of the latest checkpoints to keep.")
flags.DEFINE_integer("eval_every_steps", DEFAULTS.eval_every_steps,
                     "Also log validation metrics every this many steps; 0: at epoch ends only.")
flags.DEFINE_bool("jit_compile", DEFAULTS.jit_compile,
                  "XLA-compile each replica's forward and backward pass (measured 2.3x slower "
                  "on CPU; try it on GPU).")
flags.DEFINE_integer("latent_dim", DEFAULTS.latent_dim,
                     "Size of the shared encoder's output.")
flags.DEFINE_integer("width", DEFAULTS.width,
                     "Channels of the first convolution, doubled at each coarser resolution "
                     "(the decoder mirrors them); smaller is cheaper.")
flags.DEFINE_integer("shift_pixels", DEFAULTS.shift_pixels,
                     "Augmentation: training images move by up to this many pixels each way "
                     "(the decoder rebuilds the moved image); 0 turns it off.")
flags.DEFINE_integer("seed", DEFAULTS.seed, "Seed for initialisation and shuffling.")
flags.DEFINE_bool("report", DEFAULTS.report,
                  "Draw the report (images and report.md) under --model_dir/report at the end.")
flags.DEFINE_bool("deterministic", DEFAULTS.deterministic,
                  "Deterministic ops (slower): the same flags give the same metrics.")
flags.DEFINE_bool("verbose", False,
                  "Also log TensorFlow's own start-up and saving messages (its C++ INFO and "
                  "WARNING lines, unless $TF_CPP_MIN_LOG_LEVEL says otherwise).")

DESCRIPTION = """\
Trains a multitask model on 28x28 greyscale digits (or any such images): one encoder shared
by a classifier and a decoder that rebuilds the image. Writes checkpoints, TensorBoard logs,
metrics.json, a SavedModel export and a report under --model_dir; runs the same on a laptop,
several GPUs, several workers or a TPU, and resumes from its latest checkpoint when run again.

usage: python -m trainer.task --dataset=mnist_sample --model_dir=DIR [--flag=value ...]
"""

# The sections of --help; every flag this module defines is in exactly one.
FLAG_GROUPS = {
    "data": ("dataset", "data_dir", "labeled_examples", "shift_pixels"),
    "semi-supervised": ("input_noise", "unlabeled_loss", "unlabeled_weight",
                        "pseudo_label_threshold"),
    "distribution": ("strategy", "tpu", "precision", "steps_per_loop", "jit_compile"),
    "training": ("epochs", "batch_size", "learning_rate", "warmup_steps", "weight_decay",
                 "loss_weights", "loss_weighting", "latent_dim", "width", "seed",
                 "eval_every_steps"),
    "outputs": ("model_dir", "tensorboard_dir", "report", "verbose"),
    "faults (checkpoints, resuming, reproducing)": (
        "checkpoint_dir", "checkpoint_every_steps", "checkpoints_to_keep", "deterministic"),
}

parse_flags = functools.partial(cli.parse_flags, description=DESCRIPTION, groups=FLAG_GROUPS)


def config_from_flags() -> config_lib.TrainConfig:
  """The validated configuration the flags describe: one flag per field, of the same name."""
  values = {field.name: FLAGS[field.name].value
            for field in dataclasses.fields(config_lib.TrainConfig)}
  values["loss_weights"] = config_lib.parse_loss_weights(values["loss_weights"])
  return config_lib.TrainConfig(**values)


def quiet_tensorflow(verbose: bool) -> int:
  """Keeps TensorFlow's chatter off the log unless `verbose`; call before importing it.

  Sets $TF_CPP_MIN_LOG_LEVEL to 2 (errors only) unless the user set it, and drops the
  INFO lines TensorFlow's and TFDS's Python code logs (saver notes: "Assets written to",
  "Sharding callback duration"; TFDS's "Constructing tf.data.Dataset"). Our own INFO lines
  (the epochs) still show. Returns the C++ log level in force, for
  `cli.cpp_startup_log_filtered`.
  """
  if not verbose:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    for library in ("tensorflow", "tensorflow_datasets"):
      cli.quiet_library_info(library)
  try:
    return int(os.environ.get("TF_CPP_MIN_LOG_LEVEL", "0"))
  except ValueError:
    return 0


def main(argv):
  if len(argv) > 1:
    cli.fail(f"unexpected arguments {' '.join(argv[1:])}: every setting is a --flag=value")
  try:
    config = config_from_flags()
  except config_lib.UserInputError as e:
    cli.fail(str(e))
  min_log_level = quiet_tensorflow(FLAGS.verbose)
  # TensorFlow is imported only now: the strategy must be the first thing it sets up.
  with cli.cpp_startup_log_filtered(min_log_level):
    from trainer import distribution, train
  try:
    strategy = distribution.get_strategy(config.strategy, config.tpu)
    train.configure_process(config, strategy)  # Process-wide settings: here, once.
    train.run(config, strategy)
  except config_lib.UserInputError as e:
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
  app.run(main, flags_parser=parse_flags)
