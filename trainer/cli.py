"""What the command-line entry points share: bad input ends with one `error:` line and a code,
`-h` prints the flags grouped, and TensorFlow's start-up chatter can be kept off the log.

Nothing here imports TensorFlow: an entry point refuses bad flags before paying for it.
"""

import contextlib
import importlib.util
import logging as std_logging
import os
import re
import sys
import textwrap
import threading
from typing import Dict, Optional, Sequence

from absl import flags
from absl import logging

BAD_INPUT_EXIT_CODE = 2

# absl defines --help (short -?) and --helpshort; -h is what users type first.
HELP_ARGUMENTS = frozenset({"-h", "--help", "-help", "--helpshort", "-helpshort", "-?", "--?"})


def fail(message: str, exit_code: int = BAD_INPUT_EXIT_CODE) -> None:
  """Prints `error: message` to standard error and exits with `exit_code`."""
  print(f"error: {message}", file=sys.stderr)
  sys.exit(exit_code)


def parse_flags(argv, description: Optional[str] = None,
                groups: Optional[Dict[str, Sequence[str]]] = None):
  """absl's flag parsing, with a bad flag reported as one `error:` line like other bad input.

  Given `description` and `groups`, `-h` or `--help` prints `help_text(...)` and exits 0
  (absl's own --help exits 1 and lists the flags by module); --helpfull stays absl's.
  """
  if description is not None and wants_help(argv):
    print(help_text(description, groups or {}))
    sys.exit(0)
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    fail(f"{e} (see --help)" if description is not None else f"{e} (see --helpfull)")


def wants_help(argv) -> bool:
  """Whether the command line asks for help (arguments after a bare `--` do not count)."""
  for arg in argv[1:]:
    if arg == "--":
      return False
    if arg in HELP_ARGUMENTS:
      return True
  return False


def help_text(description: str, groups: Dict[str, Sequence[str]], width: int = 80) -> str:
  """`description`, then each group's flags with their defaults and help strings.

  `groups` maps a heading to flag names, in the order they are shown.
  """
  lines = [description.strip(), ""]
  for heading, names in groups.items():
    lines.append(f"{heading}:")
    for name in names:
      flag = flags.FLAGS[name]
      lines.append(f"  {_flag_usage(flag)}")
      # absl has already put an enum's choices in its help: "<auto|tpu>: ...".
      lines.extend(textwrap.wrap(flag.help, width, initial_indent=" " * 6, subsequent_indent=" " * 6))
    lines.append("")
  lines.append("Every setting is a --flag=value; --helpfull also lists absl's own flags.")
  return "\n".join(lines)


def _flag_usage(flag) -> str:
  if flag.flag_type() == "bool":
    return f"--[no]{flag.name}  (default: {'on' if flag.default else 'off'})"
  default = flag.value if flag.default is None else flag.default
  shown = "''" if default == "" else str(default)
  return f"--{flag.name}={shown}"


# One record of C++ logging, glog style: "I0000 00:00:1795886852.410807    4306 port.cc:153] ..."
# (before Abseil is initialised the time is "00:00:" and the seconds since 1970).
_CPP_RECORD = re.compile(r"^([IWEF])\d{4} \d\d:\d\d:\d+\.\d+ +\d+ [^ \]]+:\d+\] ")
_ABSL_NOT_INITIALIZED = "WARNING: All log messages before absl::InitializeLog() is called"
# Error records that only say there is no GPU: counted as warnings.
_NO_GPU = re.compile(r"cuda_platform\.cc:\d+\] failed call to cuInit")
_SEVERITIES = "IWEF"


@contextlib.contextmanager
def cpp_startup_log_filtered(min_level: int):
  """Drops C++ log records below `min_level` (0 INFO, 1 WARNING, 2 ERROR) written in the block.

  TensorFlow's own C++ logging honours $TF_CPP_MIN_LOG_LEVEL, but the lines some of its
  libraries write while they load (oneDNN's note, cudart_stub's "Could not find cuda
  drivers") go through Abseil's logging before it is initialised, which writes everything.
  So, around `import tensorflow` only, standard error goes into a pipe at the file
  descriptor, and a thread forwards each line as it arrives, without those records: what
  an import that aborts the process (an unsupported CPU, say) printed before it still shows.
  """
  if min_level <= 0:
    yield
    return
  sys.stderr.flush()
  real_stderr = os.dup(2)
  read_end, write_end = os.pipe()
  os.dup2(write_end, 2)
  os.close(write_end)

  def forward():
    with os.fdopen(read_end, "rb") as pipe:
      for line in pipe:
        if _without_quiet_records(line.decode(errors="replace"), min_level):
          os.write(real_stderr, line)

  forwarder = threading.Thread(target=forward, name="stderr-filter", daemon=True)
  forwarder.start()
  try:
    yield
  finally:
    sys.stderr.flush()
    os.dup2(real_stderr, 2)  # Closes the pipe's last write end: the thread reads to its end.
    forwarder.join(timeout=10)
    os.close(real_stderr)


def _without_quiet_records(text: str, min_level: int) -> str:
  """`text` without the C++ log lines below `min_level`; every other line is kept.

  Abseil's note that it is not initialised is a warning, dropped with the warnings.
  """
  kept = []
  for line in text.splitlines(keepends=True):
    record = _CPP_RECORD.match(line)
    severity = ("W" if line.startswith(_ABSL_NOT_INITIALIZED) or _NO_GPU.search(line) else
                record.group(1) if record else None)
    if severity is None or _SEVERITIES.index(severity) >= min_level:
      kept.append(line)
  return "".join(kept)


def quiet_tensorflow(verbose: bool = False) -> int:
  """Keeps TensorFlow's chatter off the log unless `verbose`; call before importing it.

  Sets $TF_CPP_MIN_LOG_LEVEL to 2 (errors only) unless the user set it, and drops the
  INFO lines TensorFlow's and TFDS's Python code logs (saver notes: "Assets written to",
  "Sharding callback duration"; TFDS's "Constructing tf.data.Dataset"). Our own INFO lines
  still show. Returns the C++ log level in force, for `cpp_startup_log_filtered`.
  """
  if not verbose:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    for library in ("tensorflow", "tensorflow_datasets"):
      quiet_library_info(library)
  try:
    return int(os.environ.get("TF_CPP_MIN_LOG_LEVEL", "0"))
  except ValueError:
    return 0


@contextlib.contextmanager
def tensorflow_imported_quietly(verbose: bool = False):
  """`quiet_tensorflow(verbose)`, then the block (which imports TensorFlow, directly or not)
  and TensorFlow's search for devices, with the C++ records below the level in force dropped.

  The search is made here because, on a machine without a GPU, it logs a failed cuInit as an
  error: counted as a warning (the strategy's line says how many GPUs there are).
  """
  with cpp_startup_log_filtered(quiet_tensorflow(verbose)):
    yield
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    tf.config.list_physical_devices()


class _BelowWarningFrom(std_logging.Filter):
  """Drops records under WARNING whose code lives under one directory (a library's)."""

  def __init__(self, directory: str):
    super().__init__()
    self.directory = os.path.join(os.path.realpath(directory), "")

  def filter(self, record):
    return (record.levelno >= std_logging.WARNING
            or not os.path.realpath(record.pathname).startswith(self.directory))


_quiet_filters = {}


def quiet_library_info(package: str) -> None:
  """Keeps `package`'s INFO lines off the log: those it logs with Python's logging or absl's.

  TensorFlow logs its saver notes ("Sharding callback duration", "Writing fingerprint to")
  through absl's logger, which our own lines use too, so they are told apart by the file
  that logged them; the rest ("Assets written to") go to the "tensorflow" logger. Finds the
  package without importing it; idempotent.
  """
  std_logging.getLogger(package).setLevel(std_logging.WARNING)
  if package in _quiet_filters:
    return
  spec = importlib.util.find_spec(package)
  if spec is None or not spec.submodule_search_locations:
    return
  _quiet_filters[package] = _BelowWarningFrom(list(spec.submodule_search_locations)[0])
  logging.get_absl_logger().addFilter(_quiet_filters[package])
