"""Cloud TPU VMs for the trainer: `python -m launch.tpu_vm [flags] -- [trainer flags]`.

Runs `gcloud` step by step: create the TPU VM, build the package and copy it to every host,
install it there on TensorFlow's TPU build (see `launch.requirements`), run
`python -m trainer.task --strategy=tpu` on all hosts at once with their logs streamed here,
and delete the VM when asked. `--dry_run` prints the exact commands and runs none.
"""

import os
import shlex
import subprocess
import sys
from typing import List, Sequence

from absl import app
from absl import flags

from launch import requirements
from trainer import cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = ("create", "install", "train", "logs", "delete")
LOG = "~/trainer.log"


def runtime_version(accelerator_type: str) -> str:
  """The TPU VM software image: TPU v5e has its own, older TPUs share the Ubuntu base."""
  return "v2-alpha-tpuv5-lite" if accelerator_type.startswith("v5litepod") else "tpu-ubuntu2204-base"


def is_single_host(accelerator_type: str) -> bool:
  """Slices of up to 8 chips (v2-8, v3-8, v5litepod-8, ...) sit on one host."""
  return int(accelerator_type.rsplit("-", 1)[1]) <= 8


def commands(step: str, name: str, zone: str, project: str, accelerator_type: str,
             package: str, trainer_args: Sequence[str], spot: bool = False) -> List[List[str]]:
  """The commands of one step, each an argv list."""
  tpu_vm = ["gcloud", "compute", "tpus", "tpu-vm"]
  where = [f"--zone={zone}"] + ([f"--project={project}"] if project else [])
  def on_all_hosts(command: str) -> List[str]:
    return [*tpu_vm, "ssh", name, *where, "--worker=all", f"--command={command}"]

  if step == "create":
    return [[*tpu_vm, "create", name, *where, f"--accelerator-type={accelerator_type}",
             f"--version={runtime_version(accelerator_type)}", *(["--spot"] if spot else [])]]
  if step == "install":
    remote_package = f"~/{os.path.basename(package)}"
    install = (f"pip install --no-deps {remote_package} && "
               f"pip install {shlex.join(requirements.tpu_pip_arguments())}")
    return [[sys.executable, "-m", "pip", "wheel", "--no-deps", "--wheel-dir",
             os.path.dirname(package), REPO],
            [*tpu_vm, "scp", package, f"{name}:", *where, "--worker=all"],
            on_all_hosts(install)]
  if step == "train":
    # On one host the TPU is local; a pod's hosts find their slice by the TPU's name.
    tpu = "local" if is_single_host(accelerator_type) else name
    trainer = shlex.join(["python3", "-m", "trainer.task", "--strategy=tpu", f"--tpu={tpu}",
                          *trainer_args])
    return [on_all_hosts(f"{trainer} 2>&1 | tee {LOG}")]
  if step == "logs":
    return [on_all_hosts(f"tail -n 100 -f {LOG}")]
  if step == "delete":
    return [[*tpu_vm, "delete", name, *where, "--quiet"]]
  raise ValueError(f"unknown step {step!r}: choose from {', '.join(STEPS)}")


FLAGS = flags.FLAGS


def _define_flags() -> None:
  """Defined only when run as a program, so that tests may import this module."""
  flags.DEFINE_string("name", "mnist-multitask", "The TPU VM's name.")
  flags.DEFINE_string("zone", "us-west4-a", "Its zone (one that has the accelerator type).")
  flags.DEFINE_string("project", "", "Google Cloud project; gcloud's default if empty.")
  flags.DEFINE_string("accelerator_type", "v5litepod-8", "v2-8, v3-8, v5litepod-8, v5litepod-16, ...")
  flags.DEFINE_list("steps", ["create", "install", "train"],
                    f"What to do, in order: any of {', '.join(STEPS)}.")
  flags.DEFINE_bool("spot", False, "Create a Spot TPU VM (preemptible; the trainer resumes).")
  flags.DEFINE_string("package", os.path.join(REPO, "dist", requirements.wheel_name()),
                      "The wheel the install step builds and copies to every host.")
  flags.DEFINE_bool("dry_run", False, "Print the commands; run none.")


def main(argv: List[str]) -> None:
  unknown = [step for step in FLAGS.steps if step not in STEPS]
  if unknown:
    cli.fail(f"unknown --steps {', '.join(unknown)}: choose from {', '.join(STEPS)}")
  for step in FLAGS.steps:
    for command in commands(step, FLAGS.name, FLAGS.zone, FLAGS.project, FLAGS.accelerator_type,
                            FLAGS.package, argv[1:], FLAGS.spot):
      print(shlex.join(command), flush=True)
      if not FLAGS.dry_run and subprocess.run(command).returncode:
        cli.fail(f"step {step} failed (the command above); fix it and rerun with --steps from "
                 f"{step} on", exit_code=1)


if __name__ == "__main__":
  _define_flags()
  app.run(main)
