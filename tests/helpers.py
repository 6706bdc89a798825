"""Helpers shared by the tests: small learnable data, and running the job as a user would."""

import gzip
import hashlib
import json
import os
import subprocess
import sys
import time

import numpy as np

from trainer.data import sources

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"


def learnable_split(n: int, seed: int = 0) -> sources.Split:
  """Noise images where each class lights up its own patch: a few steps learn it."""
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, 10, n).astype(np.int32)
  images = rng.integers(0, 40, (n, 28, 28, 1)).astype(np.uint8)
  for i, label in enumerate(labels):
    row, col = divmod(int(label), 5)
    images[i, 4 + 10 * row:12 + 10 * row, 1 + 5 * col:6 + 5 * col] = 255
  return sources.Split(images, labels)


def learnable_splits(train: int = 512, validation: int = 100, test: int = 100) -> sources.Splits:
  return sources.Splits(learnable_split(train, 0), learnable_split(validation, 1),
                     learnable_split(test, 2))


def _environment(env=None) -> dict:
  return {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **(env or {})}


def run_module(module: str, *args, env=None, timeout=600):
  """Runs `python -m MODULE ARGS` from the repository, as a user would; returns the
  CompletedProcess, with its output as text."""
  return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=_environment(env),
                        capture_output=True, text=True, timeout=timeout)


def with_flags(flags, *changes) -> tuple:
  """`flags` with each of `changes` in place of the same flag's value, or added (the trainer
  refuses a flag given twice)."""
  changed = {change.split("=", 1)[0] for change in changes}
  return (*(flag for flag in flags if flag.split("=", 1)[0] not in changed), *changes)


def run_trainer(*flags, env=None, timeout=600):
  """Runs `python -m trainer.task FLAGS`; returns the CompletedProcess."""
  return run_module("trainer.task", *flags, env=env, timeout=timeout)


def start_trainer(log_path, *flags, env=None) -> subprocess.Popen:
  """Starts `python -m trainer.task FLAGS` in the background, its output going to `log_path`."""
  with open(log_path, "w") as log:
    return subprocess.Popen([sys.executable, "-m", "trainer.task", *flags], cwd=REPO,
                            env=_environment(env), stdout=log, stderr=subprocess.STDOUT)


def start_workers(log_dir, prefix: str, *flags, workers: int = 2) -> list:
  """Starts the workers of one multi-worker cluster on loopback, each told its place by
  $TF_CONFIG; worker N logs to log_dir/PREFIX-workerN.log. Returns their processes."""
  import portpicker  # Only the multi-worker tests need it.
  cluster = {"worker": [f"localhost:{portpicker.pick_unused_port()}" for _ in range(workers)]}
  return [start_trainer(os.path.join(log_dir, f"{prefix}-worker{index}.log"), *flags, env={
      "TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})})
          for index in range(workers)]


def signal_swallowed(signal_number: int) -> None:
  """Sends this process `signal_number`, and swallows the stop that it raises in the job's code
  called back from here: as a library that catches everything, or C code that clears an
  exception raised in a call back to Python (TensorFlow's nest does)."""
  from trainer.job import preemption  # pylint: disable=import-outside-toplevel
  try:
    os.kill(os.getpid(), signal_number)
    preemption.raise_if_stopped()  # The job's code, where a stage's stop is raised.
  except BaseException:  # pylint: disable=broad-except
    pass


def library_call(seen: list, *signals: int, seconds: float = 0.0) -> None:
  """A library's call, as TensorFlow's C++ calling back into Python: sends this process each of
  `signals`, working `seconds` after each, and swallows what they raise in it (as nest's
  Flatten once did), noting each in `seen`; then notes "went on" and returns."""
  for number in signals:
    try:
      os.kill(os.getpid(), number)
      deadline = time.monotonic() + seconds
      while time.monotonic() < deadline:
        pass
    except BaseException as error:  # pylint: disable=broad-except
      seen.append(error)
  seen.append("went on")


def library_items(seen: list, signal_number: int):
  """A library's generator that receives `signal_number` as it makes its first item; notes its
  clean-up."""
  try:
    os.kill(os.getpid(), signal_number)
    yield 1
    yield 2
  finally:
    seen.append("generator cleaned up")


class LibraryContext:
  """A library's `with` block whose `__enter__` receives `signal_number`; notes its steps."""

  def __init__(self, seen: list, signal_number: int):
    self.seen, self.signal_number = seen, signal_number

  def __enter__(self):
    os.kill(os.getpid(), self.signal_number)
    self.seen.append("entered")
    return self

  def __exit__(self, *unused_exception):
    self.seen.append("exited")


def without_timing(metrics: dict) -> dict:
  """`metrics` less what differs between two runs of the same computation: speed, settings."""
  return {k: v for k, v in metrics.items() if k not in ("train_images_per_second", "config")}


def read_metrics(model_dir: str) -> dict:
  with open(os.path.join(model_dir, "metrics.json")) as f:
    return json.load(f)


def write_npz(path, **arrays) -> str:
  """Writes `arrays` to an npz file; returns the --dataset value that names it."""
  np.savez(path, **arrays)
  return f"npz:{path}"


def idx_bytes(array, magic: int) -> bytes:
  """`array` in the IDX format, under the given magic number."""
  header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
  return header + array.astype(np.uint8).tobytes()


def write_idx_dir(directory, gzipped: bool, train: int = 60, test: int = 20, **overrides) -> str:
  """Writes the four MNIST IDX files (any replaced by `overrides`); returns the --dataset value."""
  files = {
      "train-images-idx3-ubyte": idx_bytes(np.full((train, 28, 28), 7), 0x803),
      "train-labels-idx1-ubyte": idx_bytes(np.arange(train) % 10, 0x801),
      "t10k-images-idx3-ubyte": idx_bytes(np.full((test, 28, 28), 9), 0x803),
      "t10k-labels-idx1-ubyte": idx_bytes(np.arange(test) % 10, 0x801),
  }
  files.update(overrides)
  for name, raw in files.items():
    if gzipped:
      (directory / (name + ".gz")).write_bytes(gzip.compress(raw))
    else:
      (directory / name).write_bytes(raw)
  return f"idx:{directory}"


def error_lines(stderr: str) -> list:
  """The lines of a command's standard error that start with `error:` (TensorFlow logs there
  too); `error:` without its space counts, so that a malformed error line is not missed."""
  return [line for line in stderr.splitlines() if line.startswith("error:")]


def assert_one_error_line(result: subprocess.CompletedProcess, message: str, exit_code: int = 2,
                          *, whole: bool = False, last: bool = True) -> str:
  """Asserts that `result` (text output) is a refusal: one `error: ` line, no traceback.

  That is: the exit code is `exit_code`; of the lines of standard error, exactly one starts
  with `error:`, and it starts with `error: ` and contains `message` (is `error: {message}` if
  `whole`); `message` occurs once in standard error (it is not logged as well); with `last`, the
  error line is the last line of standard error (pass `last=False` only where other processes
  write to the same log); and neither standard error nor standard output holds a
  `Traceback`. Returns the error line, for further checks. For a command run in this process,
  `run_in_process` gives the `result`.
  """
  stderr, shown = result.stderr or "", (result.stderr or "")[-3000:]
  assert result.returncode == exit_code, f"exit code {result.returncode}, not {exit_code}: {shown}"
  assert "Traceback" not in stderr, shown
  assert "Traceback" not in (result.stdout or ""), result.stdout[-3000:]
  errors = error_lines(stderr)
  assert len(errors) == 1, f"{len(errors)} error lines: {shown}"
  (line,) = errors
  assert line.startswith("error: "), line
  if whole:
    assert line == f"error: {message}", line
  else:
    assert message in line, f"{message!r} not in {line!r}"
  assert stderr.count(message) == 1, f"{message!r} {stderr.count(message)} times: {shown}"
  if last:
    assert stderr.rstrip("\n").splitlines()[-1] == line, f"not the last line: {shown}"
  return line


def run_in_process(capsys, function, *args) -> subprocess.CompletedProcess:
  """Calls `function(*args)` as a command run in this process: returns a CompletedProcess with
  the exit code it ended with (0 if it returned, its `SystemExit` code otherwise: 0 for None,
  1 for a message) and what it wrote to standard output and error (read through pytest's
  `capsys`, whose earlier output is dropped first). Other exceptions propagate."""
  capsys.readouterr()
  try:
    function(*args)
    code = 0
  except SystemExit as e:
    code = 0 if e.code is None else e.code if isinstance(e.code, int) else 1
  captured = capsys.readouterr()
  return subprocess.CompletedProcess(args, code, captured.out, captured.err)


def directory_state(path) -> dict:
  """What is under the local directory `path`, to compare before and after a command: a test
  asserts `directory_state(d) == before` for "nothing written, nothing removed".

  Maps the path, relative to `path` with `/` between names, of every file at any depth to the
  sha256 hex digest of its content, and of every directory below `path` (empty or not) to
  None, under its relative path with a trailing `/`. So a file added, removed, renamed or with
  a byte changed, and a directory added or removed (an empty `checkpoints/` included), all
  make the states differ; modification times and permissions do not. A symbolic link to a
  directory is listed as a directory, not followed. `path` itself need not exist: a missing
  directory's state is {}, as is an empty one's (check `os.path.exists` if that matters).
  """
  state = {}
  for root, directories, files in os.walk(path):
    relative = os.path.relpath(root, path)
    prefix = "" if relative == os.curdir else relative.replace(os.sep, "/") + "/"
    for name in directories:
      state[f"{prefix}{name}/"] = None
    for name in files:
      digest = hashlib.sha256()
      with open(os.path.join(root, name), "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
          digest.update(block)
      state[prefix + name] = digest.hexdigest()
  return state


# Runs `python -m MODULE ARGS` as `-m` does, then fails if TensorFlow was imported.
_WITHOUT_TENSORFLOW = """\
import runpy, sys
sys.argv[0] = {module!r}
try:
  runpy.run_module({module!r}, run_name="__main__", alter_sys=True)
finally:
  assert "tensorflow" not in sys.modules, "{module} imported TensorFlow"
"""


def run_module_without_tensorflow(module: str, *args, timeout=120):
  """`run_module`, failing (exit 1, an AssertionError on stderr) where the module imported
  TensorFlow: for what must answer before paying for its start-up (seconds)."""
  return subprocess.run([sys.executable, "-c", _WITHOUT_TENSORFLOW.format(module=module), *args],
                        cwd=REPO, env=_environment(), capture_output=True, text=True,
                        timeout=timeout)


# Processes that fork one child a command (tests/forking_runner.py), by kind, started at first use.
_runners = {}


def _runner(kind: str):
  """The forking runner of `kind`, started at first use, and the lock of its requests; it ends
  (killing the commands it started that still run) when the session does."""
  import atexit
  import threading
  if kind not in _runners:
    process = subprocess.Popen([sys.executable, "-m", "tests.forking_runner", kind], cwd=REPO,
                               env=_environment(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               text=True)
    ready = process.stdout.readline()
    assert json.loads(ready or "{}").get("ready"), f"the forking runner did not start: {ready!r}"
    atexit.register(_end_runner, process)
    _runners[kind] = (process, threading.Lock())
  return _runners[kind]


def _end_runner(process) -> None:
  """Closes the runner's input: it kills what it started and ends; killed if it does not."""
  try:
    process.stdin.close()
    process.wait(timeout=10)
  except (OSError, subprocess.TimeoutExpired):
    pass
  finally:
    if process.poll() is None:
      process.kill()  # Its commands die with it (PR_SET_PDEATHSIG).
      process.wait()


def start_forking_runner(kind: str = "trainer") -> None:
  """Starts the forking runner of `kind` now, if it has not started: before a test times a
  forked command, say, as the runner's own start-up is no part of the command's."""
  _runner(kind)


def _ask(kind: str, request: dict) -> dict:
  process, lock = _runner(kind)
  with lock:
    process.stdin.write(json.dumps(request) + "\n")
    process.stdin.flush()
    answer = process.stdout.readline()
  assert answer, f"the forking runner ended (exit {process.poll()})"
  return json.loads(answer)


def _run_forked(kind: str, module: str, args, env, timeout, without_tensorflow):
  request = {"module": module, "args": list(args), "env": _environment(env), "cwd": REPO,
             "timeout": timeout, "without_tensorflow": without_tensorflow}
  answer = _ask(kind, request)
  if answer.get("timeout"):
    raise subprocess.TimeoutExpired([module, *args], timeout)
  return subprocess.CompletedProcess([sys.executable, "-m", module, *args], answer["returncode"],
                                     answer["stdout"], answer["stderr"])


def run_launcher(module: str, *args, env=None, timeout=120, without_tensorflow=False):
  """`run_module` for a launcher (launch.vertex, launch.tpu_vm), in a fork of a process that
  has imported their libraries once (tests/forking_runner.py): a process of its own as `-m`
  runs it (flags, exit code, output, environment), in a tenth of the time. With
  `without_tensorflow`, as `run_module_without_tensorflow`."""
  return _run_forked("launchers", module, args, env, timeout, without_tensorflow)


def run_command_forked(module: str, *args, env=None, timeout=600):
  """`run_module` for trainer.task, trainer.evaluate or trainer.predict, in a fork of a process
  that has imported TensorFlow and the trainer's libraries once: its own process, without a
  TensorFlow start-up (5-8 s) of its own, nor the start-up lines that come with it (a test of
  those runs `run_module`)."""
  return _run_forked("trainer", module, args, env, timeout, False)



class ForkedCommand:
  """A command started by `start_command_forked`, used as its subprocess.Popen would be: `pid`
  (the command's own process, to signal or to read in /proc), `args`, `returncode` (None until
  `poll` or `wait` has seen it end; minus the signal's number if a signal ended it), `poll()`,
  `wait(timeout)` (raising subprocess.TimeoutExpired), `send_signal`, `terminate`, `kill`.
  Its process is the runner's child, reaped only by `poll`: until then its pid stays its own."""

  def __init__(self, pid: int, args: list):
    self.pid, self.args, self.returncode = pid, args, None

  def poll(self):
    if self.returncode is None:
      self.returncode = _ask("trainer", {"op": "poll", "pid": self.pid})["returncode"]
    return self.returncode

  def wait(self, timeout=None):
    import time
    deadline = None if timeout is None else time.monotonic() + timeout
    while self.poll() is None:
      if deadline is not None and time.monotonic() >= deadline:
        raise subprocess.TimeoutExpired(self.args, timeout)
      time.sleep(0.005)
    return self.returncode

  def send_signal(self, sig) -> None:
    if self.poll() is None:  # As Popen: an ended (reaped) command's pid may be another's.
      os.kill(self.pid, sig)

  def terminate(self) -> None:
    import signal
    self.send_signal(signal.SIGTERM)

  def kill(self) -> None:
    import signal
    self.send_signal(signal.SIGKILL)


def start_command_forked(log_path, module: str, *args, env=None) -> ForkedCommand:
  """`start_trainer` for `python -m MODULE ARGS` (trainer.task, trainer.evaluate, trainer.predict,
  tests.stand_in_task), forked as `run_command_forked` runs it: its own process, its standard
  output and error going to `log_path` (there when this returns), without a TensorFlow start-up
  of its own, so without the interpreter's start-up stage (a test of that starts a real process).
  The commands still running when the session ends are killed."""
  request = {"op": "start", "module": module, "args": list(args), "env": _environment(env),
             "cwd": REPO, "log_path": os.path.abspath(str(log_path))}
  return ForkedCommand(_ask("trainer", request)["pid"], [sys.executable, "-m", module, *args])
