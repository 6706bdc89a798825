"""Tests of launch.tpu_vm: the exact gcloud commands of each step, and the step runner run for
real as `python -m launch.tpu_vm` against a stand-in `gcloud` on PATH."""

import json
import os
import shlex
import sys

import pytest

from launch import requirements
from launch import tpu_vm
from tests import helpers

# What the launcher is told in the runs below, and so what tpu_vm.commands must be given.
WHERE = dict(name="mnist", zone="us-west4-a", project="proj", accelerator_type="v5litepod-8")
TRAINER_ARGS = ["--epochs=3", "--model_dir=gs://bucket/tpu run"]

# The stand-in: it appends its arguments to $FAKE_GCLOUD_LOG, one JSON list a line, and fails
# as gcloud does (one ERROR line, exit code $FAKE_GCLOUD_EXIT_CODE or 1) on the subcommand
# named by $FAKE_GCLOUD_FAIL ("create", "scp", "ssh", "delete").
FAKE_GCLOUD = r"""
import json, os, sys

with open(os.environ["FAKE_GCLOUD_LOG"], "a") as log:
  log.write(json.dumps(["gcloud", *sys.argv[1:]]) + "\n")
subcommand = sys.argv[4] if sys.argv[1:4] == ["compute", "tpus", "tpu-vm"] else ""
if subcommand and subcommand == os.environ.get("FAKE_GCLOUD_FAIL"):
  code = int(os.environ.get("FAKE_GCLOUD_EXIT_CODE", "1"))
  problem = {
      "create": "RESOURCE_EXHAUSTED: There is no more capacity in the zone \"us-west4-a\"; "
                "you can try in another zone where Cloud TPU Nodes are offered",
      "ssh": f"[/usr/bin/ssh] exited with return code [{code}].",
  }.get(subcommand, "NOT_FOUND: Resource 'projects/proj/locations/us-west4-a/nodes/mnist' "
                    "was not found")
  print(f"ERROR: (gcloud.compute.tpus.tpu-vm.{subcommand}) {problem}", file=sys.stderr)
  sys.exit(code)
"""


@pytest.fixture
def gcloud(tmp_path):
  """Writes the stand-in to tmp_path/bin/gcloud; returns run(*flags, env=...) -> (result, calls).

  `run` runs `python -m launch.tpu_vm FLAGS` with that directory first on PATH and `env`
  added; `calls` are the argv lists the stand-in got, in order.
  """
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  script = bin_dir / "gcloud"
  script.write_text(f"#!{sys.executable}\n{FAKE_GCLOUD}")
  script.chmod(0o755)
  log = tmp_path / "gcloud.jsonl"

  def run(*flags, env=None):
    result = helpers.run_launcher("launch.tpu_vm", *flags, timeout=300, env={
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        "FAKE_GCLOUD_LOG": str(log), **(env or {})})
    calls = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return result, calls

  return run


def _where_flags():
  return [f"--{flag}={value}" for flag, value in WHERE.items()]


def _expected(steps, package):
  return [command for step in steps
          for command in tpu_vm.commands(step, package=package, trainer_args=TRAINER_ARGS,
                                         **WHERE)]


def _commands(step, accelerator_type="v5litepod-8", args=("--epochs=3",)):
  return [shlex.join(c) for c in tpu_vm.commands(step, "mnist", "us-west4-a", "proj",
                                                 accelerator_type, "/tmp/dist/pkg.whl", args)]


def test_create_picks_the_runtime_for_the_tpu_generation():
  assert _commands("create") == [
      "gcloud compute tpus tpu-vm create mnist --zone=us-west4-a --project=proj "
      "--accelerator-type=v5litepod-8 --version=v2-alpha-tpuv5-lite"]
  assert _commands("create", "v3-8")[0].endswith("--version=tpu-ubuntu2204-base")


def test_install_puts_the_package_on_every_host_over_tensorflow_tpu():
  build, copy, install = _commands("install")
  assert build.endswith(f"pip wheel --no-deps --wheel-dir /tmp/dist {helpers.REPO}")
  assert copy == ("gcloud compute tpus tpu-vm scp /tmp/dist/pkg.whl mnist: --zone=us-west4-a "
                  "--project=proj --worker=all")
  remote = shlex.split(install)[-1]
  assert remote.startswith("--command=pip install --no-deps ~/pkg.whl && pip install -f "
                           "https://storage.googleapis.com/libtpu-tf-releases/index.html "
                           "tensorflow-tpu==2.20.0 ")
  assert "--worker=all" in install


def test_train_runs_on_all_hosts_with_the_trainer_flags_and_keeps_a_log():
  (train,) = _commands("train")
  assert shlex.split(train)[-1] == (
      "--command=set -o pipefail; python3 -m trainer.task --strategy=tpu --tpu=local "
      "--epochs=3 2>&1 | tee ~/trainer.log")
  (pod,) = _commands("train", "v5litepod-16")
  assert "--tpu=mnist " in pod  # A pod's hosts find their slice by name.


def test_train_names_the_tpu_unless_the_trainer_flags_do():
  """The trainer refuses a flag given twice: one the user gives is not added again."""
  assert tpu_vm.trainer_arguments("mnist", "v3-8", ["--epochs=3"]) == [
      "--strategy=tpu", "--tpu=local", "--epochs=3"]
  assert tpu_vm.trainer_arguments("mnist", "v3-8", ["--tpu", "other", "--strategy=tpu"]) == [
      "--tpu", "other", "--strategy=tpu"]


def test_delete_and_logs():
  assert _commands("delete") == [
      "gcloud compute tpus tpu-vm delete mnist --zone=us-west4-a --project=proj --quiet"]
  assert shlex.split(_commands("logs")[0])[-1] == "--command=tail -n 100 -f ~/trainer.log"


def test_dry_run_prints_every_command_and_runs_none(tmp_path):
  # Without TensorFlow: the trainer's arguments are checked before paying for its start-up.
  result = helpers.run_module_without_tensorflow(  # A real `python -m` process.
      "launch.tpu_vm", "--dry_run", "--steps=create,install,train,delete",
      f"--package={tmp_path}/pkg.whl", "--", "--epochs=3", "--model_dir=gs://b/run")
  assert result.returncode == 0, result.stderr[-3000:]
  lines = result.stdout.strip().splitlines()
  assert len(lines) == 6 and lines[0].startswith("gcloud compute tpus tpu-vm create")
  assert not (tmp_path / "pkg.whl").exists()  # Not even the wheel was built.


def test_bad_trainer_arguments_are_refused_before_any_step(tmp_path):
  # The typos, under --dry_run too: otherwise they fail on the TPU VM, once it is made.
  result = helpers.run_launcher("launch.tpu_vm", "--dry_run", "--", "--datset=mnist",
                              "--epoch=20", "--batch_size=-5", timeout=120)
  helpers.assert_one_error_line(
      result, "trainer argument: Unknown command line flag 'datset'. Did you mean: dataset ? "
      "(see python -m trainer.task --help)", whole=True)
  assert result.stdout == ""


def test_help_exits_0_and_says_where_the_trainer_flags_go():
  result = helpers.run_launcher("launch.tpu_vm", "--help", timeout=120)
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.startswith("Cloud TPU VMs for the trainer")
  for text in ("python -m trainer.task --help lists them", "  --steps=create,install,train\n",
               "  --[no]spot  (default: off)\n"):
    assert text in result.stdout, result.stdout


def test_steps_run_in_order_with_exactly_the_commands_of_each(gcloud, tmp_path):
  package = str(tmp_path / "dist" / "pkg.whl")
  result, calls = gcloud(*_where_flags(), "--steps=create,train,delete", f"--package={package}",
                         "--", *TRAINER_ARGS)
  assert result.returncode == 0, result.stderr[-3000:]
  assert calls == _expected(["create", "train", "delete"], package)
  # The trainer's flags reach the hosts whole, a space in one included.
  assert calls[1][-1].startswith(
      "--command=set -o pipefail; python3 -m trainer.task --strategy=tpu --tpu=local "
      "--epochs=3 '--model_dir=gs://bucket/tpu run' 2>&1")
  assert result.stdout.splitlines() == [shlex.join(c) for c in calls]  # Each shown as it runs.
  assert not helpers.error_lines(result.stderr)


def test_a_failed_step_stops_the_run_and_says_how_to_resume(gcloud, tmp_path):
  package = str(tmp_path / "dist" / "pkg.whl")
  result, calls = gcloud(*_where_flags(), "--steps=create,train,delete", f"--package={package}",
                         "--", *TRAINER_ARGS, env={"FAKE_GCLOUD_FAIL": "ssh"})
  assert tpu_vm.STEP_FAILED_EXIT_CODE == 1
  assert calls == _expected(["create", "train"], package)  # The VM is not deleted.
  assert "ERROR: (gcloud.compute.tpus.tpu-vm.ssh) [/usr/bin/ssh] exited" in result.stderr
  helpers.assert_one_error_line(
      result, "step train failed (exit code 1, the command above): fix it and rerun with "
      "--steps=train,delete", exit_code=tpu_vm.STEP_FAILED_EXIT_CODE, whole=True)
  assert result.stdout.splitlines()[-1] == shlex.join(calls[-1])  # "The command above".


def test_the_first_step_failing_keeps_gclouds_code_in_the_message_only(gcloud, tmp_path):
  result, calls = gcloud(*_where_flags(), "--steps=create,train", "--", *TRAINER_ARGS,
                         env={"FAKE_GCLOUD_FAIL": "create", "FAKE_GCLOUD_EXIT_CODE": "2"})
  # gcloud's 2 (say, its usage error) must not read as the launcher's "bad flags".
  assert [c[4] for c in calls] == ["create"]
  assert "RESOURCE_EXHAUSTED" in result.stderr
  helpers.assert_one_error_line(
      result, "step create failed (exit code 2, the command above): fix it and rerun with "
      "--steps=create,train", exit_code=1, whole=True)


def test_without_gcloud_on_path_nothing_runs_and_the_error_says_where_to_get_it(tmp_path):
  empty = tmp_path / "empty"
  empty.mkdir()
  package = tmp_path / "dist" / "pkg.whl"
  result = helpers.run_launcher("launch.tpu_vm", "--steps=install,train", f"--package={package}",
                              "--", *TRAINER_ARGS, env={"PATH": str(empty)}, timeout=120)
  helpers.assert_one_error_line(result, tpu_vm.GCLOUD_MISSING, whole=True)
  assert "https://cloud.google.com/sdk/docs/install" in tpu_vm.GCLOUD_MISSING
  assert result.stdout == "" and not package.parent.exists()  # Not even the wheel was built.


def test_bad_flags_are_one_error_line_and_exit_code_2(gcloud):
  for flag, message in [("--no_such_flag", "Unknown command line flag 'no_such_flag'"),
                        ("--steps=create,deploy", "unknown --steps deploy: choose from"),
                        ("--accelerator_type=v5e", "--accelerator_type='v5e' is not a TPU type"),
                        ("--dataset=mnist", "--dataset is a flag of the trainer, not of "
                         "launch.tpu_vm: put trainer flags after --, as in python -m "
                         "launch.tpu_vm [flags] -- --dataset=mnist"),
                        ("--steps=train", "trainer argument: no --model_dir given and "
                         "$AIP_MODEL_DIR is not set: pass --model_dir"),
                        ("--zone=us-west4-a --zone=us-east1-d", "--zone is given twice "
                         "(--zone=us-west4-a, then --zone=us-east1-d): give it once")]:
    result, calls = gcloud(*flag.split(" "))
    assert not calls
    line = helpers.assert_one_error_line(result, message)
    assert line.startswith(f"error: {message}")


@pytest.mark.slow
def test_install_builds_the_wheel_then_copies_and_installs_it_on_every_host(gcloud, tmp_path):
  package = str(tmp_path / "dist" / requirements.wheel_name())
  result, calls = gcloud(*_where_flags(), "--steps=install", f"--package={package}")
  assert result.returncode == 0, result.stderr[-3000:]
  assert os.path.isfile(package)  # Built by pip, the install step's first command.
  build, *on_gcloud = _expected(["install"], package)
  assert build[:3] == [sys.executable, "-m", "pip"] and calls == on_gcloud
