"""Tests of the benchmark's arithmetic: the FLOP count and the table (no timing here)."""

from benchmarks import run


def test_training_flops_are_counted_from_the_layer_shapes():
  multiply_adds = (28 * 28 * 32 * 1 * 9        # encoder conv 1 (same padding)
                   + 14 * 14 * 64 * 32 * 9     # encoder conv 2, after pooling
                   + 3136 * 256                # latent
                   + 256 * 128 + 128 * 10      # classifier head
                   + 256 * 3136                # decoder dense
                   + 7 * 7 * 64 * 32 * 9       # transposed conv 1, per input pixel
                   + 14 * 14 * 32 * 1 * 9)     # transposed conv 2
  assert run.training_flops_per_image() == 2 * 3 * multiply_adds


def test_table_reports_the_two_ratios():
  results = {
      "bar": {"test_accuracy": 0.9, "test_reconstruction_mse": 0.015},
      "images_per_second": {"input_pipeline_alone": 1e5, "exercise_fit_batch128": 1000.0,
                            "package_loop_batch128": 1500.0,
                            "package_loop_batch128_steps_per_loop1": 1100.0,
                            "package_loop_batch64_default": 1400.0},
      "throughput_ratio_vs_exercise": 1.5,
      "flops": {"training_flops_per_image": 38.6e6, "achieved_flops_package_default": 54e9,
                "cpus": 2, "fp32_lanes_per_fma": 8, "clock_ghz": 2.4, "peak_flops": 153.6e9,
                "share_of_peak": 0.35},
      "time_to_accuracy": {"package": {"seconds": 60.0, "step": 1500},
                           "exercise": {"seconds": 150.0, "epochs": 4}},
      "time_to_accuracy_ratio_vs_exercise": 0.4,
      "startup_seconds": {"first_step_done": 10.0},
  }
  table = run.table(results)
  assert "| **throughput ratio, package / exercise (batch 128)** | **1.50** |" in table
  assert "| **time-to-accuracy ratio, package / exercise** | **0.40** |" in table
  assert "(35% used)" in table and "60 s (step 1500)" in table
