"""What multitask training buys when labels are few: classifier-only against multitask training.

    python -m benchmarks.semi_supervised              # Fashion-MNIST from Debian's package

For each number of labelled training examples (--labeled; 0 means all) and each seed, trains
  classifier_only        the classifier's loss alone (decoder weight 0)
  multitask_fixed        both tasks, fixed weights 1.0 and 0.2
  multitask_uncertainty  both tasks, weights learned after Kendall et al. (2018)
on the same batches (the decoder learns from every image, the classifier from the labelled
ones), the same epochs and seeds, and reports the test accuracy's mean and spread (sample
standard deviation over seeds). Runs in one process; every finished run is written to
--output at once, and a rerun skips the runs already there, so an interrupted one resumes.
"""

import json
import os
import statistics
import sys
import tempfile
import time

from absl import app, flags

FLAGS = flags.FLAGS

METHODS = {
    "classifier_only": dict(loss_weighting="fixed", loss_weights={"classifier": 1.0,
                                                                  "decoder": 0.0}),
    "multitask_fixed": dict(loss_weighting="fixed", loss_weights={"classifier": 1.0,
                                                                  "decoder": 0.2}),
    "multitask_uncertainty": dict(loss_weighting="uncertainty"),
}


def _define_flags() -> None:
  """Defined only when run as a program, so that tests may import this module."""
  flags.DEFINE_string("dataset", "idx:/usr/share/datasets/fashion-mnist", "Any --dataset source.")
  flags.DEFINE_list("labeled", ["100", "300", "1000", "0"], "Labelled examples; 0: all.")
  flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds: initialisation, labelled subset, order.")
  flags.DEFINE_list("methods", list(METHODS), "Which of the methods to train.")
  flags.DEFINE_integer("epochs", 1, "Epochs of every run.")
  flags.DEFINE_integer("batch_size", 64, "Global batch size of every run.")
  flags.DEFINE_string("output", os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                             "semi_supervised.json"), "Where the runs go.")


def run_key(labeled: int, method: str, seed: int) -> str:
  return f"{labeled}/{method}/{seed}"


def summarise(runs: dict) -> dict:
  """{labeled: {method: (mean accuracy, spread, number of seeds)}} over the finished runs."""
  table = {}
  for run in runs.values():
    table.setdefault(run["labeled_examples_flag"], {}).setdefault(run["method"], []).append(
        run["test_accuracy"])
  return {labeled: {method: (statistics.mean(values),
                             statistics.stdev(values) if len(values) > 1 else 0.0, len(values))
                    for method, values in methods.items()}
          for labeled, methods in table.items()}


def table(runs: dict) -> str:
  """Test accuracy, mean ± spread over seeds, as a Markdown table: labels down, methods across."""
  summary = summarise(runs)
  methods = [m for m in METHODS if any(m in row for row in summary.values())]
  lines = ["| labelled examples | " + " | ".join(methods) + " |",
           "|---|" + "---|" * len(methods)]
  for labeled in sorted(summary, key=lambda n: n or float("inf")):
    cells = []
    for method in methods:
      if method in summary[labeled]:
        mean, spread, count = summary[labeled][method]
        cells.append(f"{mean:.4f} ± {spread:.4f} (n={count})")
      else:
        cells.append("")
    lines.append(f"| {labeled or 'all'} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def main(_) -> None:
  import tensorflow as tf
  from trainer import data, train
  from trainer.config import TrainConfig
  runs = {}
  if os.path.exists(FLAGS.output):
    with open(FLAGS.output) as f:
      runs = json.load(f)["runs"]
  splits = data.load_splits(FLAGS.dataset)
  strategy = tf.distribute.get_strategy()
  for labeled in map(int, FLAGS.labeled):
    for seed in map(int, FLAGS.seeds):
      for method in FLAGS.methods:
        key = run_key(labeled, method, seed)
        if key in runs:
          continue
        started = time.time()
        with tempfile.TemporaryDirectory() as model_dir:
          config = TrainConfig(dataset=FLAGS.dataset, model_dir=model_dir, epochs=FLAGS.epochs,
                               batch_size=FLAGS.batch_size, labeled_examples=labeled, seed=seed,
                               shift_pixels=0, report=False, **METHODS[method])
          train.configure_process(config, strategy)
          metrics = train.run(config, strategy, splits)
        runs[key] = {"labeled_examples_flag": labeled, "method": method, "seed": seed,
                     "labeled_examples": metrics["labeled_examples"],
                     "test_accuracy": metrics["test_accuracy"],
                     "test_reconstruction_mse": metrics["test_reconstruction_mse"],
                     "loss_weights_final": metrics["loss_weights_final"],
                     "seconds": time.time() - started}
        print(f"{key}: {runs[key]}", file=sys.stderr, flush=True)
        with open(FLAGS.output + ".tmp", "w") as f:
          json.dump({"dataset": FLAGS.dataset, "epochs": FLAGS.epochs,
                     "batch_size": FLAGS.batch_size, "runs": runs}, f, indent=2)
        os.replace(FLAGS.output + ".tmp", FLAGS.output)
  print(table(runs))


if __name__ == "__main__":
  _define_flags()
  app.run(main)
