"""Runs `python -m MODULE ARGS` for the tests in a fork of one process that has imported the
launchers' libraries once: each command is still its own process (its own flags, exit code,
standard output and error, environment and working directory), run as `-m` runs it, without
paying the seconds google-cloud-aiplatform takes to import each time.

    python -m tests.forking_runner [launchers|trainer]

reads one JSON request a line on standard input and answers each with one JSON line:
  {"module", "args", "env", "cwd", "timeout", "without_tensorflow"} runs the command to its end:
    {"returncode", "stdout", "stderr"} ({"timeout": true} if it was killed at its timeout);
  {"op": "start", "module", "args", "env", "cwd", "log_path"} starts it in the background, its
    standard output and error both to log_path (created before the answer): {"pid"} at once;
  {"op": "poll", "pid"} answers {"returncode"} for a started command: null while it runs, else
    as Popen's (minus the signal's number if a signal ended it). Until polled, an ended
    command stays a zombie, so its pid is not reused while the test may still signal it.
Started commands still running when standard input ends are killed; every command dies with
the runner (PR_SET_PDEATHSIG), however that ends.
It never imports TensorFlow, so that a command checked to run without it still is
(`without_tensorflow`: the child fails, exit 1 and an AssertionError, where the module imported
it). tests/helpers.py's `run_launcher` starts it once a session. The tests keep one real
`python -m` process per launcher (tests/vertex_test.py, tests/tpu_vm_test.py), for the
interpreter's start-up and the real imports.
"""

import atexit
import ctypes
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
                  "launch.vertex", "launch.tpu_vm",
                  # The console links launch.vertex prints: the whole SDK, 2 s a command.
                  "google.cloud.aiplatform.utils.console_utils"),
    "trainer": ("absl.app", "absl.flags", "tensorflow", "keras", "trainer.cli", "trainer.config",
                "trainer.job.train", "trainer.multitask.problem", "trainer.multitask.export",
                "trainer.data.sources", "trainer.data.image_files"),
}


_PR_SET_PDEATHSIG = 1


def _die_with_runner(runner: int) -> None:
  """Has the kernel kill this child when the runner (`runner`, its parent) ends."""
  try:
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
  except (OSError, AttributeError):  # Not Linux: the runner's own clean-up still kills it.
    pass
  if os.getppid() != runner:  # The runner ended before the prctl.
    os._exit(1)  # pylint: disable=protected-access


# Held (blocked) from before the fork until the child's module runs: a stop signal sent at once
# then ends the child as one sent during an interpreter's start-up ends it (SIGTERM's default
# action; for SIGINT, a KeyboardInterrupt and death by SIGINT), not in the runner's code.
_STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


def _fork() -> int:
  """os.fork(), the stop signals held in the child (see _STOP_SIGNALS)."""
  held = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
  pid = os.fork()
  if pid:
    signal.pthread_sigmask(signal.SIG_SETMASK, held)
  return pid


def _run_child(request, out_path, err_path, runner: int) -> None:
  """In the forked child: runs the request's module as __main__; never returns. Output goes to
  `out_path` and `err_path` (the same file for both: one file description, as `2>&1`)."""
  code, interrupted = 1, False
  try:
    _die_with_runner(runner)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    # The command's exit handlers run at its exit, as in its own interpreter; the runner's not.
    atexit._clear()  # pylint: disable=protected-access
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    if out_path == err_path:
      target = os.open(out_path, os.O_WRONLY | os.O_APPEND)
      os.dup2(target, 1)
      os.dup2(target, 2)
      os.close(target)
    else:
      for fd, path in ((1, out_path), (2, err_path)):
        target = os.open(path, os.O_WRONLY | os.O_TRUNC)
        os.dup2(target, fd)
        os.close(target)
    sys.argv = [request["module"], *request["args"]]
    # As in a new interpreter, the module itself is not imported before it runs as __main__.
    sys.modules.pop(request["module"], None)
    try:
      signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)  # What was sent lands now.
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
    except KeyboardInterrupt:  # As the interpreter: the traceback, then death by SIGINT.
      traceback.print_exc()
      interrupted = True
    except BaseException:  # pylint: disable=broad-except
      traceback.print_exc()
      code = 1
    if request.get("without_tensorflow") and "tensorflow" in sys.modules:
      print(f"AssertionError: {request['module']} imported TensorFlow", file=sys.stderr)
      code = 1
    atexit._run_exitfuncs()  # pylint: disable=protected-access
  finally:
    try:
      sys.stdout.flush()
      sys.stderr.flush()
    finally:
      if interrupted:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
      os._exit(code & 0xFF)  # pylint: disable=protected-access


def _fork_command(request, out_path, err_path) -> int:
  """Forks the request's command (`_run_child`, which never returns); returns its pid."""
  sys.stdout.flush()  # Else the child would write the runner's buffered output again.
  sys.stderr.flush()
  runner = os.getpid()
  pid = _fork()
  if pid == 0:
    _run_child(request, out_path, err_path, runner)
  return pid


def _answer(request) -> dict:
  with tempfile.TemporaryDirectory() as directory:
    out_path, err_path = os.path.join(directory, "out"), os.path.join(directory, "err")
    for path in (out_path, err_path):
      open(path, "w").close()
    pid = _fork_command(request, out_path, err_path)
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
  return {"returncode": _returncode(status), "stdout": stdout, "stderr": stderr}


def _returncode(status: int) -> int:
  return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


# The commands started in the background: pid -> its return code, None until it has ended.
_started = {}


def _start(request) -> dict:
  """Forks the request's command in the background; answers its pid at once."""
  log_path = request["log_path"]
  open(log_path, "w").close()  # There for the test to read as soon as it has the pid.
  pid = _fork_command(request, log_path, log_path)
  _started[pid] = None
  return {"pid": pid}


def _poll(request) -> dict:
  pid = request["pid"]
  if _started[pid] is None:
    done, status = os.waitpid(pid, os.WNOHANG)
    if done:
      _started[pid] = _returncode(status)
  return {"returncode": _started[pid]}


def _kill_started() -> None:
  for pid, returncode in _started.items():
    if returncode is None:
      try:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
      except (ProcessLookupError, ChildProcessError):
        pass


def main(kind: str) -> None:
  import importlib
  for module in PRELOADED[kind]:
    importlib.import_module(module)
  if kind == "launchers":
    assert "tensorflow" not in sys.modules, "a preloaded module imported TensorFlow"
  print(json.dumps({"ready": True}), flush=True)
  answers = {"start": _start, "poll": _poll, "run": _answer}
  try:
    for line in sys.stdin:
      request = json.loads(line)
      print(json.dumps(answers[request.get("op", "run")](request)), flush=True)
  finally:
    _kill_started()


if __name__ == "__main__":
  main(sys.argv[1] if len(sys.argv) > 1 else "launchers")
