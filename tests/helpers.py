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


def run_trainer(*flags, env=None, timeout=600):
  """Runs `python -m trainer.task FLAGS` from the repository; returns the CompletedProcess."""
  return subprocess.run([sys.executable, "-m", "trainer.task", *flags], cwd=REPO,
                        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **(env or {})},
                        capture_output=True, text=True, timeout=timeout)


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
