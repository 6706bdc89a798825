"""What the unlabelled images buy when labels are few: classifier-only against the multitask
network, with and without the semi-supervised objectives of trainer.multitask.losses.

    python -m benchmarks.semi_supervised              # Fashion-MNIST from Debian's package

For each number of labelled training examples (--labeled; 0 means all), each seed and each of
--methods (METHODS below), trains on the same batches (the decoder learns from every image,
the classifier from the labelled ones) for the same steps at the same global batch, warm-up
included, and reports the test accuracy's mean and spread (sample standard deviation over
seeds) with the wall time. Each run's validation split is cut to as many labelled images as
it has training labels (stratified, the same for every run): settings are fixed in advance or
chosen on that accuracy (`tuning_accuracy`), never on the full validation or the test split. Every finished run is written to --output at once with the code it ran (the git tree
of trainer/); a rerun skips the runs of unchanged code already there, so an interrupted or
extended run resumes, and runs of other code are dropped.
"""

import dataclasses
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from absl import app, flags

from trainer.config import DEFAULT_LOSS_WEIGHTS
from trainer.multitask import DECODER

FLAGS = flags.FLAGS

FIXED = dict(loss_weighting="fixed")
TASKS = DEFAULT_LOSS_WEIGHTS
CLASSIFIER_ONLY = {**DEFAULT_LOSS_WEIGHTS, DECODER: 0.0}
# Settings of the new objectives, fixed in advance from the papers: the Ladder network's input
# noise (0.3, Rasmus et al. 2015), FixMatch's threshold and weight (0.95, 1.0).
DENOISING = dict(input_noise=0.3)
PSEUDO_LABELS = dict(unlabeled_loss="pseudo_label", unlabeled_weight=1.0,
                     pseudo_label_threshold=0.95)
METHODS = {
    "classifier_only": dict(FIXED, loss_weights=CLASSIFIER_ONLY),
    "multitask_fixed": dict(FIXED, loss_weights=TASKS),
    "multitask_uncertainty": dict(loss_weighting="uncertainty"),
    "denoising": dict(FIXED, loss_weights=TASKS, **DENOISING),
    "pseudo_label": dict(FIXED, loss_weights=TASKS, **PSEUDO_LABELS),
    "denoising_pseudo_label": dict(FIXED, loss_weights=TASKS, **DENOISING, **PSEUDO_LABELS),
    "denoising_pseudo_label_no_decoder": dict(FIXED, loss_weights=CLASSIFIER_ONLY, **DENOISING,
                                              **PSEUDO_LABELS),
    "pseudo_label_no_decoder": dict(FIXED, loss_weights=CLASSIFIER_ONLY, **PSEUDO_LABELS),
    "consistency": dict(FIXED, loss_weights=TASKS, unlabeled_loss="consistency",
                        unlabeled_weight=1.0),
    # Tried against the papers' settings, chosen between on the tuning accuracy:
    "denoising_0.1": dict(FIXED, loss_weights=TASKS, input_noise=0.1),
    "denoising_0.1_pseudo_label": dict(FIXED, loss_weights=TASKS, input_noise=0.1,
                                       **PSEUDO_LABELS),
    "pseudo_label_0.8": dict(FIXED, loss_weights=TASKS, **{**PSEUDO_LABELS,
                                                          "pseudo_label_threshold": 0.8}),
    "consistency_10": dict(FIXED, loss_weights=TASKS, unlabeled_loss="consistency",
                           unlabeled_weight=10.0),
    "consistency_30": dict(FIXED, loss_weights=TASKS, unlabeled_loss="consistency",
                           unlabeled_weight=30.0),
    "consistency_100": dict(FIXED, loss_weights=TASKS, unlabeled_loss="consistency",
                            unlabeled_weight=100.0),
    "consistency_decoder_1": dict(FIXED, loss_weights={"classifier": 1.0, "decoder": 1.0},
                                  unlabeled_loss="consistency", unlabeled_weight=1.0),
    "denoising_0.1_consistency": dict(FIXED, loss_weights=TASKS, input_noise=0.1,
                                      unlabeled_loss="consistency", unlabeled_weight=1.0),
    "consistency_no_decoder": dict(FIXED, loss_weights=CLASSIFIER_ONLY,
                                   unlabeled_loss="consistency", unlabeled_weight=1.0),
    # The chosen method's ablations: with the Ladder network's denoising, and without the decoder.
    "denoising_consistency_10": dict(FIXED, loss_weights=TASKS, **DENOISING,
                                     unlabeled_loss="consistency", unlabeled_weight=10.0),
    "consistency_10_no_decoder": dict(FIXED, loss_weights=CLASSIFIER_ONLY,
                                      unlabeled_loss="consistency", unlabeled_weight=10.0),
}


def _define_flags() -> None:
  """Defined only when run as a program, so that tests may import this module."""
  flags.DEFINE_string("dataset", "idx:/usr/share/datasets/fashion-mnist", "Any --dataset source.")
  flags.DEFINE_list("labeled", ["100", "300", "1000", "0"], "Labelled examples; 0: all.")
  flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds: initialisation, labelled subset, order.")
  flags.DEFINE_list("methods", ["classifier_only", "multitask_fixed", "consistency_10"],
                    f"Which of the methods to train: {', '.join(METHODS)}.")
  flags.DEFINE_integer("epochs", 10, "Epochs of every run.")
  flags.DEFINE_integer("batch_size", 64, "Global batch size of every run.")
  flags.DEFINE_integer("width", 16, "--width of every run's model (narrow: 48 takes three times as long).")
  flags.DEFINE_string("output", os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                             "semi_supervised.json"), "Where the runs go.")


def run_key(labeled: int, method: str, seed: int) -> str:
  return f"{labeled}/{method}/{seed}"


def summarise(runs: dict) -> dict:
  """{labeled: {method: (mean accuracy, spread, number of seeds, mean seconds)}} over the
  finished runs."""
  table = {}
  for run in runs.values():
    table.setdefault(run["labeled_examples_flag"], {}).setdefault(run["method"], []).append(run)
  summary = {}
  for labeled, methods in table.items():
    for method, method_runs in methods.items():
      accuracies = [run["test_accuracy"] for run in method_runs]
      summary.setdefault(labeled, {})[method] = (
          statistics.mean(accuracies),
          statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0, len(accuracies),
          statistics.mean(run.get("seconds", float("nan")) for run in method_runs))
  return summary


def table(runs: dict) -> str:
  """Test accuracy, mean ± spread over seeds (and each run's mean wall time), as a Markdown
  table: labels down, methods across."""
  summary = summarise(runs)
  methods = [m for m in METHODS if any(m in row for row in summary.values())]
  lines = ["| labelled examples | " + " | ".join(methods) + " |",
           "|---|" + "---|" * len(methods)]
  for labeled in sorted(summary, key=lambda n: n or float("inf")):
    cells = []
    for method in methods:
      if method in summary[labeled]:
        mean, spread, count, seconds = summary[labeled][method]
        cells.append(f"{mean:.4f} ± {spread:.4f} (n={count}, {seconds:.0f} s)")
      else:
        cells.append("")
    lines.append(f"| {labeled or 'all'} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def code_version() -> str:
  """The git tree of trainer/ (what a run's result depends on), '+changes' if it has any."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  git = lambda *args: subprocess.run(["git", *args], cwd=root, capture_output=True,
                                     text=True).stdout.strip()
  tree = git("rev-parse", "HEAD:trainer")
  return tree + ("+changes" if git("status", "--porcelain", "trainer") else "")


def main(_) -> None:
  import tensorflow as tf
  from trainer.config import TrainConfig
  from trainer.data import pipeline, sources
  from trainer.job import train
  from trainer.multitask import problem
  settings = {"dataset": FLAGS.dataset, "epochs": FLAGS.epochs, "batch_size": FLAGS.batch_size,
              "width": FLAGS.width}
  code, runs = code_version(), {}
  if os.path.exists(FLAGS.output):
    with open(FLAGS.output) as f:
      saved = json.load(f)
    if saved.get("settings", settings) != settings:
      sys.exit(f"error: {FLAGS.output} holds runs with {saved['settings']}, not {settings}: "
               "pass those flags, or another --output")
    runs = {key: run for key, run in saved["runs"].items() if run.get("code") == code}
  splits = sources.load_splits(FLAGS.dataset)
  strategy = tf.distribute.get_strategy()
  for labeled in map(int, FLAGS.labeled):
    # Settings may be chosen on no more labelled validation images than the run has labels:
    # the run's validation split is that many, stratified (seed 0, the same for every run).
    tuning = splits.validation
    if labeled:
      kept = pipeline.labeled_subset(splits.validation, labeled, seed=0)
      tuning = sources.Split(splits.validation.images[kept], splits.validation.labels[kept])
    run_splits = sources.Splits(splits.train, tuning, splits.test)
    for seed in map(int, FLAGS.seeds):
      for method in FLAGS.methods:
        key = run_key(labeled, method, seed)
        if key in runs:
          continue
        settings_of_method = METHODS[method]
        if not labeled:  # Every image is labelled: an unlabelled term has nothing to learn from.
          settings_of_method = {k: v for k, v in settings_of_method.items()
                                if k not in PSEUDO_LABELS}
        started = time.time()
        with tempfile.TemporaryDirectory() as model_dir:
          config = TrainConfig(dataset=FLAGS.dataset, model_dir=model_dir, epochs=FLAGS.epochs,
                               batch_size=FLAGS.batch_size, width=FLAGS.width,
                               labeled_examples=labeled, seed=seed, report=False,
                               **settings_of_method)
          train.configure_process(config, strategy)
          metrics = train.run(config, strategy,
                              functools.partial(problem.make_task, splits=run_splits))
        runs[key] = {"labeled_examples_flag": labeled, "method": method, "seed": seed,
                     "labeled_examples": metrics["labeled_examples"],
                     "test_accuracy": metrics["test_accuracy"],
                     "tuning_accuracy": metrics["validation_accuracy"],
                     "tuning_examples": len(tuning),
                     "test_reconstruction_mse": metrics["test_reconstruction_mse"],
                     "loss_weights_final": metrics["loss_weights_final"],
                     "config": dataclasses.asdict(config) | {"model_dir": None},
                     "code": code, "seconds": time.time() - started}
        print(f"{key}: tuning {runs[key]['tuning_accuracy']:.4f}, test "
              f"{runs[key]['test_accuracy']:.4f} in {runs[key]['seconds']:.0f} s",
              file=sys.stderr, flush=True)
        with open(FLAGS.output + ".tmp", "w") as f:
          json.dump({"settings": settings, "runs": runs}, f, indent=2)
        os.replace(FLAGS.output + ".tmp", FLAGS.output)
  print(table(runs))


if __name__ == "__main__":
  _define_flags()
  app.run(main)
