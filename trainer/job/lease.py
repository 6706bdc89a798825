"""One job per run directory: a lease file, `lease.json`, that the job holding it renews.

`Lease.acquire(model_dir)` takes the run directory or raises LeaseHeld naming its holder; a
thread renews the file every `renew_every` seconds; `check()` raises LeaseLost once another job
took it over. A lease is taken over at once where its holder surely ended (a gone process of
this host and boot, or no renewal for `stale_after` s by our clock), else after watching it go
unrenewed that long.

Locally, two jobs starting at once cannot both create the lease: a hard link makes it appear
whole, and once. GCS has no file locks (nor, through tf.io.gfile, conditional writes): a job
writes the lease and reads it back, so two jobs started within a second or so of each other may
both pass; a later one is refused. Taking over a stale lease has that window everywhere; the job
whose token was overwritten finds out at its next renewal, and its `check()` raises LeaseLost.
"""

import calendar
import getpass
import json
import math
import os
import socket
import sys
import threading
import time
import uuid
from typing import Callable, Dict, Optional, Tuple

import tensorflow as tf
from absl import logging

from trainer.errors import first_line, JobError, UserInputError
from trainer.job import run_directory

RENEW_EVERY_SECONDS = 30.0
STALE_AFTER_SECONDS = 90.0  # 3 renewals missed

# A file lacking any of these holds no lease (it is taken over); extra fields are allowed.
_FIELDS = ("token", "host", "pid", "boot_id", "process_start", "user", "command", "started",
           "renewed", "renewals")
_TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"
_BOOT_ID = "/proc/sys/kernel/random/boot_id"
_ATTEMPTS = 3  # Each lost race re-applies the rules to the winner; more is churn.
_FIX = "wait for it to end or stop it; a run directory takes one job at a time"
_DELETED = "deleted"  # What `_lost_to` holds where the file holds no lease at all.


class LeaseHeld(JobError):
  """Another live job holds the run directory."""


class LeaseLost(JobError):
  """Another job took over this job's lease while it ran."""


def _one_line(value, limit: int = 200) -> str:
  """`value` as at most `limit` characters on one line, for one-line messages."""
  return " ".join(str(value).splitlines())[:limit]


def _proc_text(path: str) -> str:
  """The stripped text of a /proc file; "" where there is none (no /proc, no such process)."""
  try:
    with open(path) as f:
      return f.read().strip()
  except OSError:
    return ""


def _process_start(pid: int) -> str:
  """Field 22 of /proc/<pid>/stat, its start time; "" if the process is gone or a zombie."""
  # Split after the command's ")": the command may hold spaces and parentheses.
  fields = _proc_text(f"/proc/{pid}/stat").rpartition(")")[2].split()
  return fields[19] if len(fields) > 19 and fields[0] not in ("Z", "X") else ""


def this_process() -> Dict[str, object]:
  """The fields of a lease that say who holds it, for this process."""
  try:
    user = getpass.getuser()
  except (KeyError, OSError):  # A container's uid may have no name.
    user = ""
  return {"host": socket.gethostname(), "pid": os.getpid(), "boot_id": _proc_text(_BOOT_ID),
          "process_start": _process_start(os.getpid()), "user": user,
          "command": _command()[:200]}


def _command() -> str:
  """This process's command as its user typed it: `python -m trainer.task ...` where Python
  ran a module (sys.argv[0] is then the module's file path)."""
  spec = getattr(sys.modules.get("__main__"), "__spec__", None)
  module = spec.name.removesuffix(".__main__") if spec and spec.name else ""
  program = f"python -m {module}" if module else sys.argv[0]
  return " ".join([program, *sys.argv[1:]])


def process_alive(holder: Dict) -> Optional[bool]:
  """Whether a lease's holder runs; None where this machine cannot tell (another host or boot).

  With /proc, pid and start time name one process (a reused pid reads as ended); without,
  `os.kill(pid, 0)` says whether the pid exists.
  """
  if (holder["host"], holder["boot_id"]) != (socket.gethostname(), _proc_text(_BOOT_ID)):
    return None
  if os.path.isdir("/proc/self"):
    start = _process_start(holder["pid"])
    return bool(start) and holder["process_start"] in ("", start)
  try:
    os.kill(holder["pid"], 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # It exists, as another user's.
    pass
  return True


def _parse(content: Optional[bytes]) -> Tuple[Dict, str]:
  """The lease in `content` and "", or {} and why there is none (no file, or no lease in it)."""
  if content is None:
    return {}, "no file"
  try:
    lease = json.loads(content)
    if not isinstance(lease, dict):
      return {}, "not a JSON object"
    missing = [field for field in _FIELDS if field not in lease]
    # bool is an int to Python; a pid of 0 or less would signal a process group in os.kill.
    if missing or not isinstance(lease["token"], str) or type(lease["renewals"]) is not int or (
        type(lease["pid"]) is not int or lease["pid"] <= 0):
      return {}, f"no {', '.join(missing)}" if missing else "a field of the wrong type"
    lease["renewed_seconds"] = calendar.timegm(time.strptime(str(lease["renewed"]), _TIME_FORMAT))
  except ValueError as e:
    return {}, first_line(e)
  return lease, ""


def _read(path: str) -> Optional[bytes]:
  """The file's bytes; None if there is no file."""
  try:
    with tf.io.gfile.GFile(path, "rb") as f:
      return f.read()
  except tf.errors.NotFoundError:
    return None


def _write(path: str, content: bytes, token: str, *, create: bool) -> bool:
  """Writes `content` at `path` (where `create`, only if no file is there); True if the file
  then holds it. Through a temporary name of this writer's, so no reader sees half a file."""
  local = "://" not in path
  if create and not local and tf.io.gfile.exists(path):
    return False
  temporary = f"{path}.{token}.tmp"
  with tf.io.gfile.GFile(temporary, "wb") as f:
    f.write(content)
  if create and local:
    try:
      os.link(temporary, path)  # Unlike O_EXCL, never shows the loser an unwritten file.
      linked = True
    except FileExistsError:
      linked = False
    except OSError:  # No hard links here (a FUSE mount, say): as on GCS.
      linked = False if os.path.exists(path) else None
    if linked is not None:
      os.remove(temporary)
      return linked
  tf.io.gfile.rename(temporary, path, overwrite=True)
  return _read(path) == content


class Lease:
  """This job's hold on a run directory, from `acquire` to `release` (or a `with` block's end)."""

  def __init__(self, path: str, record: Dict, renew_every: float, stale_after: float,
               is_alive: Callable, clock: Callable, sleep: Callable):
    """Takes the lease at `path` for `record`, or raises LeaseHeld; `acquire` says how."""
    self.path, self.directory, self.token = path, os.path.dirname(path), record["token"]
    self._record, self._renew_every, self._stale_after = record, renew_every, stale_after
    self._is_alive, self._clock, self._sleep = is_alive, clock, sleep
    self._stopped, self._warned = threading.Event(), set()
    self._lost_to: Optional[str] = None  # Who holds the file once the lease was lost.
    self._take()
    self._thread = threading.Thread(target=self._renew_until_stopped, name="lease", daemon=True)
    self._thread.start()

  @classmethod
  def acquire(cls, directory: str, *, renew_every: float = RENEW_EVERY_SECONDS,
              stale_after: float = STALE_AFTER_SECONDS, identity: Optional[Dict] = None,
              is_alive: Optional[Callable[[Dict], Optional[bool]]] = None,
              clock: Callable[[], float] = time.time,
              sleep: Callable[[float], None] = time.sleep) -> "Lease":
    """Takes the run directory for this job, or raises LeaseHeld naming the job holding it.

    `identity` overrides fields of `this_process()`, `is_alive` stands in for `process_alive`,
    `clock` and `sleep` for time.time and time.sleep. Raises UserInputError where the directory
    cannot be written, ValueError unless 0 < renew_every < stale_after.
    """
    if not 0 < renew_every < stale_after:
      raise ValueError(f"Lease: need 0 < renew_every={renew_every} < stale_after={stale_after}")
    now = time.strftime(_TIME_FORMAT, time.gmtime(clock()))
    record = {**this_process(), **(identity or {}), "token": uuid.uuid4().hex, "started": now,
              "renewed": now, "renewals": 0}
    path = run_directory.of(directory).lease
    try:
      tf.io.gfile.makedirs(directory)
      return cls(path, record, renew_every, stale_after, is_alive or process_alive, clock, sleep)
    except (tf.errors.OpError, OSError) as e:
      raise UserInputError(f"cannot take the lease {path} ({type(e).__name__}: {first_line(e)}); "
                           "give a run directory this job may write") from None

  def check(self) -> None:
    """Raises LeaseLost where the file holds another job's lease, or none (deleted or
    damaged). It reads the file: a job checks before each write of its outputs, so that it
    writes nothing once its lease is gone, however long ago the renewal looked."""
    if self._lost_to is None:
      try:
        holder = _parse(_read(self.path))[0]
      except (tf.errors.OpError, OSError):  # Unreadable now: the renewal warns and retries.
        holder = {"token": self.token}
      if holder.get("token") != self.token:
        self._lost_to = self._who(holder) if holder else _DELETED
    if self._lost_to == _DELETED:
      raise LeaseLost(_one_line(
          f"this job's lease {self.path} was deleted or damaged while it ran, so another job "
          "may be writing the run directory too; this job stops without writing more; once "
          "no other job uses it, run the same command to resume from its last checkpoint", 1000))
    if self._lost_to is not None:
      raise LeaseLost(_one_line(f"another job took over the run directory {self.directory} while "
                                f"this job ran: {self._lost_to}; this job stops so as not to mix "
                                "two jobs' outputs", 1000))

  def release(self) -> None:
    """Stops renewing; deletes the file only if it still holds this job's token. Idempotent."""
    if self._stopped.is_set():
      return
    self._stopped.set()
    self._thread.join(30.0)  # A renewal stuck in I/O should not hold up the job's exit.
    try:
      if _parse(_read(self.path))[0].get("token") == self.token:
        tf.io.gfile.remove(self.path)
    except (tf.errors.OpError, OSError) as e:  # Left behind, it reads as its holder ended.
      logging.warning("Could not delete the lease %s (%s).", self.path, first_line(e))

  def __enter__(self) -> "Lease":
    return self

  def __exit__(self, *exc_info) -> None:
    self.release()

  def _take(self) -> None:
    """Writes our record as the lease, or raises LeaseHeld."""
    content = json.dumps(self._record, indent=2, sort_keys=True).encode()
    for _ in range(_ATTEMPTS):
      if _write(self.path, content, self.token, create=True):
        return
      seen = _read(self.path)
      reason = self._judge(seen) if seen is not None else None
      if reason:  # None: released, or changed while watched; the rules apply anew.
        logging.warning("%s", reason)
        if _write(self.path, content, self.token, create=False):
          return
    raise LeaseHeld(f"another job holds the run directory {self.directory}: its lease changed "
                    f"under this job {_ATTEMPTS} times; {_FIX}")

  def _judge(self, content: bytes) -> Optional[str]:
    """Why the lease in `content` may be taken over (a log line); None if it changed meanwhile.
    Raises LeaseHeld where its holder lives."""
    holder, problem = _parse(content)
    if problem:
      return f"Taking over the lease file {self.path}: it holds no lease ({problem})."
    whose = _one_line(f"the lease of {self.directory} from pid {holder['pid']} on host "
                      f"{holder['host']} (started {holder['started']})", 400)
    alive = self._is_alive(holder)
    if alive is False:
      return f"Taking over {whose}: that process has ended."
    if alive:
      raise LeaseHeld(self._held(holder))
    age = self._clock() - holder["renewed_seconds"] - 1  # At least: `renewed` is cut to seconds.
    if age > self._stale_after:
      return f"Taking over {whose}: not renewed for {age:.0f} s, over {self._stale_after:g} s."
    interval = min(self._renew_every, 5.0)
    for _ in range(math.ceil(self._stale_after / interval - 1e-9)):
      self._sleep(interval)
      now = _read(self.path)
      if now != content:
        holder, problem = _parse(now)
        if problem:  # Deleted or damaged: the rules say what to do with that.
          return None
        raise LeaseHeld(self._held(holder))
    return f"Taking over {whose}: it was not renewed for {self._stale_after:g} s."

  def _held(self, holder: Dict) -> str:
    return _one_line(f"another job holds the run directory {self.directory}: {self._who(holder)}; "
                     f"{_FIX}", 1000)

  def _who(self, holder: Dict) -> str:
    """Who holds the lease `holder`, for one-line messages."""
    ago = max(0.0, self._clock() - holder["renewed_seconds"])
    return (f"pid {holder['pid']} on host {holder['host']} (user {holder['user']}, since "
            f"{holder['started']}, renewed {ago:.0f} s ago; command: "
            f"{_one_line(holder['command'])})")

  def _renew_until_stopped(self) -> None:
    """Every `renew_every` s, marks the lease renewed while it holds our token; stops once it
    holds another's or none, never overwriting it."""
    while not self._stopped.wait(self._renew_every):
      try:
        holder = _parse(_read(self.path))[0]
        if holder.get("token") != self.token:
          self._lost_to = self._who(holder) if holder else _DELETED
          return
        renewed = {**self._record, "renewals": self._record["renewals"] + 1,
                   "renewed": time.strftime(_TIME_FORMAT, time.gmtime(self._clock()))}
        _write(self.path, json.dumps(renewed, indent=2, sort_keys=True).encode(), self.token,
               create=False)
        self._record = renewed
      except Exception as e:  # pylint: disable=broad-except
        # Raised, it would end the renewal, and the lease would go stale under a live job.
        if type(e).__name__ not in self._warned:
          self._warned.add(type(e).__name__)
          logging.warning("Could not renew the lease %s (%s: %s); trying again every %g s.",
                          self.path, type(e).__name__, first_line(e), self._renew_every)
