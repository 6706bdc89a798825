"""The package against the original exercise's way, in one run on one machine and one dataset.

    python -m benchmarks.run                          # Fashion-MNIST from Debian's package
    python -m benchmarks.run --dataset=mnist_sample --target_accuracy=0.95 --target_mse=0.02

Every figure comes from its own process (`benchmarks.measure`). Prints a table and writes
the figures to benchmarks/results.json (--output).

Each framework is measured as it runs by default and at its best on this CPU (issue 39): the
package at --precision=auto beside --precision=float32, and the PyTorch peer in eager float32
NCHW beside its best CPU recipe, bfloat16 autocast with channels_last, and torch.compile on
top where short throughput runs of both, alternating in this run, find it faster.
"""

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional, Sequence, Tuple

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
  flags.DEFINE_integer("recipe_rounds", 2, "Rounds of the short throughput runs that decide "
                       "whether torch.compile joins the PyTorch peer's best recipe.")
  flags.DEFINE_integer("recipe_measure_steps", 150, "Steps each of those runs is timed over.")
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
# The PyTorch peer's recipes, as `benchmarks.measure pytorch` takes them (torch_peer.Recipe's
# names and flags; not imported: this process imports no PyTorch). Eager float32 NCHW is the
# peer as it runs by default; the best CPU recipe is bfloat16 autocast with channels_last,
# with torch.compile where it is faster: the candidates, in order of preference on a tie.
PEER_EAGER = "eager_float32_nchw"
PEER_RECIPES = {
    PEER_EAGER: (),
    "autocast_bfloat16+channels_last": ("--channels_last", "--autocast_bfloat16"),
    "autocast_bfloat16+channels_last+compile": ("--channels_last", "--autocast_bfloat16",
                                                "--compile"),
}
PEER_BEST_CANDIDATES = ("autocast_bfloat16+channels_last",
                        "autocast_bfloat16+channels_last+compile")


def measure(name: str, *flags_: str, bar: Optional[dict] = None, required: bool = True
            ) -> Optional[dict]:
  """Runs one measurement in a fresh process; returns its result, and its process's seconds.
  `bar` (test accuracy and MSE to reach) defaults to --target_accuracy and --target_mse. A
  failed measurement ends the run, or, not `required`, is reported and gives None."""
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
    if not required:
      print(f"  {name} {' '.join(flags_)}: failed, left out:\n{result.stderr[-2000:]}",
            file=sys.stderr, flush=True)
      return None
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
  from trainer.multitask.model import build_model

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
  from trainer.data import sources
  splits = sources.load_splits(dataset)
  path = os.path.join(directory, "splits.npz")
  with open(path, "wb") as f:
    np.savez(f, images=splits.train.images, labels=splits.train.labels,
             test_images=splits.test.images, test_labels=splits.test.labels)
  return path


def share_figures(counted_flops_per_image: float, images_per_second: float, policy: str,
                  limits: dict) -> dict:
  """A package loop's achieved FLOP rate (TensorFlow's count x its images/s) as a share of
  the best rate measured for its own precision: the kernels of `policy`'s compute dtype
  (float32 for float32, bfloat16 for mixed_bfloat16)."""
  from benchmarks.precision import compute_dtype
  dtype = compute_dtype(policy)
  if dtype not in limits["by_dtype"]:
    sys.exit(f"error: no limit was measured in {dtype}, {policy}'s compute dtype")
  limit = limits["by_dtype"][dtype]["limit_flops_per_second"]
  achieved = counted_flops_per_image * images_per_second
  return {"precision": policy, "compute_dtype": dtype, "images_per_second": images_per_second,
          "achieved_flops_per_second": achieved, "measured_limit_flops_per_second": limit,
          "share_of_measured_limit": achieved / limit}


def flops_figures(flops_per_image: float, package: Dict[str, Tuple[str, float]],
                  limits: dict) -> dict:
  """Each package loop's achieved FLOP rate as a share of the best rate this machine's
  kernels of its own precision were measured at in the same run (benchmarks.limits), with
  both FLOP counts. `package` maps a name to the loop's (policy, images/s).

  The achieved rate uses TensorFlow's own count of a training step's FLOPs; the count from
  the layers' shapes is kept beside it as a check. Exits with an error where a share is
  above 1: the count or the limit would then be wrong, and no figure of this run is trusted.
  """
  counted = limits["counted_training_flops_per_image"]
  figures = {"training_flops_per_image_counted_by_tensorflow": counted,
             "training_flops_per_image_from_layer_shapes": flops_per_image,
             "package": {name: share_figures(counted, images_per_second, policy, limits)
                         for name, (policy, images_per_second) in package.items()},
             **limits}
  for name, share in figures["package"].items():
    if share["share_of_measured_limit"] > 1:
      sys.exit(f"error: the package's {share['achieved_flops_per_second'] / 1e9:.1f} GFLOP/s "
               f"({name}, {share['precision']}) is above the "
               f"{share['measured_limit_flops_per_second'] / 1e9:.1f} GFLOP/s measured as this "
               f"machine's {share['compute_dtype']} limit: the FLOP count or the limit is "
               f"wrong; nothing written ({json.dumps(figures)})")
  return figures


def best_recipe(runs: Dict[str, Sequence[Optional[float]]],
                candidates: Sequence[str] = PEER_BEST_CANDIDATES) -> str:
  """The candidate recipe with the highest median images/s over its rounds (None: a round
  that failed, left out); on a tie the earlier candidate (the simpler recipe). Exits where
  none has a figure."""
  medians = {name: statistics.median(values) for name in candidates
             if (values := [value for value in runs.get(name, ()) if value is not None])}
  if not medians:
    sys.exit(f"error: no recipe of the PyTorch peer could be measured: {runs}")
  return max(medians, key=lambda name: (medians[name], -list(candidates).index(name)))


def round_ratios(numerators: Sequence[float], denominators: Sequence[float]
                 ) -> Tuple[float, List[float]]:
  """The median of each round's own ratio, and the rounds' ratios: measured in the same
  round, the two share the VM's speed of the moment."""
  if len(numerators) != len(denominators) or not numerators:
    raise ValueError(f"rounds do not pair: {numerators} and {denominators}")
  ratios = [numerator / denominator for numerator, denominator in zip(numerators, denominators)]
  return statistics.median(ratios), ratios


def time_ratio(package: dict, peer: dict) -> Optional[float]:
  """The package's seconds to the bar over the peer's; None unless both reached it."""
  if package.get("step") is None or peer.get("step") is None:
    return None
  return package["seconds"] / peer["seconds"]


def main(_) -> None:
  print("measuring (each in its own process):", file=sys.stderr)
  results = {"dataset": FLAGS.dataset, "machine": platform.node(),
             "bar": {"test_accuracy": FLAGS.target_accuracy,
                     "test_reconstruction_mse": FLAGS.target_mse},
             "settings": {"repeats": FLAGS.repeats, "measure_steps": FLAGS.measure_steps,
                          "recipe_rounds": FLAGS.recipe_rounds,
                          "recipe_measure_steps": FLAGS.recipe_measure_steps,
                          "exercise_max_epochs": FLAGS.exercise_max_epochs}}
  steps = f"--measure_steps={FLAGS.measure_steps}"
  # Removed when this process ends (a failed measurement exits it), at the latest.
  scratch = tempfile.TemporaryDirectory()
  arrays = split_arrays(FLAGS.dataset, scratch.name)

  # The peer's best recipe on this machine: short runs of each candidate, alternating. A
  # candidate that fails here (torch.compile without a C++ compiler, say) is left out.
  candidates = {name: [] for name in PEER_BEST_CANDIDATES}
  for _ in range(FLAGS.recipe_rounds):
    for name in PEER_BEST_CANDIDATES:
      figures = measure("pytorch", "--batch_size=128",
                        f"--measure_steps={FLAGS.recipe_measure_steps}", f"--arrays={arrays}",
                        *PEER_RECIPES[name], required=False)
      candidates[name].append(figures and figures["images_per_second"])
  best = best_recipe(candidates)
  results["pytorch_best_recipe"] = {"recipe": best, "flags": PEER_RECIPES[best],
                                    "candidates_images_per_second": candidates}
  best_flags = PEER_RECIPES[best]

  # The throughputs alternate in rounds, so a drift in the VM's speed reaches each alike. The
  # package at float32 is measured apart only where auto resolves to another policy.
  runs = {"exercise_fit_batch128": [], "package_loop_batch128": [],
          "package_loop_batch128_float32": [], "pytorch_batch128": [],
          "pytorch_best_batch128": []}
  package_precision = None
  for _ in range(FLAGS.repeats):
    runs["exercise_fit_batch128"].append(measure("exercise")["images_per_second"])
    auto = measure("package", "--batch_size=128", steps, "--precision=auto")
    package_precision = {"flag": "auto", "policy": auto["precision"],
                         "reason": auto.get("precision_reason", "")}
    runs["package_loop_batch128"].append(auto["images_per_second"])
    if auto["precision"] == "float32":
      runs["package_loop_batch128_float32"].append(auto["images_per_second"])
    else:
      runs["package_loop_batch128_float32"].append(measure(
          "package", "--batch_size=128", steps, "--precision=float32")["images_per_second"])
    runs["pytorch_batch128"].append(measure(
        "pytorch", "--batch_size=128", steps, f"--arrays={arrays}")["images_per_second"])
    runs["pytorch_best_batch128"].append(measure(
        "pytorch", "--batch_size=128", steps, f"--arrays={arrays}",
        *best_flags)["images_per_second"])
  results["package_precision"] = package_precision
  float32_is_auto = package_precision["policy"] == "float32"
  results["package_float32_is_auto"] = float32_is_auto
  results["throughput_runs"] = runs
  # Like for like, package float32 against eager float32 (as before issue 39); and each at
  # its best on this CPU. Each round's own ratio: their spread says how far to trust them.
  (results["throughput_ratio_vs_pytorch"],
   results["throughput_ratio_vs_pytorch_rounds"]) = round_ratios(
       runs["package_loop_batch128_float32"], runs["pytorch_batch128"])
  (results["throughput_ratio_vs_pytorch_best"],
   results["throughput_ratio_vs_pytorch_best_rounds"]) = round_ratios(
       runs["package_loop_batch128"], runs["pytorch_best_batch128"])
  throughput = {
      "input_pipeline_alone": measure("pipeline")["images_per_second"],
      **{name: statistics.median(values) for name, values in runs.items()},
      "package_loop_batch128_steps_per_loop1": measure(
          "package", "--batch_size=128", "--steps_per_loop=1", "--measure_steps=300",
          "--precision=auto")["images_per_second"],
  }
  results["images_per_second"] = throughput
  # The exercise is float32 (float64 arrays into a float32 model): like for like.
  results["throughput_ratio_vs_exercise"] = (throughput["package_loop_batch128_float32"]
                                             / throughput["exercise_fit_batch128"])

  results["flops"] = flops_figures(
      training_flops_per_image(),
      {"auto": (package_precision["policy"], throughput["package_loop_batch128"]),
       "float32": ("float32", throughput["package_loop_batch128_float32"])},
      measure("limits", "--batch_size=128"))
  shares = results["flops"]["package"]
  results["share_of_measured_limit"] = shares["auto"]["share_of_measured_limit"]
  results["share_of_measured_limit_by_precision"] = {
      share["precision"]: share["share_of_measured_limit"] for share in shares.values()}

  package_tta = measure("package_tta", *PACKAGE_TTA_FLAGS, "--precision=auto")
  if package_tta["step"] is None:
    sys.exit(f"error: the package's recipe ({' '.join(PACKAGE_TTA_FLAGS)}) never reached the "
             f"bar: {reached(package_tta)}")
  exercise_tta = measure("exercise_tta", f"--max_epochs={FLAGS.exercise_max_epochs}")
  results["time_to_accuracy"] = {"package": package_tta, "package_flags": PACKAGE_TTA_FLAGS,
                                 "exercise": exercise_tta}
  # If the exercise's way never reaches the bar, its time is a lower bound, the ratio an upper.
  results["time_to_accuracy_ratio_vs_exercise"] = package_tta["seconds"] / exercise_tta["seconds"]
  results["time_to_accuracy_ratio_is_upper_bound"] = exercise_tta["epochs"] is None
  final_package = measure("package_tta", *PACKAGE_FINAL_FLAGS, "--precision=auto",
                          bar=PACKAGE_FINAL_BAR)
  final = {
      "bar": PACKAGE_FINAL_BAR, "package_flags": PACKAGE_FINAL_FLAGS,
      "package": final_package,
      "package_float32": final_package if float32_is_auto else measure(
          "package_tta", *PACKAGE_FINAL_FLAGS, "--precision=float32", bar=PACKAGE_FINAL_BAR),
      "pytorch": measure("pytorch_tta", *PACKAGE_FINAL_FLAGS, f"--arrays={arrays}",
                         bar=PACKAGE_FINAL_BAR),
      # torch.compile's compilation is in its time: the clock runs from process start.
      "pytorch_best": measure("pytorch_tta", *PACKAGE_FINAL_FLAGS, f"--arrays={arrays}",
                              *best_flags, bar=PACKAGE_FINAL_BAR),
      "pytorch_best_recipe": best}
  results["time_to_final_bar"] = final
  scratch.cleanup()
  for key, package, peer in (("time_to_final_bar_ratio_vs_pytorch", "package_float32", "pytorch"),
                             ("time_to_final_bar_ratio_vs_pytorch_best", "package",
                              "pytorch_best")):
    ratio = time_ratio(final[package], final[peer])
    if ratio is not None:
      results[key] = ratio
  results["startup_seconds"] = measure("startup", "--precision=auto")

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


def _limit_cell(limits: dict, dtype: str) -> str:
  """How one dtype's limit was found: each kernel's rate, GFLOP/s."""
  figures = limits["by_dtype"][dtype]
  sizes = ", ".join(f"{size}: {rate / 1e9:.0f}"
                    for size, rate in figures["matmul_flops_per_second_by_size"].items())
  return (f"the best of square matmuls ({sizes}) and the heaviest convolution, forward "
          f"({figures['convolution_forward_flops_per_second'] / 1e9:.0f}) and forward and "
          f"backward ({figures['convolution_forward_and_backward_flops_per_second'] / 1e9:.0f})")


def table(results: dict) -> str:
  """The figures as a Markdown table."""
  ips = results["images_per_second"]
  tta = results["time_to_accuracy"]
  flops = results["flops"]
  final = results["time_to_final_bar"]
  precision = results["package_precision"]
  policy = precision["policy"]
  best = results["pytorch_best_recipe"]["recipe"]
  cpu = flops["cpu"]
  ratio = lambda key: (f"**{results[key]:.2f}** ({min(results[key + '_rounds']):.2f} to "
                       f"{max(results[key + '_rounds']):.2f})")
  rows = [
      ("input pipeline alone (no model)", f"{ips['input_pipeline_alone']:,.0f} images/s"),
      ("exercise way: float64 arrays into model.fit, batch 128 (median)",
       f"{ips['exercise_fit_batch128']:,.0f} images/s"),
      ("package loop, float32, batch 128 (the job defaults to 64), 50 steps per call (median)",
       f"{ips['package_loop_batch128_float32']:,.0f} images/s"),
      (f"package loop, --precision=auto ({policy}: {precision['reason'] or 'no reason given'}), "
       "batch 128 (median)",
       f"{ips['package_loop_batch128']:,.0f} images/s"
       + (" (the float32 runs)" if results.get("package_float32_is_auto") else "")),
      ("package loop, --precision=auto, batch 128, 1 step per call",
       f"{ips['package_loop_batch128_steps_per_loop1']:,.0f} images/s"),
      ("the same model in plain PyTorch, eager float32 NCHW, batch 128 (median)",
       f"{ips['pytorch_batch128']:,.0f} images/s"),
      (f"PyTorch at its best CPU recipe ({best}), batch 128 (median)",
       f"{ips['pytorch_best_batch128']:,.0f} images/s"),
      ("**throughput ratio, package float32 / exercise (batch 128)**",
       f"**{results['throughput_ratio_vs_exercise']:.2f}**"),
      ("**throughput ratio, package float32 / PyTorch eager float32 (batch 128), median of "
       "the rounds' (range)**", ratio("throughput_ratio_vs_pytorch")),
      (f"**throughput ratio, package at auto ({policy}) / PyTorch at its best ({best}), "
       "median of the rounds' (range)**", ratio("throughput_ratio_vs_pytorch_best")),
      ("training FLOPs per image: TensorFlow's count (layer shapes x3)",
       f"{flops['training_flops_per_image_counted_by_tensorflow'] / 1e6:.1f} MFLOP "
       f"({flops['training_flops_per_image_from_layer_shapes'] / 1e6:.1f})"),
  ]
  for dtype in flops["by_dtype"]:
    rows.append((f"measured limit, {dtype}: {_limit_cell(flops, dtype)}; {cpu['model_name']} "
                 f"family {cpu['family']} model {cpu['model']}, {cpu['logical_cpus']} CPUs",
                 f"{flops['by_dtype'][dtype]['limit_flops_per_second'] / 1e9:.0f} GFLOP/s"))
  shown = set()
  for name, share in flops["package"].items():
    if share["precision"] in shown:
      continue
    shown.add(share["precision"])
    rows.append((f"achieved, package loop {share['precision']} batch 128, of the measured "
                 f"{share['compute_dtype']} limit",
                 f"{share['achieved_flops_per_second'] / 1e9:.1f} GFLOP/s "
                 f"(**{share['share_of_measured_limit']:.0%}** used)"))
  rows += [
      (f"time to test accuracy {results['bar']['test_accuracy']} and MSE "
       f"{results['bar']['test_reconstruction_mse']}, package at auto",
       reached(tta["package"])),
      ("the same, exercise way", exercise_reached(tta["exercise"])),
      ("**time-to-accuracy ratio, package / exercise**",
       f"**{'< ' if results.get('time_to_accuracy_ratio_is_upper_bound') else ''}"
       f"{results['time_to_accuracy_ratio_vs_exercise']:.2f}**"),
      (f"time to test accuracy {final['bar']['test_accuracy']} and MSE "
       f"{final['bar']['test_reconstruction_mse']}, package at auto ({policy}), default recipe "
       f"({' '.join(final['package_flags'])})", reached(final["package"])),
  ]
  if not results.get("package_float32_is_auto"):
    rows.append(("the same, package at float32", reached(final["package_float32"])))
  rows += [
      ("the same, PyTorch peer eager float32, the same recipe", reached(final["pytorch"])),
      (f"the same, PyTorch peer at its best ({best}; compilation counted)",
       reached(final["pytorch_best"])),
      ("**time to that bar, package float32 / PyTorch eager float32**",
       f"**{results['time_to_final_bar_ratio_vs_pytorch']:.2f}**"
       if "time_to_final_bar_ratio_vs_pytorch" in results else "not both reached"),
      ("**time to that bar, package at auto / PyTorch at its best**",
       f"**{results['time_to_final_bar_ratio_vs_pytorch_best']:.2f}**"
       if "time_to_final_bar_ratio_vs_pytorch_best" in results else "not both reached"),
      ("start-up to the first training step",
       f"{results['startup_seconds']['first_step_done']:.1f} s"),
  ]
  return "\n".join(["| measure | value |", "|---|---|"]
                   + [f"| {name} | {value} |" for name, value in rows])


if __name__ == "__main__":
  _define_flags()
  app.run(main)
