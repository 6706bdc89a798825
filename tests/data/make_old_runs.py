"""Writes tests/data/old_runs/: two run directories made by an older commit's trainer, for
tests/old_run_directories_test.py (a run directory of that tree must still resume, report as
finished, and serve evaluate, predict and upload).

    .venv/bin/python tests/data/make_old_runs.py [--commit=a170b19] [--output=tests/data/old_runs]

It extracts COMMIT's tree (`git archive`, into a temporary directory: no worktree is
registered) and runs that tree's own `python -m trainer.task`, with this interpreter (so this
venv's TensorFlow) and the old tree first on sys.path, twice:

  finished    2 epochs, to the end (metrics.json, export/, history.json, ...).
  unfinished  the same 2 epochs, with a checkpoint every few steps, stopped by SIGTERM once a
              checkpoint inside epoch 2 exists: the job's preemption path (Vertex AI and
              Compute Engine announce preemption with SIGTERM) saves a checkpoint and exits
              143 without metrics.json. The step it stops at depends on timing; README.md
              records it, and the test reads it from the checkpoint files.

Then it replaces OUTPUT with the two directories, flags.json (each run's flags, without
--model_dir) and README.md (the commit, the commands, what each directory holds).
"""

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# The narrowest model the trainer takes, the 5,000 digits shipped with it, no report: small.
COMMON = ["--dataset=mnist_sample", "--epochs=2", "--batch_size=64", "--width=4",
          "--latent_dim=2", "--noreport", "--checkpoints_to_keep=1"]
FLAGS = {
    "finished": COMMON,
    # A checkpoint every 10 steps and calls of 5 steps: SIGTERM lands mid epoch 2.
    "unfinished": COMMON + ["--checkpoint_every_steps=10", "--steps_per_loop=5"],
}
PREEMPTED_EXIT_CODE = 143  # 128 + SIGTERM, as the trainer reports a preemption.


def _environment(old_tree: str) -> dict:
  return {**os.environ, "PYTHONPATH": old_tree, "TF_CPP_MIN_LOG_LEVEL": "2",
          "PYTHONUNBUFFERED": "1"}


def _command(model_dir: str, flags) -> list:
  return [sys.executable, "-m", "trainer.task", *flags, f"--model_dir={model_dir}"]


def _latest_step(model_dir: str) -> int:
  """The step of the checkpoint that checkpoints/checkpoint names latest; 0 if none."""
  try:
    with open(os.path.join(model_dir, "checkpoints", "checkpoint")) as f:
      found = re.search(r'^model_checkpoint_path: "ckpt-(\d+)"', f.read(), re.M)
  except FileNotFoundError:
    return 0
  return int(found.group(1)) if found else 0


def _finished(old_tree: str, model_dir: str, log_path: str) -> None:
  with open(log_path, "w") as log:
    subprocess.run(_command(model_dir, FLAGS["finished"]), cwd=old_tree,
                   env=_environment(old_tree), stdout=log, stderr=subprocess.STDOUT, check=True)
  assert os.path.exists(os.path.join(model_dir, "metrics.json")), "the finished run did not finish"


def _unfinished(old_tree: str, model_dir: str, log_path: str, steps_per_epoch: int) -> int:
  """Runs the unfinished run until a checkpoint of epoch 2 exists, then SIGTERMs it; returns
  the step of its last checkpoint. Tries again (in a fresh directory) if it stopped outside
  epoch 2."""
  for _ in range(3):
    shutil.rmtree(model_dir, ignore_errors=True)
    with open(log_path, "w") as log:
      process = subprocess.Popen(_command(model_dir, FLAGS["unfinished"]), cwd=old_tree,
                                 env=_environment(old_tree), stdout=log, stderr=subprocess.STDOUT)
      deadline = time.time() + 300
      while (_latest_step(model_dir) <= steps_per_epoch and process.poll() is None
             and time.time() < deadline):
        time.sleep(0.02)
      process.send_signal(signal.SIGTERM)
      code = process.wait(timeout=300)
    step = _latest_step(model_dir)
    if (code == PREEMPTED_EXIT_CODE and steps_per_epoch < step < 2 * steps_per_epoch
        and not os.path.exists(os.path.join(model_dir, "metrics.json"))):
      return step
    print(f"unfinished: exit {code} at step {step}; again", file=sys.stderr)
  raise SystemExit("could not stop the unfinished run inside epoch 2")


def _sizes(directory: str) -> str:
  lines = []
  for root, _, files in sorted(os.walk(directory)):
    for name in sorted(files):
      path = os.path.join(root, name)
      lines.append(f"    {os.path.relpath(path, directory)}  {os.path.getsize(path):,} bytes")
  return "\n".join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--commit", default="a170b19")
  parser.add_argument("--output", default=os.path.join(REPO, "tests", "data", "old_runs"))
  args = parser.parse_args()
  commit = subprocess.run(["git", "rev-parse", f"{args.commit}^{{commit}}"], cwd=REPO, check=True,
                          capture_output=True, text=True).stdout.strip()
  subject = subprocess.run(["git", "log", "-1", "--format=%s", commit], cwd=REPO, check=True,
                           capture_output=True, text=True).stdout.strip()
  with tempfile.TemporaryDirectory(prefix="old_runs_") as scratch:
    old_tree = os.path.join(scratch, "tree")
    os.mkdir(old_tree)
    archive = subprocess.run(["git", "archive", commit], cwd=REPO, check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", old_tree], input=archive, check=True)
    runs = os.path.join(scratch, "runs")
    os.mkdir(runs)
    finished, unfinished = os.path.join(runs, "finished"), os.path.join(runs, "unfinished")
    _finished(old_tree, finished, os.path.join(runs, "finished.log"))
    trained = _latest_step(finished)
    steps_per_epoch = trained // 2
    stopped = _unfinished(old_tree, unfinished, os.path.join(runs, "unfinished.log"),
                          steps_per_epoch)
    with open(os.path.join(runs, "flags.json"), "w") as f:
      json.dump({**FLAGS, "steps_per_epoch": steps_per_epoch, "unfinished_step": stopped}, f,
                indent=2)
      f.write("\n")
    python = ".venv/bin/python"
    readme = f"""# Run directories of an older trainer

Written by `{python} tests/data/make_old_runs.py --commit={args.commit}` from the tree of
commit {commit}
("{subject}"),
extracted with `git archive` and run as that tree's own `python -m trainer.task` (this
repository's venv: TensorFlow as installed here). tests/old_run_directories_test.py checks
that today's trainer still resumes them, reports them as finished, and serves
`trainer.evaluate`, `trainer.predict` and `launch.vertex upload` from them.

Commands (run in the old tree, PYTHONPATH=old tree, MODEL_DIR a temporary directory, so
config.json holds a path that no longer exists, as a moved run directory's does):

    python -m trainer.task {' '.join(FLAGS['finished'])} --model_dir=MODEL_DIR/finished
    python -m trainer.task {' '.join(FLAGS['unfinished'])} --model_dir=MODEL_DIR/unfinished

- `finished/`: ran to its end: 2 epochs of {steps_per_epoch} steps (checkpoint ckpt-{trained}),
  config.json, history.json, metrics.json, export/ (SavedModel and model.keras), logs/
  (TensorBoard). Nothing removed.
- `unfinished/`: the second command, sent SIGTERM once a checkpoint past step
  {steps_per_epoch} (inside epoch 2) existed: it saved ckpt-{stopped} and exited
  {PREEMPTED_EXIT_CODE}, as a preempted job does; it has checkpoints/, config.json,
  history.json (epoch 1) and logs/, and no metrics.json or export/. Nothing removed.
- `finished.log`, `unfinished.log`: what the two commands printed.
- `flags.json`: each run's flags (without --model_dir), the steps of an epoch and the step
  the unfinished run stopped at; the test runs the trainer again with these flags.

Files:

finished/
{_sizes(finished)}

unfinished/
{_sizes(unfinished)}
"""
    with open(os.path.join(runs, "README.md"), "w") as f:
      f.write(readme)
    shutil.rmtree(args.output, ignore_errors=True)
    shutil.copytree(runs, args.output)
  print(f"wrote {args.output}: finished at step {trained}, unfinished stopped at step {stopped}")


if __name__ == "__main__":
  main()
