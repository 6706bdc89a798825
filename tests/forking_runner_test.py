"""The forking runner (tests/forking_runner.py) through helpers.start_command_forked and
helpers.run_command_forked: a forked command is its own process, started in the background or
run to its end, with its flags, environment, output, exit code and exit handlers as in its own
interpreter, and the Popen-like handle signals and reaps that process.

Run as `python -m tests.forking_runner_test MODE`, this file is the command the tests fork.
"""

import atexit
import os
import signal
import subprocess
import sys
import time

import pytest

from tests import helpers

MODULE = "tests.forking_runner_test"


def _wait_for(log_path, text: str, command, timeout=60) -> str:
  deadline = time.monotonic() + timeout
  while text not in log_path.read_text():
    assert command.poll() is None, f"ended (exit {command.returncode}): {log_path.read_text()}"
    assert time.monotonic() < deadline, f"no {text!r} after {timeout} s: {log_path.read_text()}"
    time.sleep(0.01)
  return log_path.read_text()


# The runner is the slow tier's (it imports TensorFlow: seconds), so these tests are too.

@pytest.mark.slow
def test_a_started_command_is_its_own_process_with_its_env_log_and_exit_code(tmp_path):
  log_path = tmp_path / "log"
  command = helpers.start_command_forked(log_path, MODULE, "handle-sigterm", "an argument",
                                         env={"FORKED_VALUE": "from the test"})
  assert log_path.exists()  # At once, before the command has written anything.
  log = _wait_for(log_path, "ready", command)
  assert f"pid {command.pid} " in log and command.pid != os.getpid(), log
  assert "argv ['an argument']" in log and f"cwd {helpers.REPO}" in log, log
  assert "FORKED_VALUE from the test" in log and "on stderr" in log, log
  assert command.poll() is None and command.returncode is None
  with pytest.raises(subprocess.TimeoutExpired):
    command.wait(timeout=0.05)
  command.send_signal(signal.SIGTERM)
  assert command.wait(timeout=30) == 7 and command.returncode == 7
  log = log_path.read_text()
  assert log.endswith("got SIGTERM\nexit handler\n"), log  # Its atexit, as at a real exit.
  command.kill()  # Ended and reaped: nothing is sent (as Popen).


@pytest.mark.slow
def test_a_started_command_ends_by_a_signal_as_a_real_process_does(tmp_path):
  killed = helpers.start_command_forked(tmp_path / "killed", MODULE, "sleep")
  interrupted = helpers.start_command_forked(tmp_path / "interrupted", MODULE, "sleep")
  _wait_for(tmp_path / "killed", "ready", killed)
  _wait_for(tmp_path / "interrupted", "ready", interrupted)
  killed.kill()
  interrupted.send_signal(signal.SIGINT)  # Python's own handler: KeyboardInterrupt, uncaught.
  assert killed.wait(timeout=30) == -signal.SIGKILL
  assert interrupted.wait(timeout=30) == -signal.SIGINT
  log = (tmp_path / "interrupted").read_text()
  # As the interpreter: the traceback, then the exit handlers, then death by SIGINT.
  assert "Traceback" in log and log.endswith("\nKeyboardInterrupt\nexit handler\n"), log


@pytest.mark.slow
def test_a_stop_signal_sent_at_once_ends_the_command_as_in_an_interpreters_start_up(tmp_path):
  # Sent before the command's module runs: held until it does, not taken in the runner's code.
  for sig in (signal.SIGINT, signal.SIGTERM):
    log_path = tmp_path / f"{sig.name}.log"
    command = helpers.start_command_forked(log_path, MODULE, "sleep")
    command.send_signal(sig)
    assert command.wait(timeout=30) == -sig, (sig, command.returncode, log_path.read_text())
    assert "ready" not in log_path.read_text()


@pytest.mark.slow
def test_a_command_run_to_its_end_still_answers_its_output_and_exit_code():
  result = helpers.run_command_forked(MODULE, "exit-3", env={"FORKED_VALUE": "run"})
  assert result.returncode == 3, result
  assert "FORKED_VALUE run" in result.stdout and "on stderr" in result.stderr, result


def _main(mode: str, *args) -> None:
  print(f"pid {os.getpid()} argv {list(args)} cwd {os.getcwd()}", flush=True)
  print(f"FORKED_VALUE {os.environ.get('FORKED_VALUE')}", flush=True)
  print("on stderr", file=sys.stderr, flush=True)
  atexit.register(print, "exit handler", flush=True)
  if mode == "exit-3":
    sys.exit(3)
  if mode == "handle-sigterm":
    def stop(*_):
      print("got SIGTERM", flush=True)
      sys.exit(7)
    signal.signal(signal.SIGTERM, stop)
  print("ready", flush=True)
  time.sleep(120)


if __name__ == "__main__":
  _main(*sys.argv[1:])
