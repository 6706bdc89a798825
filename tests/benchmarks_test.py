"""Tests of the benchmark's arithmetic: the FLOP count and the table (no timing here)."""

from benchmarks import run


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
                   + 7 * 7 * 96 * 96 * 9       # decoder convolution at 7x7
                   + 7 * 7 * 96 * 48 * 9       # transposed convolution, per input pixel
                   + 14 * 14 * 48 * 48 * 9     # decoder convolution at 14x14
                   + 14 * 14 * 48 * 48 * 9     # transposed convolution to 28x28
                   + 28 * 28 * 1 * 48 * 9)     # the pixels
  assert run.training_flops_per_image() == 2 * 3 * multiply_adds


def _results() -> dict:
  return {
      "bar": {"test_accuracy": 0.9, "test_reconstruction_mse": 0.015},
      "images_per_second": {"input_pipeline_alone": 1e5, "exercise_fit_batch128": 1000.0,
                            "package_loop_batch128": 1500.0,
                            "package_loop_batch128_steps_per_loop1": 1100.0},
      "throughput_ratio_vs_exercise": 1.5,
      "flops": {"training_flops_per_image": 38.6e6, "achieved_flops_package_default": 54e9,
                "cpus": 2, "fp32_lanes_per_fma": 8, "clock_ghz": 2.4, "peak_flops": 153.6e9,
                "share_of_peak": 0.35},
      "time_to_accuracy": {"package": {"seconds": 60.0, "step": 1500},
                           "exercise": {"seconds": 150.0, "epochs": 4}},
      "time_to_accuracy_ratio_vs_exercise": 0.4,
      "time_to_final_bar": {"bar": {"test_accuracy": 0.93, "test_reconstruction_mse": 0.0098},
                            "package_flags": ["--epochs=5"],
                            "package": {"step": None, "accuracy": 0.9312,
                                        "reconstruction_mse": 0.0101}},
      "startup_seconds": {"first_step_done": 10.0},
  }


def test_table_reports_the_two_ratios():
  table = run.table(_results())
  assert "| **throughput ratio, package / exercise (batch 128)** | **1.50** |" in table
  assert "| **time-to-accuracy ratio, package / exercise** | **0.40** |" in table
  assert "(35% used)" in table and "60 s (step 1500)" in table
  assert ("| time to test accuracy 0.93 and MSE 0.0098, package, default recipe (--epochs=5) | "
          "not reached (ended at accuracy 0.9312, MSE 0.01010) |") in table


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
                                "test_reconstruction_mse": 0.008, "train_images_per_second": 600.0}
          for variant, seed, accuracy in (("no_warmup", 0, 0.92), ("final", 0, 0.93),
                                          ("final", 1, 0.934))}
  lines = levers.table(runs).splitlines()
  assert lines[2] == ("| final | nothing: the default | 2 | 0.9320 ± 0.0028 | 0.00800 ± 0.00000 "
                      "| 600 ± 0 |")
  assert lines[3] == "| no_warmup | no learning-rate warm-up | 1 | 0.9200 | 0.00800 | 600 |"
