"""Cloud TPU VMs for the trainer: `python -m launch.tpu_vm [flags] -- [trainer flags]`.

Runs `gcloud` step by step: create the TPU VM, build the package and copy it to every host,
install it there on TensorFlow's TPU build (see `launch.requirements`), run
`python -m trainer.task --strategy=tpu` on all hosts at once with their logs streamed here,
and delete the VM when asked. `--dry_run` prints the exact commands and runs none.

The trainer's flags, after `--`, are checked first as the trainer checks them (under --dry_run
too): a typo is refused here, not after the VM is created.

The first step that fails stops the run with one `error:` line that names the `--steps` to
rerun with, and exit code 1; bad flags, or no `gcloud` on PATH, exit 2 before any step runs.
"""

import functools
import os
import re
import shlex
import shutil
import subprocess
import sys
from typing import List, Sequence

from absl import app
from absl import flags

from launch import requirements
from trainer import cli, errors
from trainer.errors import UserInputError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = ("create", "install", "train", "logs", "delete")
LOG = "~/trainer.log"
STEP_FAILED_EXIT_CODE = 1
GCLOUD_MISSING = ("gcloud not found on PATH: install the Google Cloud CLI "
                  "(https://cloud.google.com/sdk/docs/install), run `gcloud auth login`, and rerun")


def source_tree() -> str:
  """The checkout this launcher runs from, '' when it runs from an installed package."""
  return REPO if os.path.exists(os.path.join(REPO, "setup.py")) else ""


def runtime_version(accelerator_type: str) -> str:
  """The TPU VM software image: TPU v5e has its own, older TPUs share the Ubuntu base."""
  return "v2-alpha-tpuv5-lite" if accelerator_type.startswith("v5litepod") else "tpu-ubuntu2204-base"


def is_single_host(accelerator_type: str) -> bool:
  """Slices of up to 8 chips (v2-8, v3-8, v5litepod-8, ...) sit on one host."""
  return int(accelerator_type.rsplit("-", 1)[1]) <= 8


def trainer_arguments(name: str, accelerator_type: str,
                      trainer_args: Sequence[str]) -> List[str]:
  """What the train step passes the trainer: the TPU to use, unless the user's flags say, then
  the user's flags."""
  # On one host the TPU is local; a pod's hosts find their slice by the TPU's name.
  tpu = "local" if is_single_host(accelerator_type) else name
  # Only those not given: the trainer refuses a flag given twice.
  given = cli.trainer_flags_given(trainer_args)
  tpu_flags = [f"--{flag}={value}" for flag, value in (("strategy", "tpu"), ("tpu", tpu))
               if flag not in given]
  return [*tpu_flags, *trainer_args]


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
    # From a checkout, the wheel is built from it; an installed launcher has no source, and
    # copies the --package given.
    build = ([[sys.executable, "-m", "pip", "wheel", "--no-deps", "--wheel-dir",
               os.path.dirname(package), source_tree()]] if source_tree() else [])
    return [*build, [*tpu_vm, "scp", package, f"{name}:", *where, "--worker=all"],
            on_all_hosts(install)]
  if step == "train":
    trainer = shlex.join(["python3", "-m", "trainer.task",
                          *trainer_arguments(name, accelerator_type, trainer_args)])
    # Without pipefail the pipeline ends with tee's status, and a failed trainer would pass.
    return [on_all_hosts(f"set -o pipefail; {trainer} 2>&1 | tee {LOG}")]
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
  flags.DEFINE_string("package",
                      os.path.join(source_tree() or os.getcwd(), "dist", requirements.wheel_name()),
                      "The wheel the install step builds and copies to every host.")
  flags.DEFINE_bool("dry_run", False, "Print the commands; run none.")


# The end of --help.
TRAINER_FLAGS_NOTE = """\
The trainer's flags go after `--`, --model_dir among them (a TPU VM has no
$AIP_MODEL_DIR); python -m trainer.task --help lists them. For example:
  python -m launch.tpu_vm --name=NAME -- --model_dir=gs://BUCKET/run --dataset=mnist
"""


def step_failed_message(steps: Sequence[str], index: int, returncode: int) -> str:
  """What to say when `steps[index]` failed: its exit status and the `--steps` that resume."""
  status = f"killed by signal {-returncode}" if returncode < 0 else f"exit code {returncode}"
  return (f"step {steps[index]} failed ({status}, the command above): fix it and rerun with "
          f"--steps={','.join(steps[index:])}")


def check_trainer_arguments(trainer_args: Sequence[str]) -> None:
  """Exits with the trainer's own `error:` line if it would refuse what the train step runs.

  A TPU VM sets none of the variables the trainer's flags default to: no $AIP_MODEL_DIR, so a
  missing --model_dir is refused, as the trainer would refuse it there.
  """
  try:
    cli.check_trainer_arguments(
        trainer_arguments(FLAGS.name, FLAGS.accelerator_type, trainer_args), environ={})
  except UserInputError as e:
    cli.fail(f"trainer argument: {e}")


def main(argv: List[str]) -> None:
  """Runs (or with --dry_run prints) each step's commands in order; stops at the first failure."""
  unknown = [step for step in FLAGS.steps if step not in STEPS]
  if unknown:
    cli.fail(f"unknown --steps {', '.join(unknown)}: choose from {', '.join(STEPS)}")
  if not re.fullmatch(r"v\d+[a-z]*-\d+", FLAGS.accelerator_type):
    cli.fail(f"--accelerator_type={FLAGS.accelerator_type!r} is not a TPU type: give the "
             "generation and the cores or chips, e.g. v3-8, v5litepod-8, v5litepod-16")
  if "train" in FLAGS.steps:
    check_trainer_arguments(argv[1:])
  # Every step calls gcloud: find out before the first one creates or builds anything.
  if not FLAGS.dry_run and shutil.which("gcloud") is None:
    cli.fail(GCLOUD_MISSING)
  if ("install" in FLAGS.steps and not FLAGS.dry_run and not source_tree()
      and not os.path.exists(FLAGS.package)):
    cli.fail(f"no wheel at --package={FLAGS.package}: an installed launcher has no source to "
             "build one; pass the wheel (pip wheel --no-deps A_CLONE), or run from a clone")
  for index, step in enumerate(FLAGS.steps):
    for command in commands(step, FLAGS.name, FLAGS.zone, FLAGS.project, FLAGS.accelerator_type,
                            FLAGS.package, argv[1:], FLAGS.spot):
      print(shlex.join(command), flush=True)
      if FLAGS.dry_run:
        continue
      try:
        returncode = subprocess.run(command).returncode
      except KeyboardInterrupt:
        print(f"interrupted in step {step}: rerun with --steps={','.join(FLAGS.steps[index:])} "
              "to go on from it", file=sys.stderr)
        sys.exit(errors.INTERRUPTED_EXIT_CODE)
      # gcloud's own code is not passed on: it is 1 for most errors, 2 for its usage errors
      # (our 2 means bad flags or set-up) and, through ssh, the remote command's or ssh's 255.
      # The message reports it; the exit code says only "a step failed".
      if returncode:
        cli.fail(step_failed_message(FLAGS.steps, index, returncode),
                 exit_code=STEP_FAILED_EXIT_CODE)


if __name__ == "__main__":
  _define_flags()
  # A bad flag is one `error:` line and exit code 2, as elsewhere (absl's own parser exits 1,
  # which here means a step failed).
  app.run(main, flags_parser=functools.partial(
      cli.parse_flags, description=f"{__doc__}\n{TRAINER_FLAGS_NOTE}",
      groups={"flags": ["name", "zone", "project", "accelerator_type", "steps", "spot",
                        "package", "dry_run"]}, launcher="launch.tpu_vm"))
