"""Tests of launch.tpu_vm: the exact gcloud commands of each step."""

import shlex
import subprocess
import sys

from launch import tpu_vm
from tests import helpers


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
      "--command=python3 -m trainer.task --strategy=tpu --tpu=local --epochs=3 "
      "2>&1 | tee ~/trainer.log")
  (pod,) = _commands("train", "v5litepod-16")
  assert "--tpu=mnist " in pod  # A pod's hosts find their slice by name.


def test_delete_and_logs():
  assert _commands("delete") == [
      "gcloud compute tpus tpu-vm delete mnist --zone=us-west4-a --project=proj --quiet"]
  assert shlex.split(_commands("logs")[0])[-1] == "--command=tail -n 100 -f ~/trainer.log"


def test_dry_run_prints_every_command_and_runs_none(tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "launch.tpu_vm", "--dry_run", "--steps=create,install,train,delete",
       f"--package={tmp_path}/pkg.whl", "--", "--epochs=3"], cwd=helpers.REPO,
      capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-3000:]
  lines = result.stdout.strip().splitlines()
  assert len(lines) == 6 and lines[0].startswith("gcloud compute tpus tpu-vm create")
  assert not (tmp_path / "pkg.whl").exists()  # Not even the wheel was built.
