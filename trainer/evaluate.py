"""Re-evaluates a finished job's export on a split of a dataset, and prints its metrics as JSON.

usage: python -m trainer.evaluate --model_dir=DIR [--dataset=...] [--data_dir=...] [--split=test]

The export (DIR/export) is evaluated on the run's own dataset and data directory (from
DIR/config.json) unless --dataset or --data_dir say otherwise; the metrics have the same
definitions as the job's metrics.json, so on the job's own test split they agree. Bad input ends
with one `error:` line and exit code 2.
"""

import functools
import json
import os

from absl import app
from absl import flags

from trainer import cli, errors
from trainer import config as config_lib
from trainer.job import run_directory

FLAGS = flags.FLAGS

flags.DEFINE_string("model_dir", config_lib.default_model_dir(),
                    "A finished training job's --model_dir (local or gs://); its export is read.")
flags.DEFINE_string("dataset", "", "Any source trainer.task takes (see its --dataset); default "
                    "the run's own, from --model_dir/config.json.")
flags.DEFINE_string("data_dir", "", "TFDS data directory; default the run's own (TFDS's default "
                    "if it had none).")
flags.DEFINE_enum("split", "test", ["train", "validation", "test"], "Which split to evaluate.")

parse_flags = functools.partial(cli.parse_flags, description=__doc__, groups={
    "flags": ("model_dir", "dataset", "data_dir", "split")})


def run_dataset(model_dir: str):
  """(dataset, data_dir) to evaluate on: the flags where given, else the run's own."""
  from trainer.job import outputs# pylint: disable=import-outside-toplevel  (imports TensorFlow)
  dataset, data_dir = FLAGS.dataset, FLAGS.data_dir
  if dataset and FLAGS["data_dir"].present:
    return dataset, data_dir
  saved = outputs.read_saved_config(model_dir, "restore it, or pass --dataset and --data_dir")
  if saved is None and not dataset:
    raise errors.UserInputError(
        f"no --dataset given and {model_dir} holds no config.json naming the run's own: pass "
        "--dataset (and --data_dir for a TFDS set), or point --model_dir at a finished job")
  saved = saved or {}
  return (dataset or saved["dataset"],
          data_dir if FLAGS["data_dir"].present else saved.get("data_dir", ""))


def main(argv):
  if len(argv) > 1:
    cli.fail(f"unexpected arguments {' '.join(argv[1:])}: every setting is a --flag=value")
  if not FLAGS.model_dir:
    cli.fail(config_lib.no_model_dir(os.environ, "a finished job's --model_dir"))
  if FLAGS.dataset:
    try:
      config_lib.check_dataset_name(FLAGS.dataset)
    except errors.UserInputError as e:
      cli.fail(str(e))
  with cli.tensorflow_imported_quietly():
    from trainer.multitask import export# pylint: disable=import-outside-toplevel
    from trainer.data import sources
    from trainer.multitask import losses
  model_dir = FLAGS.model_dir.rstrip("/")
  try:
    dataset, data_dir = run_dataset(model_dir)
    split = getattr(sources.load_splits(dataset, data_dir), FLAGS.split)
    outputs = export.predict_batches(export.load(run_directory.of(model_dir).export),
                                     split.images)
  except errors.JobError as e:
    cli.fail(str(e))
  metrics = losses.metrics_from_outputs(outputs["classifier"], outputs["decoder"], split)
  print(json.dumps({"dataset": dataset, "split": FLAGS.split, "examples": len(split),
                    **metrics}, indent=2))


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
