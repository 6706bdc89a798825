"""Helpers shared by the tests: small learnable data, and running the job as a user would."""

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
