"""Entry point: `python -m trainer.task --flag=value ...`: the flags, and process-wide settings.

Bad input the user can fix ends the job with one `error:` line and exit code 2, found
before TensorFlow is imported wherever it can be (importing it takes seconds).
"""

import functools
import os
import sys

from absl import app
from absl import flags

from trainer import cli, errors
from trainer import config as config_lib
from trainer.job import preemption

FLAGS = flags.FLAGS


def _define_flags() -> None:
  """Defines one flag per field of TrainConfig, of the same name, with the field's default (or
  its environment variable's value, read now), help text and choices.

  They are made in trainer.cli: the launchers check the arguments they pass here against the
  same flags (cli.check_trainer_arguments) without importing this module.
  """
  for flag in cli.trainer_flags(os.environ):
    flags.DEFINE_flag(flag)  # Defined from here, so that absl counts them as this module's.


_define_flags()

DESCRIPTION = """\
Trains a multitask model on 28x28 greyscale digits (or any such images): one encoder shared
by a classifier and a decoder that rebuilds the image. Writes checkpoints, TensorBoard logs,
metrics.json, a SavedModel export and a report under --model_dir; runs the same on a laptop,
several GPUs, several workers or a TPU, and resumes from its latest checkpoint when run again.

usage: python -m trainer.task --dataset=mnist_sample --model_dir=DIR [--flag=value ...]
"""

# The sections of --help, each setting in the group its field names.
FLAG_GROUPS = config_lib.settings_by_group()

parse_flags = functools.partial(cli.parse_flags, description=DESCRIPTION, groups=FLAG_GROUPS)


def config_from_flags() -> config_lib.TrainConfig:
  """The validated configuration the flags describe: one flag per field, of the same name."""
  return cli.trainer_config(FLAGS)


def main(argv):
  try:
    cli.refuse_positional_arguments(argv[1:])
    config = config_from_flags()
  except errors.UserInputError as e:
    cli.fail(str(e))
  try:
    with preemption.stage("starting", "nothing was trained or written; run the same command to "
                          "start"):
      # TensorFlow is imported only now: the strategy must be the first thing it sets up.
      # A stop raises inside the import, not seconds later at its end.
      with cli.tensorflow_imported_quietly(config.verbose, float16_op=False), \
          preemption.anywhere():
        from trainer.job import distribution, train
        from trainer.multitask import problem
      strategy = distribution.get_strategy(config.strategy, config.tpu)
      precision = train.configure_process(config, strategy)  # Process-wide: here, once.
      if precision.policy == "mixed_float16":
        cli.float16_op_run_quietly(config.verbose)  # Else oneDNN's note comes unfiltered.
      # Inside: its own stages nest, with no moment uncovered.
      train.run(config, strategy, problem.make_task)
  except errors.JobError as e:
    cli.fail(str(e))
  except preemption.Preempted as e:
    print(f"{e.verb}: {e}; run the same command to resume", file=sys.stderr)
    sys.exit(e.exit_code)
  except preemption.Stopped as e:
    _say_stopped(e)
  except Exception as e:  # pylint: disable=broad-except
    if preemption.stop_behind(e):  # A stop inside an import: said as the stop it is.
      _say_stopped(preemption.stop_behind(e))
    _fail_on_known_faults(e, config)
    raise


def _say_stopped(stop: preemption.Stopped) -> None:
  print(f"{stop.verb}: {stop}", file=sys.stderr)
  sys.exit(stop.exit_code)


def _fail_on_known_faults(error: Exception, config: config_lib.TrainConfig) -> None:
  """Ends the job with one line for a failure that is the environment's, not a bug: storage
  that stopped taking writes where no narrower handler named the file, a lost worker."""
  from trainer.job import distribution# Imported by now.
  from trainer.job import storage
  cause = storage.describe_write_error(error)
  if cause:
    cli.fail(f"could not write the run's outputs under --model_dir={config.model_dir}: {cause}; "
             "what was saved before is intact: free space or make it writable, then run the same "
             "command to resume")
  if isinstance(error, distribution.PEER_FAILURES) and distribution.cluster_workers() >= 2:
    cli.fail(f"lost contact with another worker ({distribution.describe_op_error(error)}); "
             "restart every worker with the same command to resume from the latest checkpoint",
             exit_code=1)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
