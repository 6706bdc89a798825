"""Runs `python -m MODULE ARGS` for the tests in a fork of one process that has imported the
launchers' libraries once: each command is still its own process (its own flags, exit code,
standard output and error, environment and working directory), run as `-m` runs it, without
paying the seconds google-cloud-aiplatform takes to import each time.

    python -m tests.forking_runner [launchers|trainer]

reads one JSON request a line on standard input, {"module", "args", "env", "cwd", "timeout",
"without_tensorflow"}, and answers each with one JSON line, {"returncode", "stdout", "stderr"}.
It never imports TensorFlow, so that a command checked to run without it still is
(`without_tensorflow`: the child fails, exit 1 and an AssertionError, where the module imported
it). tests/helpers.py's `run_launcher` starts it once a session. The tests keep one real
`python -m` process per launcher (tests/vertex_test.py, tests/tpu_vm_test.py), for the
interpreter's start-up and the real imports.
"""

import json
import os
import runpy
import signal
import sys
import tempfile
import time
import traceback

# What the commands import, lazily or not: imported here once, shared by every fork. By kind:
# the launchers' (never TensorFlow), or the trainer's commands' (TensorFlow and the trainer's
# modules that define no flags: trainer.task, evaluate and predict define theirs when they run).
PRELOADED = {
    "launchers": ("absl.app", "absl.flags", "grpc", "google.cloud.aiplatform_v1", "google.auth",
                  "launch.vertex", "launch.tpu_vm"),
    "trainer": ("absl.app", "absl.flags", "tensorflow", "keras", "trainer.cli", "trainer.config",
                "trainer.job.train", "trainer.multitask.problem", "trainer.multitask.export",
                "trainer.data.sources", "trainer.data.image_files"),
}


def _run_child(request, out_path, err_path) -> None:
  """In the forked child: runs the request's module as __main__; never returns."""
  code = 1
  try:
    signal.signal(signal.SIGINT, signal.default_int_handler)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    for fd, path in ((1, out_path), (2, err_path)):
      target = os.open(path, os.O_WRONLY | os.O_TRUNC)
      os.dup2(target, fd)
      os.close(target)
    sys.argv = [request["module"], *request["args"]]
    # As in a new interpreter, the module itself is not imported before it runs as __main__.
    sys.modules.pop(request["module"], None)
    try:
      runpy.run_module(request["module"], run_name="__main__", alter_sys=True)
      code = 0
    except SystemExit as e:  # As the interpreter ends for it.
      if e.code is None:
        code = 0
      elif isinstance(e.code, int):
        code = e.code
      else:
        print(e.code, file=sys.stderr)
        code = 1
    except BaseException:  # pylint: disable=broad-except
      traceback.print_exc()
      code = 1
    if request.get("without_tensorflow") and "tensorflow" in sys.modules:
      print(f"AssertionError: {request['module']} imported TensorFlow", file=sys.stderr)
      code = 1
  finally:
    try:
      sys.stdout.flush()
      sys.stderr.flush()
    finally:
      os._exit(code & 0xFF)  # pylint: disable=protected-access


def _answer(request) -> dict:
  with tempfile.TemporaryDirectory() as directory:
    out_path, err_path = os.path.join(directory, "out"), os.path.join(directory, "err")
    for path in (out_path, err_path):
      open(path, "w").close()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
      _run_child(request, out_path, err_path)
    deadline = time.monotonic() + request.get("timeout", 120)
    while True:
      done, status = os.waitpid(pid, os.WNOHANG)
      if done:
        break
      if time.monotonic() > deadline:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        return {"timeout": True}
      time.sleep(0.005)
    with open(out_path, errors="replace") as f:
      stdout = f.read()
    with open(err_path, errors="replace") as f:
      stderr = f.read()
  returncode = (-os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status))
  return {"returncode": returncode, "stdout": stdout, "stderr": stderr}


def main(kind: str) -> None:
  import importlib
  for module in PRELOADED[kind]:
    importlib.import_module(module)
  if kind == "launchers":
    assert "tensorflow" not in sys.modules, "a preloaded module imported TensorFlow"
  print(json.dumps({"ready": True}), flush=True)
  for line in sys.stdin:
    print(json.dumps(_answer(json.loads(line))), flush=True)


if __name__ == "__main__":
  main(sys.argv[1] if len(sys.argv) > 1 else "launchers")
