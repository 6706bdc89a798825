"""Tests of trainer.job.run_directory: one module names the run directory's files and folders.

The faults of a run directory (damaged and missing files) are tests/run_directory_faults_test.py.
"""

import ast
import pathlib
import re
import subprocess
import sys

import pytest

from trainer.job import run_directory

REPO = pathlib.Path(__file__).resolve().parent.parent
# The names the issue lists, and the rest that live under --model_dir.
NAMES = ("metrics.json", "config.json", "history.json", "lease.json", "export", "checkpoints",
         "tuning_evaluations.json", "report.md", "model.keras", "saved_model.pb")


def test_every_path_of_a_run_is_under_its_model_dir_or_the_given_folders():
  run = run_directory.of("gs://bucket/runs/a/")
  assert (run.metrics, run.config, run.export, run.keras_file, run.checkpoints, run.logs) == (
      "gs://bucket/runs/a/metrics.json", "gs://bucket/runs/a/config.json",
      "gs://bucket/runs/a/export", "gs://bucket/runs/a/export/model.keras",
      "gs://bucket/runs/a/checkpoints", "gs://bucket/runs/a/logs")
  moved = run_directory.RunDirectory("/runs/a", checkpoint_dir="/ckpt", tensorboard_dir="/tb")
  assert (moved.checkpoints, moved.own_checkpoints, moved.tensorboard_run("train")) == (
      "/ckpt", "/runs/a/checkpoints", "/tb/train")


def _path_literals(source: str):
  """The string constants of a module, f-strings' literal parts included, that read as paths:
  no whitespace (prose in help and error text has some); docstrings left out."""
  tree = ast.parse(source)
  docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef,
                                     ast.AsyncFunctionDef))
                and node.body and isinstance(node.body[0], ast.Expr)
                and isinstance(node.body[0].value, ast.Constant)}
  for node in ast.walk(tree):
    if (isinstance(node, ast.Constant) and isinstance(node.value, str)
        and id(node) not in docstrings and not re.search(r"\s", node.value)):
      yield node.lineno, node.value


def _spells_a_name(text: str) -> bool:
  return any(re.fullmatch(rf"(.*/)?{re.escape(name)}(/.*)?", text) for name in NAMES)


@pytest.mark.parametrize("folder", ["trainer", "launch", "benchmarks"])
def test_no_module_but_run_directory_spells_a_run_directory_name_as_a_path(folder):
  found = [f"{path.relative_to(REPO)}:{line}: {text!r}"
           for path in sorted((REPO / folder).rglob("*.py"))
           if path.name != "run_directory.py"
           for line, text in _path_literals(path.read_text()) if _spells_a_name(text)]
  assert not found, "\n".join(found)


def test_the_check_finds_a_planted_path():
  planted = 'x = os.path.join(model_dir, "metrics.json")\ny = f"{model_dir}/export"\n'
  assert [text for _, text in _path_literals(planted) if _spells_a_name(text)] == [
      "metrics.json", "/export"]
  prose = 'help = "its metrics.json names the classes"\n'
  assert not [text for _, text in _path_literals(prose) if _spells_a_name(text)]


@pytest.mark.parametrize("module", ["trainer.job.run_directory", "launch.vertex"])
def test_importing_it_loads_no_tensorflow(module):
  code = f"import sys, {module}; print('tensorflow' in sys.modules)"
  result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          timeout=120, check=True)
  assert result.stdout.strip() == "False"
