"""Entry point: `python -m trainer.evaluate --model_dir=DIR [--dataset=...] [--split=test]`.

Re-evaluates a finished job's export (DIR/export) on a split of any `--dataset` source and
prints its metrics as JSON: the same definitions as the job's metrics.json, so on the job's
own dataset they agree. Bad input ends with one `error:` line and exit code 2.
"""

import json

from absl import app
from absl import flags

from trainer import cli
from trainer import config as config_lib

FLAGS = flags.FLAGS

flags.DEFINE_string("model_dir", config_lib.default_model_dir(),
                    "A finished training job's --model_dir (local or gs://); its export is read.")
flags.DEFINE_string("dataset", "mnist", "Any source trainer.task takes (see its --dataset).")
flags.DEFINE_string("data_dir", "", "TFDS data directory; TFDS's default if empty.")
flags.DEFINE_enum("split", "test", ["train", "validation", "test"], "Which split to evaluate.")




def main(argv):
  if len(argv) > 1:
    cli.fail(f"unexpected arguments {' '.join(argv[1:])}: every setting is a --flag=value")
  if not FLAGS.model_dir:
    cli.fail("no --model_dir given and $AIP_MODEL_DIR is not set: pass a finished job's --model_dir")
  from trainer import export, losses, sources
  try:
    split = getattr(sources.load_splits(FLAGS.dataset, FLAGS.data_dir), FLAGS.split)
    outputs = export.predict_batches(export.load(f"{FLAGS.model_dir.rstrip('/')}/export"),
                                     split.images)
  except config_lib.UserInputError as e:
    cli.fail(str(e))
  metrics = losses.metrics_from_outputs(outputs["classifier"], outputs["decoder"], split)
  print(json.dumps({"dataset": FLAGS.dataset, "split": FLAGS.split, "examples": len(split),
                    **metrics}, indent=2))


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
