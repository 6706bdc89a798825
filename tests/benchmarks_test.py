"""Tests of the benchmark's arithmetic: the FLOP count and the table (no timing here)."""

import json
import subprocess
import sys

import numpy as np
import pytest

from benchmarks import limits
from benchmarks import run
from trainer.multitask.model import build_model


def test_training_flops_are_counted_from_the_layer_shapes():
  # The default model: --width=48, --latent_dim=256.
  multiply_adds = (28 * 28 * 48 * 1 * 9        # encoder, full resolution (same padding)
                   + 14 * 14 * 96 * 48 * 9     # encoder, after pooling: two convolutions
                   + 14 * 14 * 96 * 96 * 9
                   + 7 * 7 * 192 * 96 * 9      # encoder, after pooling again: two more
                   + 7 * 7 * 192 * 192 * 9
                   + 9408 * 256                # latent
                   + 256 * 128 + 128 * 10      # classifier head
                   + 256 * 4704                # decoder dense, to 7x7x96
                   + 7 * 7 * 96 * 48 * 9       # transposed convolution, per input pixel
                   + 14 * 14 * 48 * 1 * 9)     # transposed, to the pixels at 28x28
  assert run.training_flops_per_image() == 2 * 3 * multiply_adds


def _limits(matmul=150e9, forward=120e9, forward_and_backward=154e9, counted=38.6e6) -> dict:
  """What benchmarks.limits measures, as `measure limits` reports it: float32 alone."""
  return {"cpu": {"model_name": "AMD EPYC", "family": "25", "model": "1", "logical_cpus": 2},
          "heaviest_convolution": {"height": 14, "width": 14, "channels": 96, "filters": 96,
                                   "kernel": 3, "batch": 128},
          "by_dtype": {"float32": {
              "matmul_flops_per_second_by_size": {"2048": matmul},
              "matmul_flops_per_second": matmul,
              "convolution_forward_flops_per_second": forward,
              "convolution_forward_and_backward_flops_per_second": forward_and_backward,
              "limit_flops_per_second": max(matmul, forward, forward_and_backward)}},
          "counted_training_flops_per_image": counted}


def test_the_share_is_of_the_best_rate_measured_and_above_1_fails_the_run(capsys):
  figures = run.flops_figures(38.0e6, {"float32": ("float32", 1000.0)}, _limits(counted=38.6e6))
  share = figures["package"]["float32"]
  assert share["measured_limit_flops_per_second"] == 154e9  # The best of the three.
  assert share["achieved_flops_per_second"] == 38.6e6 * 1000.0  # TensorFlow's count.
  assert abs(share["share_of_measured_limit"] - 38.6e9 / 154e9) < 1e-12
  with pytest.raises(SystemExit) as exited:
    run.flops_figures(38.0e6, {"float32": ("float32", 5000.0)},  # 193 GFLOP/s of 154.
                      _limits(counted=38.6e6))
  assert "above the 154.0 GFLOP/s measured as this machine's float32 limit" in str(exited.value)


def _results() -> dict:
  """An AVX2-only machine's: auto resolved to float32, so the float32 runs are auto's."""
  eager, _ = run.PEER_BEST_CANDIDATES
  return {
      "bar": {"test_accuracy": 0.9, "test_reconstruction_mse": 0.015},
      "images_per_second": {"input_pipeline_alone": 1e5, "exercise_fit_batch128": 1000.0,
                            "package_loop_batch128": 1500.0,
                            "package_loop_batch128_float32": 1500.0,
                            "package_loop_batch128_steps_per_loop1": 1100.0,
                            "pytorch_batch128": 1200.0, "pytorch_best_batch128": 1300.0},
      "package_precision": {"flag": "auto", "policy": "float32",
                            "reason": "bfloat16 would be emulated (AVX2 only)"},
      "package_float32_is_auto": True,
      "pytorch_best_recipe": {"recipe": eager, "flags": run.PEER_RECIPES[eager]},
      "throughput_ratio_vs_exercise": 1.5,
      "throughput_ratio_vs_pytorch": 1.25, "throughput_ratio_vs_pytorch_rounds": [1.3, 1.25, 1.1],
      "throughput_ratio_vs_pytorch_best": 1.15,
      "throughput_ratio_vs_pytorch_best_rounds": [1.2, 1.15, 1.0],
      "flops": run.flops_figures(38.6e6, {"auto": ("float32", 1400.0),
                                          "float32": ("float32", 1400.0)}, _limits()),
      "time_to_accuracy": {"package": {"seconds": 60.0, "step": 1500},
                           "exercise": {"seconds": 150.0, "epochs": 4}},
      "time_to_accuracy_ratio_vs_exercise": 0.4,
      "time_to_final_bar": {"bar": {"test_accuracy": 0.93, "test_reconstruction_mse": 0.0098},
                            "package_flags": ["--epochs=5"],
                            "package": {"step": None, "accuracy": 0.9312,
                                        "reconstruction_mse": 0.0101},
                            "pytorch": {"seconds": 700.0, "step": 3900, "accuracy": 0.931,
                                        "reconstruction_mse": 0.0097},
                            "pytorch_best": {"seconds": 650.0, "step": 3900}},
      "startup_seconds": {"first_step_done": 10.0},
  }


def test_table_reports_the_two_ratios():
  table = run.table(_results())
  assert "| **throughput ratio, package float32 / exercise (batch 128)** | **1.50** |" in table
  assert "| **time-to-accuracy ratio, package / exercise** | **0.40** |" in table
  assert "eager float32 (batch 128), median of the rounds' (range)** | **1.25** (1.10 to 1.30) |" in table
  assert ("| **throughput ratio, package at auto (float32) / PyTorch at its best "
          "(autocast_bfloat16+channels_last), median of the rounds' (range)** | **1.15** "
          "(1.00 to 1.20) |") in table
  assert "(**35% used**)" not in table and "(**35%** used)" in table and "60 s (step 1500)" in table
  assert table.count("of the measured float32 limit") == 1  # auto is float32 here: one row.
  assert ("| time to test accuracy 0.93 and MSE 0.0098, package at auto (float32), default "
          "recipe (--epochs=5) | not reached (ended at accuracy 0.9312, MSE 0.01010) |") in table
  assert "package at float32 |" not in table  # The same run as auto's.
  assert "| the same, PyTorch peer eager float32, the same recipe | 700 s (step 3900) |" in table
  assert ("| the same, PyTorch peer at its best (autocast_bfloat16+channels_last; compilation "
          "counted) | 650 s (step 3900) |") in table
  assert "| **time to that bar, package float32 / PyTorch eager float32** | not both reached |" in table


def test_table_gives_the_time_to_the_final_bar_against_pytorch():
  results = _results()
  results["time_to_final_bar"]["package"] = {"seconds": 560.0, "step": 3510}
  results["time_to_final_bar_ratio_vs_pytorch"] = 560.0 / 700.0
  assert ("| **time to that bar, package float32 / PyTorch eager float32** | **0.80** |"
          in run.table(results))


def test_table_marks_the_ratio_as_a_bound_when_the_exercise_never_reaches_the_bar():
  results = _results()
  results["time_to_accuracy"]["exercise"] = {"seconds": 1600.0, "epochs": None,
                                             "accuracy": 0.921, "reconstruction_mse": 0.0164}
  results["time_to_accuracy_ratio_vs_exercise"] = 60.0 / 1600.0
  results["time_to_accuracy_ratio_is_upper_bound"] = True
  table = run.table(results)
  assert "| **time-to-accuracy ratio, package / exercise** | **< 0.04** |" in table
  assert ("| the same, exercise way | not reached in 1600 s (ended at accuracy 0.9210, "
          "MSE 0.01640) |") in table


def test_semi_supervised_table_gives_mean_and_spread_over_seeds():
  from benchmarks import semi_supervised
  runs = {}
  for seed, (alone, multitask) in enumerate([(0.60, 0.70), (0.62, 0.72), (0.64, 0.74)]):
    for method, accuracy in (("classifier_only", alone), ("multitask_fixed", multitask)):
      runs[semi_supervised.run_key(100, method, seed)] = {
          "labeled_examples_flag": 100, "method": method, "test_accuracy": accuracy,
          "seconds": 100.0 + seed}
  runs[semi_supervised.run_key(0, "classifier_only", 0)] = {
      "labeled_examples_flag": 0, "method": "classifier_only", "test_accuracy": 0.9,
      "seconds": 90.0}
  lines = semi_supervised.table(runs).splitlines()
  assert lines[0] == "| labelled examples | classifier_only | multitask_fixed |"
  assert lines[2] == "| 100 | 0.6200 ± 0.0200 (n=3, 101 s) | 0.7200 ± 0.0200 (n=3, 101 s) |"
  assert lines[3] == "| all | 0.9000 ± 0.0000 (n=1, 90 s) |  |"


def test_levers_table_gives_each_variants_mean_and_spread_in_the_variants_order():
  from benchmarks import levers
  runs = {f"{variant}/{seed}": {"variant": variant, "seed": seed, "test_accuracy": accuracy,
                                "test_reconstruction_mse": 0.008, "train_images_per_second": 600.0,
                                "seconds_to_bar": seconds, "step_to_bar": step}
          for variant, seed, accuracy, seconds, step in (
              ("no_warmup", 0, 0.92, None, None), ("final", 0, 0.93, 500.0, 3000),
              ("final", 1, 0.934, 600.0, 3200), ("final", 2, 0.929, None, None))}
  runs["no_shift/0"] = {"variant": "no_shift", "seed": 0, "test_accuracy": 0.94,
                        "test_reconstruction_mse": 0.009, "train_images_per_second": 700.0}
  lines = levers.table(runs).splitlines()
  assert lines[2] == ("| final | nothing: the default | 3 | 0.9310 ± 0.0026 | 0.00800 ± 0.00000 "
                      "| 600 ± 0 | 550 ± 71 (3100), 2 of 3 seeds | 2 of 3 |")
  assert lines[3] == ("| no_warmup | no learning-rate warm-up | 1 | 0.9200 | 0.00800 | 600 "
                      "| not reached | 0 of 1 |")
  # A run from before the time to the bar was recorded.
  assert lines[4] == ("| no_shift | no shift augmentation | 1 | 0.9400 | 0.00900 | 700 "
                      "| not measured | 1 of 1 |")


def test_the_heaviest_convolution_is_found_and_tensorflow_counts_what_the_shapes_say():
  model = build_model(16, 8)
  assert limits.heaviest_convolution(model) == dict(height=14, width=14, channels=16,
                                                    filters=16, kernel=3)
  counted = limits.counted_training_flops(model, batch=4)
  # TensorFlow's count adds the small ops (activations, pooling, the loss) to the shapes'.
  assert 1.0 <= counted / run.training_flops_per_image(16, 8) < 1.05


def test_the_cpu_is_described_with_its_family_and_vector_flags():
  cpu = limits.cpu_description()
  assert cpu["logical_cpus"] >= 1 and isinstance(cpu["vector_flags"], list)


# Issue 39: each precision's limit, the peer's best recipe, the ratios, the package's policy.

def _dtype_limits(matmul=150e9, forward=120e9, forward_and_backward=154e9) -> dict:
  return {"matmul_flops_per_second_by_size": {"1024": matmul * 0.9, "2048": matmul},
          "matmul_flops_per_second": matmul,
          "convolution_forward_flops_per_second": forward,
          "convolution_forward_and_backward_flops_per_second": forward_and_backward,
          "limit_flops_per_second": max(matmul, forward, forward_and_backward)}


def _precision_limits(counted=38.6e6) -> dict:
  """float32 kernels at 150 to 154 GFLOP/s, bfloat16 ones (emulated, say) at 60 to 80."""
  return {"cpu": {"model_name": "AMD EPYC", "family": "25", "model": "1", "logical_cpus": 2},
          "heaviest_convolution": {"height": 14, "width": 14, "channels": 96, "filters": 96,
                                   "kernel": 3, "batch": 128},
          "by_dtype": {"float32": _dtype_limits(),
                       "bfloat16": _dtype_limits(matmul=80e9, forward=60e9,
                                                 forward_and_backward=70e9)},
          "counted_training_flops_per_image": counted}


def test_each_share_is_of_the_limit_of_its_own_precision():
  figures = run.flops_figures(38.0e6, {"auto": ("mixed_bfloat16", 1000.0),
                                       "float32": ("float32", 2000.0)}, _precision_limits())
  auto, float32 = figures["package"]["auto"], figures["package"]["float32"]
  assert auto["compute_dtype"] == "bfloat16" and float32["compute_dtype"] == "float32"
  assert auto["measured_limit_flops_per_second"] == 80e9  # bfloat16's best: its matmul.
  assert float32["measured_limit_flops_per_second"] == 154e9
  assert auto["share_of_measured_limit"] == pytest.approx(38.6e9 / 80e9)
  assert float32["share_of_measured_limit"] == pytest.approx(77.2e9 / 154e9)


def test_a_share_above_1_of_its_own_precisions_limit_fails_the_run():
  # 3000 images/s in bfloat16 is 116 GFLOP/s: under float32's limit, above bfloat16's 80.
  with pytest.raises(SystemExit) as exited:
    run.flops_figures(38.0e6, {"auto": ("mixed_bfloat16", 3000.0)}, _precision_limits())
  assert "above the 80.0 GFLOP/s measured as this machine's bfloat16 limit" in str(exited.value)


def test_the_best_recipe_is_the_candidate_with_the_higher_median():
  eager, compiled = run.PEER_BEST_CANDIDATES
  assert run.best_recipe({eager: [600.0, 650.0], compiled: [560.0, 640.0]}) == eager
  assert run.best_recipe({eager: [600.0, 650.0], compiled: [700.0, 640.0]}) == compiled
  # A tie keeps the simpler recipe; a failed round (None) is left out, a failed recipe too.
  assert run.best_recipe({eager: [600.0], compiled: [600.0]}) == eager
  assert run.best_recipe({eager: [600.0, None], compiled: [None, None]}) == eager
  with pytest.raises(SystemExit):
    run.best_recipe({eager: [None], compiled: [None]})


def test_the_peer_recipes_are_the_options_measure_pytorch_takes():
  assert run.PEER_RECIPES[run.PEER_EAGER] == ()
  for name in run.PEER_BEST_CANDIDATES:
    options = run.PEER_RECIPES[name]
    assert {"--channels_last", "--autocast_bfloat16"} <= set(options)
    assert ("--compile" in options) == name.endswith("+compile")


def test_ratios_are_the_median_of_each_rounds_own():
  median, rounds = run.round_ratios([640.0, 660.0, 600.0], [600.0, 550.0, 600.0])
  assert rounds == pytest.approx([640 / 600, 1.2, 1.0]) and median == pytest.approx(640 / 600)
  with pytest.raises(ValueError):
    run.round_ratios([1.0, 2.0], [1.0])


def test_the_time_ratio_needs_both_to_reach_the_bar():
  assert run.time_ratio({"seconds": 500.0, "step": 3500},
                        {"seconds": 625.0, "step": 3640}) == pytest.approx(0.8)
  assert run.time_ratio({"seconds": 500.0, "step": None}, {"seconds": 625.0, "step": 3640}) is None


def _precision_results() -> dict:
  results = _results()
  eager, compiled = run.PEER_BEST_CANDIDATES
  results["images_per_second"].update(package_loop_batch128=1500.0,
                                      package_loop_batch128_float32=1200.0,
                                      pytorch_best_batch128=1250.0)
  results.update(
      package_precision={"flag": "auto", "policy": "mixed_bfloat16",
                         "reason": "the CPU computes bfloat16 natively (avx512_bf16)"},
      package_float32_is_auto=False,
      pytorch_best_recipe={"recipe": compiled, "flags": run.PEER_RECIPES[compiled]},
      throughput_ratio_vs_pytorch_best=1.2, throughput_ratio_vs_pytorch_best_rounds=[1.2, 1.15],
      flops=run.flops_figures(38.0e6, {"auto": ("mixed_bfloat16", 1500.0),
                                       "float32": ("float32", 1200.0)}, _precision_limits()))
  results["time_to_final_bar"].update(
      package={"seconds": 560.0, "step": 3510}, package_float32={"seconds": 700.0, "step": 3510},
      pytorch_best={"seconds": 800.0, "step": 3640})
  results["time_to_final_bar_ratio_vs_pytorch_best"] = 0.7
  return results


def test_table_reports_both_frameworks_at_their_best_and_each_precisions_share():
  table = run.table(_precision_results())
  assert ("| package loop, --precision=auto (mixed_bfloat16: the CPU computes bfloat16 natively "
          "(avx512_bf16)), batch 128 (median) | 1,500 images/s |") in table
  assert ("| PyTorch at its best CPU recipe (autocast_bfloat16+channels_last+compile), batch 128 "
          "(median) | 1,250 images/s |") in table
  assert "(median of the rounds' (range)** | **1.20** (1.15 to 1.20) |" in table.replace(
      "autocast_bfloat16+channels_last+compile), ", "(")
  assert "of the measured bfloat16 limit | 57.9 GFLOP/s (**72%** used) |" in table
  assert "of the measured float32 limit | 46.3 GFLOP/s (**30%** used) |" in table
  assert "| measured limit, bfloat16: the best of square matmuls (1024: 72, 2048: 80)" in table
  assert "| the same, package at float32 | 700 s (step 3510) |" in table
  assert "| **time to that bar, package at auto / PyTorch at its best** | **0.70** |" in table
  assert ("| **time to that bar, package float32 / PyTorch eager float32** | not both "
          "reached |") in table


def test_a_limit_is_measured_in_bfloat16_too_and_is_the_best_of_its_kernels(monkeypatch):
  monkeypatch.setattr(limits, "REPEATS", 1)
  monkeypatch.setattr(limits, "SECONDS_PER_REPEAT", 0.01)
  shape = dict(height=7, width=7, channels=8, filters=8, kernel=3)
  figures = limits.dtype_limits(shape, batch=2, dtype="bfloat16", sizes=(64, 128))
  assert set(figures["matmul_flops_per_second_by_size"]) == {"64", "128"}
  assert figures["matmul_flops_per_second"] == max(
      figures["matmul_flops_per_second_by_size"].values())
  assert figures["limit_flops_per_second"] == max(
      figures["matmul_flops_per_second"], figures["convolution_forward_flops_per_second"],
      figures["convolution_forward_and_backward_flops_per_second"]) > 0


def _narrow(tmp_path, precision: str, **settings):
  from trainer.config import TrainConfig
  return TrainConfig(dataset="mnist_sample", model_dir=str(tmp_path / "run"), batch_size=32,
                     latent_dim=16, width=8, steps_per_loop=2, precision=precision, **settings)


@pytest.mark.parametrize("precision, policy, dtype", [("mixed_bfloat16", "mixed_bfloat16",
                                                       "bfloat16"),
                                                      ("float32", "float32", "float32")])
def test_measure_builds_the_package_loop_under_the_precision(tmp_path, precision, policy, dtype):
  import keras
  import tensorflow as tf
  from benchmarks import measure
  from tests import helpers
  task, loop, batches, resolved = measure._package_loop(
      _narrow(tmp_path, precision), helpers.learnable_splits(train=128),
      tf.distribute.get_strategy())
  assert resolved.policy == policy and resolved.reason
  assert keras.mixed_precision.dtype_policy().name == policy  # Set before the build.
  assert measure._precision_figures(resolved, task.config) == {
      "precision": policy, "precision_reason": resolved.reason, "precision_flag": precision}
  encoder = task.model.get_layer("encoder")
  convolutions = [layer for layer in encoder.layers if isinstance(layer, keras.layers.Conv2D)]
  assert convolutions and {layer.compute_dtype for layer in convolutions} == {dtype}
  assert {layer.variable_dtype for layer in convolutions} == {"float32"}


def test_measure_refuses_an_unknown_precision():
  result = subprocess.run([sys.executable, "-m", "benchmarks.measure", "package",
                           "--precision=float8"], capture_output=True, text=True, timeout=120,
                          cwd=run.REPO)
  assert result.returncode != 0 and "--precision" in result.stderr


def test_auto_resolves_as_the_job_resolves_it(tmp_path):
  import tensorflow as tf
  from benchmarks import precision
  from trainer.job import distribution
  strategy = tf.distribute.get_strategy()
  resolved = precision.configure(_narrow(tmp_path, "auto"), strategy)
  assert resolved == distribution.resolve_precision("auto", strategy)
  assert precision.compute_dtype(resolved.policy) in ("float32", "bfloat16")


def test_checkpoint_cost_builds_and_saves_under_the_precision(tmp_path):
  import tensorflow as tf
  from benchmarks import checkpoint_cost, precision
  from tests import helpers
  config = _narrow(tmp_path, "mixed_bfloat16")
  resolved = precision.configure(config, tf.distribute.get_strategy())
  task, seconds, checkpoint_bytes = checkpoint_cost.timed_saves(
      config, helpers.learnable_splits(train=96), resolved.policy, saves=2)
  assert resolved.policy == "mixed_bfloat16" and task.model.compute_dtype == "bfloat16"
  assert len(seconds) == 2 and checkpoint_bytes > 0


@pytest.mark.slow  # Trains an epoch of the narrow model and exports it: about 13 s.
def test_checkpoint_cost_trains_and_saves_under_the_precision(tmp_path):
  from benchmarks import checkpoint_cost
  from tests import helpers
  figures = checkpoint_cost.checkpoint_cost(
      _narrow(tmp_path, "mixed_bfloat16", epochs=1, warmup_steps=0, report=False),
      helpers.learnable_splits(train=96, validation=32, test=32), saves=2)
  assert figures["precision"] == "mixed_bfloat16" and figures["precision_reason"]
  assert figures["compute_dtype"] == "bfloat16" and figures["precision_flag"] == "mixed_bfloat16"
  assert figures["steps_per_epoch"] == 3 and figures["checkpoint_megabytes"] > 0


@pytest.mark.slow  # A process of its own that traces the narrow loop: about 6 s.
def test_measure_package_reports_the_resolved_precision(tmp_path):
  from tests import helpers
  # Forked from a process that has imported TensorFlow: `measure` sets the precision once per
  # process, which the fork still is, and its start-up is not what this test is about.
  result = helpers.run_command_forked(
      "benchmarks.measure", "package", "--dataset=mnist_sample", "--precision=mixed_bfloat16",
      "--width=8", "--latent_dim=16", "--batch_size=32", "--steps_per_loop=2",
      "--measure_steps=4", timeout=300)
  assert result.returncode == 0, result.stderr
  (line,) = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
  figures = json.loads(line[len("RESULT "):])
  assert figures["precision"] == "mixed_bfloat16" and figures["precision_flag"] == "mixed_bfloat16"
  assert figures["images_per_second"] > 0
