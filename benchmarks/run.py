"""The package against the original exercise's way, in one run on one machine and one dataset.

    python -m benchmarks.run                          # Fashion-MNIST from Debian's package
    python -m benchmarks.run --dataset=mnist_sample --target_accuracy=0.95 --target_mse=0.02

Every figure comes from its own process (`benchmarks.measure`). Prints a table and writes
the figures to benchmarks/results.json (--output).
"""

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Optional

import numpy as np
from absl import app, flags

FLAGS = flags.FLAGS


def _define_flags() -> None:
  """Defined only when run as a program, so that tests may import this module."""
  flags.DEFINE_string("dataset", "idx:/usr/share/datasets/fashion-mnist", "Any --dataset source.")
  flags.DEFINE_float("target_accuracy", 0.90, "Time to accuracy: test accuracy to reach.")
  flags.DEFINE_float("target_mse", 0.015, "Time to accuracy: test reconstruction MSE to reach.")
  flags.DEFINE_integer("repeats", 3, "Rounds of the three throughputs the ratios compare (the "
                       "exercise's fit, the package's loop, PyTorch); the median counts (this "
                       "VM's speed drifts between runs).")
  flags.DEFINE_integer("measure_steps", 600, "Steps each throughput of the package's loop and "
                       "PyTorch is timed over, after the warm-up (the exercise's: one epoch).")
  flags.DEFINE_integer("exercise_max_epochs", 20, "The exercise's time to accuracy gives up "
                       "after this many epochs (the ratio is then an upper bound).")
  flags.DEFINE_string("output", os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                             "results.json"), "Where to write the figures.")


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The package's time-to-accuracy recipe: the default model and settings, trained for 2 epochs
# (the cosine schedule settles within them) without shifts, the test split evaluated every
# 130 steps (a third of an epoch) and at the epoch's end.
PACKAGE_TTA_FLAGS = ("--epochs=2", "--shift_pixels=0", "--eval_every_steps=130")
# The default recipe as the README runs it (5 epochs, shifts on), timed to issue 13's bar.
PACKAGE_FINAL_BAR = {"test_accuracy": 0.93, "test_reconstruction_mse": 0.0098}
PACKAGE_FINAL_FLAGS = ("--epochs=5", "--shift_pixels=1", "--eval_every_steps=130")


def measure(name: str, *flags_: str, bar: Optional[dict] = None) -> dict:
  """Runs one measurement in a fresh process; returns its result, and its process's seconds.
  `bar` (test accuracy and MSE to reach) defaults to --target_accuracy and --target_mse."""
  bar = bar or {"test_accuracy": FLAGS.target_accuracy,
                "test_reconstruction_mse": FLAGS.target_mse}
  started = time.time()
  result = subprocess.run(
      [sys.executable, "-m", "benchmarks.measure", name, f"--dataset={FLAGS.dataset}",
       f"--target_accuracy={bar['test_accuracy']}",
       f"--target_mse={bar['test_reconstruction_mse']}", *flags_],
      cwd=REPO, capture_output=True, text=True,
      env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "BENCHMARK_PROCESS_START": str(started)})
  lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
  if result.returncode or not lines:
    sys.exit(f"error: measurement {name} {' '.join(flags_)} failed:\n{result.stderr[-3000:]}")
  figures = json.loads(lines[-1][len("RESULT "):])
  for moment in ("reached_at", "ended_at"):
    if moment in figures:
      figures["seconds"] = figures.pop(moment) - started
  print(f"  {name} {' '.join(flags_)}: {figures}", file=sys.stderr, flush=True)
  return figures


def training_flops_per_image(latent_dim: int = 0, width: int = 0) -> float:
  """Multiply-adds of the model's layers (default: the default model's), from their shapes,
  x2 for FLOPs, x3 for training (the backward pass costs about twice the forward: input and
  weight gradients). Direct convolution is assumed: an FFT or Winograd kernel does less."""
  import keras
  from trainer.config import TrainConfig
  from trainer.model import build_model

  def layers(model):
    for layer in model.layers:
      yield from layers(layer) if isinstance(layer, keras.Model) else [layer]

  multiply_adds = 0
  for layer in layers(build_model(latent_dim or TrainConfig.latent_dim,
                                  width or TrainConfig.width)):
    if isinstance(layer, keras.layers.Conv2DTranspose):
      _, height, width, channels_in = layer.input.shape
      multiply_adds += height * width * channels_in * layer.filters * layer.kernel_size[0] ** 2
    elif isinstance(layer, keras.layers.Conv2D):
      _, height, width, channels_out = layer.output.shape
      multiply_adds += (height * width * channels_out * layer.input.shape[-1]
                        * layer.kernel_size[0] ** 2)
    elif isinstance(layer, keras.layers.Dense):
      multiply_adds += layer.input.shape[-1] * layer.units
  return 2 * 3 * multiply_adds


def split_arrays(dataset: str, directory: str) -> str:
  """Writes `dataset`'s training and test splits to an npz in `directory` for the PyTorch
  peer, whose process imports no TensorFlow (reading the IDX or TFDS sources does); returns
  its path."""
  from trainer import sources
  splits = sources.load_splits(dataset)
  path = os.path.join(directory, "splits.npz")
  with open(path, "wb") as f:
    np.savez(f, images=splits.train.images, labels=splits.train.labels,
             test_images=splits.test.images, test_labels=splits.test.labels)
  return path


def flops_figures(flops_per_image: float, images_per_second: float, limits: dict) -> dict:
  """The package's achieved FLOP rate as a share of the best rate this machine's kernels were
  measured at in the same run (benchmarks.limits), with both FLOP counts.

  The achieved rate uses TensorFlow's own count of a training step's FLOPs; the count from
  the layers' shapes is kept beside it as a check. Exits with an error where the share is
  above 1: the count or the limit would then be wrong, and no figure of this run is trusted.
  """
  convolution = limits["heaviest_convolution"]
  limit = max(limits["matmul_flops_per_second"], convolution["forward_flops_per_second"],
              convolution["forward_and_backward_flops_per_second"])
  counted = limits["counted_training_flops_per_image"]
  achieved = counted * images_per_second
  figures = {"training_flops_per_image_counted_by_tensorflow": counted,
             "training_flops_per_image_from_layer_shapes": flops_per_image,
             "achieved_flops_per_second": achieved, "measured_limit_flops_per_second": limit,
             "share_of_measured_limit": achieved / limit, **limits}
  if figures["share_of_measured_limit"] > 1:
    sys.exit(f"error: the package's {achieved / 1e9:.1f} GFLOP/s is above the "
             f"{limit / 1e9:.1f} GFLOP/s measured as this machine's limit: the FLOP count or "
             f"the limit is wrong; nothing written ({json.dumps(figures)})")
  return figures


def main(_) -> None:
  print("measuring (each in its own process):", file=sys.stderr)
  results = {"dataset": FLAGS.dataset, "machine": platform.node(),
             "bar": {"test_accuracy": FLAGS.target_accuracy,
                     "test_reconstruction_mse": FLAGS.target_mse},
             "settings": {"repeats": FLAGS.repeats, "measure_steps": FLAGS.measure_steps,
                          "exercise_max_epochs": FLAGS.exercise_max_epochs}}
  steps = f"--measure_steps={FLAGS.measure_steps}"
  # The three alternate in rounds, so a drift in the VM's speed reaches each alike.
  runs = {"exercise_fit_batch128": [], "package_loop_batch128": [], "pytorch_batch128": []}
  # Removed when this process ends (a failed measurement exits it), at the latest.
  scratch = tempfile.TemporaryDirectory()
  arrays = split_arrays(FLAGS.dataset, scratch.name)
  for _ in range(FLAGS.repeats):
    runs["exercise_fit_batch128"].append(measure("exercise")["images_per_second"])
    runs["package_loop_batch128"].append(
        measure("package", "--batch_size=128", steps)["images_per_second"])
    runs["pytorch_batch128"].append(measure(
        "pytorch", "--batch_size=128", steps, f"--arrays={arrays}")["images_per_second"])
  results["throughput_runs"] = runs
  # Each round's own ratio: their spread says how far the median can be trusted.
  round_ratios = [package / peer for package, peer in
                  zip(runs["package_loop_batch128"], runs["pytorch_batch128"])]
  results["throughput_ratio_vs_pytorch"] = statistics.median(round_ratios)
  results["throughput_ratio_vs_pytorch_rounds"] = round_ratios
  throughput = {
      "input_pipeline_alone": measure("pipeline")["images_per_second"],
      **{name: statistics.median(values) for name, values in runs.items()},
      "package_loop_batch128_steps_per_loop1": measure(
          "package", "--batch_size=128", "--steps_per_loop=1", "--measure_steps=300"
      )["images_per_second"],
  }
  results["images_per_second"] = throughput
  results["throughput_ratio_vs_exercise"] = (throughput["package_loop_batch128"]
                                             / throughput["exercise_fit_batch128"])

  results["flops"] = flops_figures(training_flops_per_image(),
                                   throughput["package_loop_batch128"],
                                   measure("limits", "--batch_size=128"))
  results["share_of_measured_limit"] = results["flops"]["share_of_measured_limit"]

  package_tta = measure("package_tta", *PACKAGE_TTA_FLAGS)
  if package_tta["step"] is None:
    sys.exit(f"error: the package's recipe ({' '.join(PACKAGE_TTA_FLAGS)}) never reached the "
             f"bar: {reached(package_tta)}")
  exercise_tta = measure("exercise_tta", f"--max_epochs={FLAGS.exercise_max_epochs}")
  results["time_to_accuracy"] = {"package": package_tta, "package_flags": PACKAGE_TTA_FLAGS,
                                 "exercise": exercise_tta}
  # If the exercise's way never reaches the bar, its time is a lower bound, the ratio an upper.
  results["time_to_accuracy_ratio_vs_exercise"] = package_tta["seconds"] / exercise_tta["seconds"]
  results["time_to_accuracy_ratio_is_upper_bound"] = exercise_tta["epochs"] is None
  results["time_to_final_bar"] = {
      "bar": PACKAGE_FINAL_BAR, "package_flags": PACKAGE_FINAL_FLAGS,
      "package": measure("package_tta", *PACKAGE_FINAL_FLAGS, bar=PACKAGE_FINAL_BAR),
      "pytorch": measure("pytorch_tta", *PACKAGE_FINAL_FLAGS, f"--arrays={arrays}",
                         bar=PACKAGE_FINAL_BAR)}
  scratch.cleanup()
  final = results["time_to_final_bar"]
  if final["package"]["step"] is not None and final["pytorch"]["step"] is not None:
    results["time_to_final_bar_ratio_vs_pytorch"] = (final["package"]["seconds"]
                                                     / final["pytorch"]["seconds"])
  results["startup_seconds"] = measure("startup")

  with open(FLAGS.output, "w") as f:
    json.dump(results, f, indent=2)
    f.write("\n")
  print(table(results))


def reached(figures: dict) -> str:
  """A time-to-accuracy result as a table cell."""
  if figures.get("step") is None:
    return (f"not reached (ended at accuracy {figures['accuracy']:.4f}, "
            f"MSE {figures['reconstruction_mse']:.5f})")
  return f"{figures['seconds']:.0f} s (step {figures['step']})"


def exercise_reached(figures: dict) -> str:
  """The exercise's time-to-accuracy result as a table cell."""
  if figures["epochs"] is None:
    return (f"not reached in {figures['seconds']:.0f} s (ended at accuracy "
            f"{figures['accuracy']:.4f}, MSE {figures['reconstruction_mse']:.5f})")
  return f"{figures['seconds']:.0f} s (epoch {figures['epochs']})"


def table(results: dict) -> str:
  """The figures as a Markdown table."""
  ips = results["images_per_second"]
  tta = results["time_to_accuracy"]
  flops = results["flops"]
  final = results["time_to_final_bar"]
  rows = [
      ("input pipeline alone (no model)", f"{ips['input_pipeline_alone']:,.0f} images/s"),
      ("exercise way: float64 arrays into model.fit, batch 128 (median)",
       f"{ips['exercise_fit_batch128']:,.0f} images/s"),
      ("package loop, batch 128 (the job defaults to 64), 50 steps per call (median)",
       f"{ips['package_loop_batch128']:,.0f} images/s"),
      ("package loop, batch 128, 1 step per call",
       f"{ips['package_loop_batch128_steps_per_loop1']:,.0f} images/s"),
      ("the same model in plain PyTorch, batch 128 (median)",
       f"{ips['pytorch_batch128']:,.0f} images/s"),
      ("**throughput ratio, package / exercise (batch 128)**",
       f"**{results['throughput_ratio_vs_exercise']:.2f}**"),
      ("**throughput ratio, package / PyTorch (batch 128), median of the rounds' (range)**",
       f"**{results['throughput_ratio_vs_pytorch']:.2f}** "
       f"({min(results['throughput_ratio_vs_pytorch_rounds']):.2f} to "
       f"{max(results['throughput_ratio_vs_pytorch_rounds']):.2f})"),
      ("training FLOPs per image: TensorFlow's count (layer shapes x3)",
       f"{flops['training_flops_per_image_counted_by_tensorflow'] / 1e6:.1f} MFLOP "
       f"({flops['training_flops_per_image_from_layer_shapes'] / 1e6:.1f})"),
      ("achieved, package loop batch 128", f"{flops['achieved_flops_per_second'] / 1e9:.1f} GFLOP/s"),
      (f"measured limit: the best of a {flops['matmul_size']}-square matmul "
       f"({flops['matmul_flops_per_second'] / 1e9:.0f}) and the heaviest convolution, forward "
       f"({flops['heaviest_convolution']['forward_flops_per_second'] / 1e9:.0f}) and forward "
       f"and backward ({flops['heaviest_convolution']['forward_and_backward_flops_per_second'] / 1e9:.0f}); "
       f"{flops['cpu']['model_name']} family {flops['cpu']['family']} model "
       f"{flops['cpu']['model']}, {flops['cpu']['logical_cpus']} CPUs",
       f"{flops['measured_limit_flops_per_second'] / 1e9:.0f} GFLOP/s "
       f"(**{flops['share_of_measured_limit']:.0%}** used)"),
      (f"time to test accuracy {results['bar']['test_accuracy']} and MSE "
       f"{results['bar']['test_reconstruction_mse']}, package",
       reached(tta["package"])),
      ("the same, exercise way", exercise_reached(tta["exercise"])),
      ("**time-to-accuracy ratio, package / exercise**",
       f"**{'< ' if results.get('time_to_accuracy_ratio_is_upper_bound') else ''}"
       f"{results['time_to_accuracy_ratio_vs_exercise']:.2f}**"),
      (f"time to test accuracy {final['bar']['test_accuracy']} and MSE "
       f"{final['bar']['test_reconstruction_mse']}, package, default recipe "
       f"({' '.join(final['package_flags'])})", reached(final["package"])),
      ("the same, PyTorch peer, the same recipe", reached(final["pytorch"])),
      ("**time to that bar, package / PyTorch**",
       f"**{results['time_to_final_bar_ratio_vs_pytorch']:.2f}**"
       if "time_to_final_bar_ratio_vs_pytorch" in results else "not both reached"),
      ("start-up to the first training step",
       f"{results['startup_seconds']['first_step_done']:.1f} s"),
  ]
  return "\n".join(["| measure | value |", "|---|---|"]
                   + [f"| {name} | {value} |" for name, value in rows])


if __name__ == "__main__":
  _define_flags()
  app.run(main)
