"""Which changes made the default model: each lever's effect on accuracy, MSE and images/s.

    python -m benchmarks.levers                     # every variant, Fashion-MNIST, 5 epochs
    python -m benchmarks.levers --variants=final --seeds=0,1

Each variant is the trainer's default configuration and model with one thing changed
(VARIANTS; each row says what).
Every run trains in its own process, with the package's loop, and reports test accuracy,
reconstruction MSE, the loop's overall images/s, and its time to BAR: the test split is
evaluated every --eval_every_steps and at each epoch's end, and the first evaluation that meets
both bars gives the run's seconds of training (the package's own validation included, these
test evaluations left out) and its step. Finished runs are written to --output at
once; a rerun skips them, so an interrupted one resumes.
"""

import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile

from absl import app, flags

from benchmarks.run import PACKAGE_FINAL_BAR

FLAGS = flags.FLAGS

# name: (what it changes against the default, TrainConfig overrides, build_model overrides).
# The exploration that led to the default changed one thing at a time against other
# baselines; its runs are in levers_exploration.json, described in benchmarks/README.md.
VARIANTS = {
    "final": ("nothing: the default", {}, {}),
    "no_batch_norm": ("without batch normalisation", {}, {"batch_norm": False}),
    "two_blocks": ("two resolutions in the encoder (28, 14), as before", {}, {"blocks": 2}),
    "two_blocks_deep_decoder": ("two resolutions and the deeper decoder (issue 26's candidate)",
                                {}, {"blocks": 2, "deep_decoder": True}),
    "deep_decoder": ("issue 13's deeper decoder: a convolution at 7x7 and 14x14, and "
                     "full-resolution features", {}, {"deep_decoder": True}),
    "no_warmup": ("no learning-rate warm-up", {"warmup_steps": 0}, {}),
    "no_weight_decay": ("Adam, no weight decay", {"weight_decay": 0.0}, {}),
    "classic_weights": ("fixed loss weights 1.0 and 0.2", {
        "loss_weights": {"classifier": 1.0, "decoder": 0.2}}, {}),
    "uncertainty": ("learned loss weights", {"loss_weighting": "uncertainty"}, {}),
    "batch128": ("global batch 128", {"batch_size": 128}, {}),
    "width32": ("width 32", {"width": 32}, {}),
    "no_shift": ("no shift augmentation", {"shift_pixels": 0}, {}),
}
# Issue 13's Fashion-MNIST bar for the default recipe, as benchmarks.run times it.
BAR = PACKAGE_FINAL_BAR


def meets(metrics: dict) -> bool:
  return (metrics["test_accuracy"] >= BAR["test_accuracy"]
          and metrics["test_reconstruction_mse"] <= BAR["test_reconstruction_mse"])


def _define_flags() -> None:
  """Defined only when run as a program, so that tests may import this module."""
  flags.DEFINE_string("dataset", "idx:/usr/share/datasets/fashion-mnist", "Any --dataset source.")
  flags.DEFINE_list("variants", list(VARIANTS), "Which variants to train.")
  flags.DEFINE_list("seeds", ["0"], "Seeds of each variant.")
  flags.DEFINE_integer("epochs", 5, "Epochs of every run.")
  flags.DEFINE_integer("eval_every_steps", 130, "Test evaluations for the time to BAR.")
  flags.DEFINE_string("output", os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                             "levers.json"), "Where the runs go.")
  flags.DEFINE_string("child", "", "Internal: train one 'variant/seed' and print its RESULT.")


def train_one(dataset: str, variant: str, seed: int, epochs: int, eval_every_steps: int) -> dict:
  """Trains one variant in this process; returns its test metrics, images/s and time to BAR
  (seconds and step None where no evaluation met it)."""
  import time
  import tensorflow as tf
  from trainer.config import TrainConfig
  from trainer.job import train
  from trainer.multitask import model, problem
  _, overrides, architecture = VARIANTS[variant]
  strategy = tf.distribute.get_strategy()
  with tempfile.TemporaryDirectory() as model_dir:
    config = TrainConfig(dataset=dataset, model_dir=model_dir, epochs=epochs, seed=seed,
                         eval_every_steps=eval_every_steps, report=False, **overrides)
    train.configure_process(config, strategy)
    started, measuring = time.time(), [0.0]
    reached = {"seconds_to_bar": None, "step_to_bar": None}

    def time_to_bar(step, evaluate):
      if reached["step_to_bar"] is not None:
        return
      evaluated_from = time.time()
      test = evaluate("test")
      print(f"step {step}: {test}", file=sys.stderr, flush=True)
      if meets({"test_accuracy": test["accuracy"],
                "test_reconstruction_mse": test["reconstruction_mse"]}):
        reached.update(seconds_to_bar=evaluated_from - started - measuring[0], step_to_bar=step)
      measuring[0] += time.time() - evaluated_from

    make_task = functools.partial(problem.make_task, model_fn=lambda c: model.build_model(
        c.latent_dim, c.width, **architecture))
    metrics = train.run(config, strategy, make_task, on_evaluation=time_to_bar)
  return {"variant": variant, "seed": seed, **reached,
          **{name: metrics[name] for name in ("test_accuracy", "test_reconstruction_mse",
                                              "train_images_per_second")}}


def table(runs: dict) -> str:
  """Mean (and spread, over seeds) of each variant, as a Markdown table; the time to BAR over
  the seeds that reached it, and how many seeds ended at or past it."""
  lines = ["| variant | change | seeds | test accuracy | test MSE | images/s | seconds to bar "
           "(step) | seeds ending at the bar |", "|---|---|---|---|---|---|---|---|"]
  for variant, (description, _, _) in VARIANTS.items():
    done = [run for run in runs.values() if run["variant"] == variant]
    if not done:
      continue
    cells = []
    for name, digits in (("test_accuracy", 4), ("test_reconstruction_mse", 5),
                         ("train_images_per_second", 0), ("seconds_to_bar", 0)):
      values = [run[name] for run in done if run.get(name) is not None]
      if values:
        cell = f"{statistics.mean(values):.{digits}f}"
      else:  # Runs from before the time to BAR was recorded have no such key.
        cell = "not reached" if any(name in run for run in done) else "not measured"
      if len(values) > 1:
        cell += f" ± {statistics.stdev(values):.{digits}f}"
      cells.append(cell)
    steps = [run["step_to_bar"] for run in done if run.get("step_to_bar") is not None]
    if steps:
      cells[-1] += f" ({statistics.mean(steps):.0f})"
    if len(steps) < len(done) and steps:
      cells[-1] += f", {len(steps)} of {len(done)} seeds"
    cells.append(f"{sum(meets(run) for run in done)} of {len(done)}")
    lines.append(f"| {variant} | {description} | {len(done)} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def main(_) -> None:
  if FLAGS.child:
    variant, seed = FLAGS.child.split("/")
    print("RESULT " + json.dumps(train_one(FLAGS.dataset, variant, int(seed), FLAGS.epochs,
                                           FLAGS.eval_every_steps)))
    return
  runs = {}
  if os.path.exists(FLAGS.output):
    with open(FLAGS.output) as f:
      runs = json.load(f)["runs"]
  for variant in FLAGS.variants:
    for seed in FLAGS.seeds:
      key = f"{variant}/{seed}"
      if key in runs:
        continue
      # Its own process: no compiled function, thread pool or dtype policy carries over.
      result = subprocess.run(
          [sys.executable, "-m", "benchmarks.levers", f"--child={key}",
           f"--dataset={FLAGS.dataset}", f"--epochs={FLAGS.epochs}",
           f"--eval_every_steps={FLAGS.eval_every_steps}"],
          stdout=subprocess.PIPE, text=True, check=True)
      runs[key] = json.loads(result.stdout.split("RESULT ", 1)[1])
      print(f"{key}: {runs[key]}", file=sys.stderr, flush=True)
      with open(FLAGS.output + ".tmp", "w") as f:
        json.dump({"dataset": FLAGS.dataset, "epochs": FLAGS.epochs, "runs": runs}, f, indent=2)
      os.replace(FLAGS.output + ".tmp", FLAGS.output)
  print(table(runs))


if __name__ == "__main__":
  _define_flags()
  app.run(main)
