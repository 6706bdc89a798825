"""What to pip-install for each platform, from the one list in setup.py.

CPU and GPU hosts install the package as it is (TensorFlow 2.21). TPU hosts need TensorFlow's
TPU build, whose newest release is 2.20: they install it, then the package without its
dependencies, then the rest of them from the package's metadata, less TensorFlow and the
TensorBoard matched to it (tensorflow-tpu brings its own).

    python -m launch.requirements tpu     # prints the pip arguments for a TPU host
"""

import importlib.metadata
import re
import shlex
import sys
from typing import List

DISTRIBUTION = "mnist-multitask-trainer"
# The TPU pair: TensorFlow's TPU build and the index that holds the libtpu it was built with.
TPU_TENSORFLOW = "tensorflow-tpu==2.20.0"
LIBTPU_INDEX = "https://storage.googleapis.com/libtpu-tf-releases/index.html"
_REPLACED_ON_TPU = {"tensorflow", "tensorboard"}


def core_requirements(extra: str = "") -> List[str]:
  """The package's requirements as setup.py declares them, and those of `extra` if given."""
  requirements = importlib.metadata.requires(DISTRIBUTION) or []
  wanted = {""} | ({f'extra == "{extra}"'} if extra else set())
  return [r.split(";")[0].strip() for r in requirements
          if (r.split(";")[1].strip() if ";" in r else "") in wanted]


def wheel_name() -> str:
  """The file name `pip wheel` gives the package's wheel."""
  version = importlib.metadata.version(DISTRIBUTION)
  return f"{DISTRIBUTION.replace('-', '_')}-{version}-py3-none-any.whl"


def _name(requirement: str) -> str:
  return re.match(r"[A-Za-z0-9_.\-]+", requirement).group(0).lower()


def tpu_pip_arguments() -> List[str]:
  """`pip install` arguments for a TPU host, once the package itself is in (`--no-deps`).

  The `tuning` extra is included: TPU jobs report to hyperparameter tuning like the others.
  """
  rest = [r for r in core_requirements("tuning") if _name(r) not in _REPLACED_ON_TPU]
  return ["-f", LIBTPU_INDEX, TPU_TENSORFLOW, *rest]


if __name__ == "__main__":
  if sys.argv[1:] != ["tpu"]:
    sys.exit("usage: python -m launch.requirements tpu")
  print(shlex.join(tpu_pip_arguments()))
