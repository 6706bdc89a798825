"""Tests of the benchmark's arithmetic: the FLOP count and the table (no timing here)."""

import pytest

from benchmarks import limits
from benchmarks import run
from trainer.model import build_model


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
  """What benchmarks.limits measures, as `measure limits` reports it."""
  return {"cpu": {"model_name": "AMD EPYC", "family": "25", "model": "1", "logical_cpus": 2},
          "matmul_size": 2048, "matmul_flops_per_second": matmul,
          "heaviest_convolution": {"forward_flops_per_second": forward,
                                   "forward_and_backward_flops_per_second":
                                       forward_and_backward},
          "counted_training_flops_per_image": counted}


def test_the_share_is_of_the_best_rate_measured_and_above_1_fails_the_run(capsys):
  figures = run.flops_figures(38.0e6, 1000.0, _limits(counted=38.6e6))
  assert figures["measured_limit_flops_per_second"] == 154e9  # The best of the three.
  assert figures["achieved_flops_per_second"] == 38.6e6 * 1000.0  # TensorFlow's count.
  assert abs(figures["share_of_measured_limit"] - 38.6e9 / 154e9) < 1e-12
  with pytest.raises(SystemExit) as exited:
    run.flops_figures(38.0e6, 5000.0, _limits(counted=38.6e6))  # 193 GFLOP/s of 154.
  assert "above the 154.0 GFLOP/s measured as this machine's limit" in str(exited.value)


def _results() -> dict:
  return {
      "bar": {"test_accuracy": 0.9, "test_reconstruction_mse": 0.015},
      "images_per_second": {"input_pipeline_alone": 1e5, "exercise_fit_batch128": 1000.0,
                            "package_loop_batch128": 1500.0,
                            "package_loop_batch128_steps_per_loop1": 1100.0,
                            "pytorch_batch128": 1200.0},
      "throughput_ratio_vs_exercise": 1.5,
      "throughput_ratio_vs_pytorch": 1.25, "throughput_ratio_vs_pytorch_rounds": [1.3, 1.25, 1.1],
      "flops": run.flops_figures(38.6e6, 1400.0, _limits()),
      "time_to_accuracy": {"package": {"seconds": 60.0, "step": 1500},
                           "exercise": {"seconds": 150.0, "epochs": 4}},
      "time_to_accuracy_ratio_vs_exercise": 0.4,
      "time_to_final_bar": {"bar": {"test_accuracy": 0.93, "test_reconstruction_mse": 0.0098},
                            "package_flags": ["--epochs=5"],
                            "package": {"step": None, "accuracy": 0.9312,
                                        "reconstruction_mse": 0.0101},
                            "pytorch": {"seconds": 700.0, "step": 3900, "accuracy": 0.931,
                                        "reconstruction_mse": 0.0097}},
      "startup_seconds": {"first_step_done": 10.0},
  }


def test_table_reports_the_two_ratios():
  table = run.table(_results())
  assert "| **throughput ratio, package / exercise (batch 128)** | **1.50** |" in table
  assert "| **time-to-accuracy ratio, package / exercise** | **0.40** |" in table
  assert "(range)** | **1.25** (1.10 to 1.30) |" in table
  assert "(**35% used**)" not in table and "(**35%** used)" in table and "60 s (step 1500)" in table
  assert ("| time to test accuracy 0.93 and MSE 0.0098, package, default recipe (--epochs=5) | "
          "not reached (ended at accuracy 0.9312, MSE 0.01010) |") in table
  assert "| the same, PyTorch peer, the same recipe | 700 s (step 3900) |" in table
  assert "| **time to that bar, package / PyTorch** | not both reached |" in table


def test_table_gives_the_time_to_the_final_bar_against_pytorch():
  results = _results()
  results["time_to_final_bar"]["package"] = {"seconds": 560.0, "step": 3510}
  results["time_to_final_bar_ratio_vs_pytorch"] = 560.0 / 700.0
  assert "| **time to that bar, package / PyTorch** | **0.80** |" in run.table(results)


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
