"""Helpers shared by the tests: small learnable data, and running the job as a user would."""

import gzip
import json
import os
import subprocess
import sys

import numpy as np

from trainer import data

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"


def learnable_split(n: int, seed: int = 0) -> data.Split:
  """Noise images where each class lights up its own patch: a few steps learn it."""
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, 10, n).astype(np.int32)
  images = rng.integers(0, 40, (n, 28, 28, 1)).astype(np.uint8)
  for i, label in enumerate(labels):
    row, col = divmod(int(label), 5)
    images[i, 4 + 10 * row:12 + 10 * row, 1 + 5 * col:6 + 5 * col] = 255
  return data.Split(images, labels)


def learnable_splits(train: int = 512, validation: int = 100, test: int = 100) -> data.Splits:
  return data.Splits(learnable_split(train, 0), learnable_split(validation, 1),
                     learnable_split(test, 2))


def _environment(env=None) -> dict:
  return {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **(env or {})}


def run_module(module: str, *args, env=None, timeout=600):
  """Runs `python -m MODULE ARGS` from the repository, as a user would; returns the
  CompletedProcess, with its output as text."""
  return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=_environment(env),
                        capture_output=True, text=True, timeout=timeout)


def run_trainer(*flags, env=None, timeout=600):
  """Runs `python -m trainer.task FLAGS`; returns the CompletedProcess."""
  return run_module("trainer.task", *flags, env=env, timeout=timeout)


def start_trainer(log_path, *flags, env=None) -> subprocess.Popen:
  """Starts `python -m trainer.task FLAGS` in the background, its output going to `log_path`."""
  with open(log_path, "w") as log:
    return subprocess.Popen([sys.executable, "-m", "trainer.task", *flags], cwd=REPO,
                            env=_environment(env), stdout=log, stderr=subprocess.STDOUT)


def start_workers(log_dir, prefix: str, *flags, workers: int = 2) -> list:
  """Starts the workers of one multi-worker cluster on loopback, each told its place by
  $TF_CONFIG; worker N logs to log_dir/PREFIX-workerN.log. Returns their processes."""
  import portpicker  # Only the multi-worker tests need it.
  cluster = {"worker": [f"localhost:{portpicker.pick_unused_port()}" for _ in range(workers)]}
  return [start_trainer(os.path.join(log_dir, f"{prefix}-worker{index}.log"), *flags, env={
      "TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})})
          for index in range(workers)]


def without_timing(metrics: dict) -> dict:
  """`metrics` less what differs between two runs of the same computation: speed, settings."""
  return {k: v for k, v in metrics.items() if k not in ("train_images_per_second", "config")}


def read_metrics(model_dir: str) -> dict:
  with open(os.path.join(model_dir, "metrics.json")) as f:
    return json.load(f)


def write_npz(path, **arrays) -> str:
  """Writes `arrays` to an npz file; returns the --dataset value that names it."""
  np.savez(path, **arrays)
  return f"npz:{path}"


def idx_bytes(array, magic: int) -> bytes:
  """`array` in the IDX format, under the given magic number."""
  header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
  return header + array.astype(np.uint8).tobytes()


def write_idx_dir(directory, gzipped: bool, train: int = 60, test: int = 20, **overrides) -> str:
  """Writes the four MNIST IDX files (any replaced by `overrides`); returns the --dataset value."""
  files = {
      "train-images-idx3-ubyte": idx_bytes(np.full((train, 28, 28), 7), 0x803),
      "train-labels-idx1-ubyte": idx_bytes(np.arange(train) % 10, 0x801),
      "t10k-images-idx3-ubyte": idx_bytes(np.full((test, 28, 28), 9), 0x803),
      "t10k-labels-idx1-ubyte": idx_bytes(np.arange(test) % 10, 0x801),
  }
  files.update(overrides)
  for name, raw in files.items():
    if gzipped:
      (directory / (name + ".gz")).write_bytes(gzip.compress(raw))
    else:
      (directory / name).write_bytes(raw)
  return f"idx:{directory}"


def error_lines(stderr: str) -> list:
  """The `error: ...` lines of a command's standard error (TensorFlow logs there too)."""
  return [line for line in stderr.splitlines() if line.startswith("error: ")]
