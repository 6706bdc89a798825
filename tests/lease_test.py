"""Tests of trainer.job.lease: real files, real threads and, where liveness matters, real processes."""

import importlib.util
import json
import os
import re
import select
import signal
import socket
import sys
import threading
import time
import traceback
import types
import uuid

import pytest
import tensorflow as tf

from trainer.errors import UserInputError
from trainer.job import lease as lease_lib
from trainer.job.lease import Lease, LeaseHeld, LeaseLost
from trainer.job.run_directory import LEASE as LEASE_NAME

FIELDS = ("token", "host", "pid", "boot_id", "process_start", "user", "command", "started",
          "renewed", "renewals")
TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")


def no_sleep(seconds):
  raise AssertionError(f"acquire watched the lease ({seconds} s) where it should decide at once")


def read_lease(directory) -> dict:
  with open(os.path.join(directory, LEASE_NAME)) as f:
    return json.load(f)


def write_lease(directory, content) -> None:
  with open(os.path.join(directory, LEASE_NAME), "wb" if isinstance(content, bytes) else "w") as f:
    f.write(content if isinstance(content, bytes) else json.dumps(content))


def boot_id() -> str:
  with open("/proc/sys/kernel/random/boot_id") as f:
    return f.read().strip()


def timestamp(seconds: float) -> str:
  return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def foreign_lease(**fields) -> dict:
  """A lease of another host's job, renewed now unless `fields` say otherwise."""
  now = timestamp(time.time())
  return {"token": uuid.uuid4().hex, "host": "elsewhere.example", "pid": 4242,
          "boot_id": "another-boot", "process_start": "77", "user": "someone",
          "command": "python -m trainer.task", "started": now, "renewed": now, "renewals": 3,
          **fields}


def eventually(predicate, timeout: float = 5.0) -> bool:
  deadline = time.monotonic() + timeout
  while not predicate():
    if time.monotonic() > deadline:
      return False
    time.sleep(0.02)
  return True


def takeover_lines(caplog) -> list:
  return [r.getMessage() for r in caplog.records if r.getMessage().startswith("Taking over")]


class Holder:
  """A process of its own holding a lease, forked from this one (a new interpreter would take
  seconds to import TensorFlow): it runs the real Lease, renewal thread and all, until killed or
  until this process ends (its pipe from here then reads as closed). Its pid, start time and
  renewals are its own, which is what a holder's liveness is judged by; used as a Popen."""

  def __init__(self, directory, identity: dict):
    ready_read, ready_write = os.pipe()
    self._stay_read, self._stay_write = os.pipe()
    self.pid = os.fork()
    if self.pid == 0:  # The child: never returns into pytest.
      code = 1
      try:
        os.close(ready_read)
        os.close(self._stay_write)
        Lease.acquire(str(directory), renew_every=0.1, stale_after=0.5, identity=identity)
        os.write(ready_write, b"held")
        os.read(self._stay_read, 1)  # Until killed, or this process ends.
        code = 0
      except BaseException:  # pylint: disable=broad-except
        traceback.print_exc()
      finally:
        sys.stderr.flush()
        os._exit(code)  # pylint: disable=protected-access
    os.close(ready_write)
    os.close(self._stay_read)
    self.returncode = None
    try:
      ready, _, _ = select.select([ready_read], [], [], 60)
      held = os.read(ready_read, 4) if ready else b""
    finally:
      os.close(ready_read)
    if held != b"held":
      self.kill()
      self.wait()
      raise AssertionError(f"the holder of {directory} took no lease (its output is the test's)")

  def kill(self) -> None:
    if self.returncode is None:
      os.kill(self.pid, signal.SIGKILL)

  def wait(self) -> int:
    if self.returncode is None:
      self.returncode = os.waitstatus_to_exitcode(os.waitpid(self.pid, 0)[1])
      os.close(self._stay_write)
    return self.returncode


@pytest.fixture(scope="module")
def holders(tmp_path_factory):
  """Processes holding the leases of directories, by name: "here" as a job of this host,
  "elsewhere" as another host's; killed at the end."""
  identities = {"here": {}, "elsewhere": {"host": "elsewhere.example"}}
  children = {}
  try:
    for name, identity in identities.items():
      directory = tmp_path_factory.mktemp(name)
      children[name] = (directory, Holder(directory, identity))
    yield children
  finally:
    for _, child in children.values():
      child.kill()
      child.wait()


def test_a_fresh_directory_gets_a_lease_naming_this_process(tmp_path):
  directory = tmp_path / "run"  # Missing: acquire makes it.
  lease = Lease.acquire(str(directory), sleep=no_sleep)
  written = read_lease(directory)
  assert set(FIELDS) <= set(written) and written["token"] == lease.token
  assert re.fullmatch(r"[0-9a-f]{32}", written["token"])
  stat = open("/proc/self/stat").read().rpartition(")")[2].split()
  assert (written["host"], written["pid"], written["boot_id"], written["process_start"]) == (
      socket.gethostname(), os.getpid(), boot_id(), stat[19])
  assert written["command"] == " ".join([_as_typed(), *sys.argv[1:]])[:200]
  assert written["renewals"] == 0
  assert TIMESTAMP.match(written["started"]) and written["renewed"] == written["started"]
  started = time.monotonic()
  lease.release()
  assert time.monotonic() - started < 1.0  # The renewal thread stops at once, not in 30 s.
  assert os.listdir(directory) == []
  lease.release()  # Idempotent.


def _as_typed():
  """How this test process was started: `python -m pytest` or a `pytest` script."""
  spec = sys.modules["__main__"].__spec__
  return "python -m pytest" if spec else sys.argv[0]


def test_the_lease_names_a_module_run_as_its_user_typed_it(monkeypatch):
  main = types.ModuleType("__main__")
  main.__spec__ = importlib.util.spec_from_loader("trainer.task", loader=None)
  monkeypatch.setitem(sys.modules, "__main__", main)
  monkeypatch.setattr(sys, "argv", ["/site-packages/trainer/task.py", "--epochs=2"])
  assert lease_lib.this_process()["command"] == "python -m trainer.task --epochs=2"


def test_the_thread_renews_the_lease_through_whole_files(tmp_path):
  with Lease.acquire(str(tmp_path), renew_every=0.05, stale_after=1.0) as lease:
    assert eventually(lambda: read_lease(tmp_path)["renewals"] >= 3)
    renewed = read_lease(tmp_path)
    assert renewed["token"] == lease.token and renewed["renewed"] >= renewed["started"]
    lease.check()
  assert os.listdir(tmp_path) == []  # Released on leaving the block, no temporary left.


def test_a_live_job_of_this_host_is_refused_then_taken_over_once_killed(holders, caplog):
  directory, child = holders["here"]
  with pytest.raises(LeaseHeld) as refused:
    Lease.acquire(str(directory), sleep=no_sleep)
  message = str(refused.value)
  assert f"pid {child.pid} on host {socket.gethostname()}" in message and "\n" not in message
  assert message.endswith("wait for it to end or stop it; a run directory takes one job at a time")
  started = read_lease(directory)["started"]
  os.kill(child.pid, signal.SIGKILL)
  # Not reaped yet: a zombie, whose /proc entry remains, has ended all the same.
  assert eventually(lambda: open(f"/proc/{child.pid}/stat").read().rpartition(")")[2].split()[0]
                    == "Z")
  lease = Lease.acquire(str(directory), sleep=no_sleep)
  assert read_lease(directory)["token"] == lease.token
  assert takeover_lines(caplog) == [
      f"Taking over the lease of {directory} from pid {child.pid} on host {socket.gethostname()} "
      f"(started {started}): that process has ended."]
  lease.release()


def test_another_hosts_lease_is_watched_refused_while_renewed_taken_once_not(holders, caplog):
  directory, child = holders["elsewhere"]
  naps = []

  def nap(seconds):
    naps.append(seconds)
    time.sleep(seconds)

  with pytest.raises(LeaseHeld, match=f"pid {child.pid} on host elsewhere.example "):
    # A long watch, lest a loaded machine delay the child's renewals; it ends at the first.
    Lease.acquire(str(directory), renew_every=0.1, stale_after=2.0, sleep=nap)
  assert naps and set(naps) == {0.1}  # It watched before refusing.
  child.kill()
  child.wait()
  naps.clear()
  lease = Lease.acquire(str(directory), renew_every=0.1, stale_after=0.5, sleep=nap)
  assert naps == [0.1] * 5 and read_lease(directory)["token"] == lease.token
  assert takeover_lines(caplog)[-1].endswith(": it was not renewed for 0.5 s.")
  lease.release()


def test_a_lease_left_unrenewed_is_taken_over_after_stale_after(tmp_path, caplog):
  other = foreign_lease()
  write_lease(tmp_path, other)
  started = time.monotonic()
  lease = Lease.acquire(str(tmp_path), renew_every=0.1, stale_after=0.5)
  assert 0.5 <= time.monotonic() - started < 3.0
  assert read_lease(tmp_path)["token"] == lease.token
  assert takeover_lines(caplog) == [
      f"Taking over the lease of {tmp_path} from pid 4242 on host elsewhere.example (started "
      f"{other['started']}): it was not renewed for 0.5 s."]
  lease.release()


@pytest.mark.parametrize("holder", [
    {},  # Another host's.
    {"host": socket.gethostname(), "pid": os.getpid()},  # This process, but of another boot.
])
def test_a_lease_renewed_long_ago_is_taken_over_without_watching(tmp_path, caplog, holder):
  write_lease(tmp_path, foreign_lease(renewed=timestamp(time.time() - 3600), **holder))
  lease = Lease.acquire(str(tmp_path), sleep=no_sleep)
  assert read_lease(tmp_path)["token"] == lease.token
  assert re.search(r": not renewed for (359\d|3600) s, over 90 s\.$", takeover_lines(caplog)[0])
  lease.release()


def test_a_reused_pid_of_this_host_reads_as_ended(tmp_path, caplog):
  # This process's pid, but another start time: the holder was an earlier process.
  write_lease(tmp_path, foreign_lease(host=socket.gethostname(), boot_id=boot_id(),
                                      pid=os.getpid(), process_start="1"))
  lease = Lease.acquire(str(tmp_path), sleep=no_sleep)
  assert read_lease(tmp_path)["token"] == lease.token
  assert takeover_lines(caplog)[0].endswith("that process has ended.")
  lease.release()


@pytest.mark.parametrize("content", [
    b"garbage", b"", b"[]", b"{}", b"\xff\xfe\x00", json.dumps(foreign_lease(pid="12")),
    json.dumps(foreign_lease(pid=0)), json.dumps(foreign_lease(renewed="yesterday")),
    json.dumps({k: v for k, v in foreign_lease().items() if k != "renewed"}),
])
def test_a_damaged_lease_file_is_taken_over_with_a_warning(tmp_path, caplog, content):
  write_lease(tmp_path, content)
  lease = Lease.acquire(str(tmp_path), sleep=no_sleep)
  assert read_lease(tmp_path)["token"] == lease.token
  assert takeover_lines(caplog)[0].startswith(
      f"Taking over the lease file {tmp_path / LEASE_NAME}: it holds no lease (")
  lease.release()


def test_a_job_of_this_process_is_held_too_and_the_message_is_one_line(tmp_path):
  identity = {"command": "python -m trainer.task\n--model_dir=x", "user": "a\r\nb"}
  with Lease.acquire(str(tmp_path), identity=identity):
    with pytest.raises(LeaseHeld) as refused:
      Lease.acquire(str(tmp_path), sleep=no_sleep)
  message = str(refused.value)
  assert "\n" not in message and "\r" not in message
  assert "(user a b, since " in message
  assert "command: python -m trainer.task --model_dir=x)" in message


def test_release_leaves_another_jobs_lease(tmp_path):
  lease = Lease.acquire(str(tmp_path))
  other = foreign_lease()
  write_lease(tmp_path, other)
  lease.release()
  assert read_lease(tmp_path)["token"] == other["token"]


def test_check_raises_lease_lost_once_another_job_took_over(tmp_path):
  lease = Lease.acquire(str(tmp_path), renew_every=0.05, stale_after=1.0)
  lease.check()
  other = foreign_lease()
  write_lease(tmp_path, other)
  assert eventually(lambda: lease._lost_to is not None)  # pylint: disable=protected-access
  with pytest.raises(LeaseLost) as lost:
    lease.check()
  message = str(lost.value)
  assert "pid 4242 on host elsewhere.example" in message and "\n" not in message
  assert "this job stops so as not to mix two jobs' outputs" in message
  time.sleep(0.2)
  assert read_lease(tmp_path) == other  # Never overwritten by the renewal.
  lease.release()
  assert read_lease(tmp_path) == other


def test_a_deleted_lease_is_lost_too(tmp_path):
  lease = Lease.acquire(str(tmp_path), renew_every=0.05, stale_after=1.0)
  os.remove(tmp_path / LEASE_NAME)
  assert eventually(lambda: lease._lost_to is not None)  # pylint: disable=protected-access
  with pytest.raises(LeaseLost, match="lease .* was deleted or damaged while it ran"):
    lease.check()
  lease.release()
  assert not os.path.exists(tmp_path / LEASE_NAME)


@pytest.mark.parametrize("taken", [False, True])
def test_check_reads_the_file_so_a_lost_lease_stops_writes_before_any_renewal(tmp_path, taken):
  lease = Lease.acquire(str(tmp_path), renew_every=3600.0, stale_after=7200.0)
  os.remove(tmp_path / LEASE_NAME)
  if taken:
    second = Lease.acquire(str(tmp_path))
  with pytest.raises(LeaseLost, match="another job took over" if taken else "was deleted"):
    lease.check()
  lease.release()
  if taken:
    assert read_lease(tmp_path)["token"] == second.token
    second.release()


def test_renewal_errors_are_logged_once_and_never_raised(tmp_path, caplog):
  lease = Lease.acquire(str(tmp_path), renew_every=0.05, stale_after=1.0)
  path = tmp_path / LEASE_NAME
  os.remove(path)
  os.mkdir(path)  # Unreadable as a file: each renewal fails to read it.
  time.sleep(0.4)
  warnings = [r.getMessage() for r in caplog.records if "Could not renew" in r.getMessage()]
  assert len(warnings) == 1 and str(path) in warnings[0]
  lease.check()  # Not lost: the lease could not be read, which says nothing of its holder.
  os.rmdir(path)
  assert eventually(lambda: lease._lost_to is not None)  # pylint: disable=protected-access
  lease.release()


def test_of_jobs_racing_for_a_fresh_directory_exactly_one_wins(tmp_path):
  for round_number in range(15):
    directory, racers = str(tmp_path / str(round_number)), 4
    start, winners, refusals = threading.Barrier(racers), [], []

    def race():
      start.wait()
      try:
        winners.append(Lease.acquire(directory, sleep=no_sleep))
      except LeaseHeld as refusal:
        refusals.append(refusal)

    threads = [threading.Thread(target=race) for _ in range(racers)]
    for thread in threads:
      thread.start()
    for thread in threads:
      thread.join()
    assert len(winners) == 1 and len(refusals) == racers - 1
    assert read_lease(directory)["token"] == winners[0].token
    winners[0].release()


def test_a_gcs_like_path_goes_through_gfile(caplog):
  # TensorFlow's in-memory file system stands in for gs://: a path with "://", no hard links.
  directory = f"ram://lease-test-{uuid.uuid4().hex}/run"
  path = f"{directory}/{LEASE_NAME}"
  with Lease.acquire(directory, sleep=no_sleep) as lease:
    with tf.io.gfile.GFile(path) as f:
      assert json.load(f)["token"] == lease.token
    with pytest.raises(LeaseHeld, match=f"pid {os.getpid()} "):
      Lease.acquire(directory, sleep=no_sleep)
  assert not tf.io.gfile.exists(path)
  with tf.io.gfile.GFile(path, "w") as f:
    f.write("garbage")
  with Lease.acquire(directory, sleep=no_sleep) as lease:
    with tf.io.gfile.GFile(path) as f:
      assert json.load(f)["token"] == lease.token
  assert takeover_lines(caplog)[0].startswith(f"Taking over the lease file {path}: ")


def test_a_directory_that_cannot_be_made_is_a_user_input_error(tmp_path):
  (tmp_path / "file").write_text("in the way")
  with pytest.raises(UserInputError, match="give a run directory this job may write"):
    Lease.acquire(str(tmp_path / "file" / "run"))


def test_renewals_must_come_well_within_the_stale_time(tmp_path):
  with pytest.raises(ValueError, match="renew_every"):
    Lease.acquire(str(tmp_path), renew_every=90.0, stale_after=90.0)
