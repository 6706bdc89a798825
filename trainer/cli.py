"""What the command-line entry points share: bad input ends with one `error:` line and a code,
`-h` prints the flags grouped, and TensorFlow's start-up chatter can be kept off the log.

Also the trainer's flags, one per setting of `TrainConfig`: `trainer.task` defines them into
absl's global FLAGS when imported, so the launchers, whose own flags live there, never import it;
they check the arguments they pass the trainer with `check_trainer_arguments`, which defines the
same flags into a FlagValues of its own.

Nothing here imports TensorFlow: an entry point refuses bad flags before paying for it.
"""

import contextlib
import dataclasses
import importlib.util
import logging as std_logging
import os
import re
import sys
import textwrap
import threading
from typing import Dict, List, Mapping, Optional, Sequence, Set

from absl import app  # noqa: F401  Its flags (--pdb, --only_check_args) are the trainer's too.
from absl import flags
from absl import logging

from trainer import config as config_lib
from trainer import errors


# absl defines --help (short -?) and --helpshort; -h is what users type first.
HELP_ARGUMENTS = frozenset({"-h", "--help", "-help", "--helpshort", "-helpshort", "-?", "--?"})


def fail(message: str, exit_code: int = errors.BAD_INPUT_EXIT_CODE) -> None:
  """Prints `error: message` to standard error and exits with `exit_code`."""
  print(f"error: {message}", file=sys.stderr)
  sys.exit(exit_code)


def parse_flags(argv, description: Optional[str] = None,
                groups: Optional[Dict[str, Sequence[str]]] = None, launcher: str = ""):
  """absl's flag parsing, with a bad flag, or one given twice (absl would keep the last),
  reported as one `error:` line like other bad input.

  Given `description` and `groups`, `-h` or `--help` prints `help_text(...)` and exits 0
  (absl's own --help exits 1 and lists the flags by module); --helpfull stays absl's. Given
  `launcher` (its module: one that passes its arguments after `--` to the trainer), a trainer
  flag given before `--` is refused with `misplaced_trainer_flag`'s hint.
  """
  if description is not None and wants_help(argv):
    try:
      print(help_text(description, groups or {}), flush=True)
    except BrokenPipeError:  # `--help | head` has read what it wanted: no traceback.
      os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    sys.exit(0)
  try:
    # Flagfiles expanded as absl expands them: a flag in one and on the command line is repeated.
    refuse_repeated_flags(flags.FLAGS.read_flags_from_files(argv[1:], force_gnu=False))
    return flags.FLAGS(argv)
  except errors.UserInputError as e:  # Before ValueError, which it is.
    fail(str(e))
  # absl says a --noflag given a value ("--noreport=1 does not take an argument") as a ValueError.
  except (flags.Error, ValueError) as e:
    hint = (misplaced_trainer_flag(e, launcher)
            if launcher and isinstance(e, flags.UnrecognizedFlagError) else None)
    fail(hint or (f"{e} (see --help)" if description is not None else f"{e} (see --helpfull)"))


def refuse_repeated_flags(args: Sequence[str], flag_values: flags.FlagValues = flags.FLAGS
                          ) -> None:
  """Raises UserInputError naming a flag of `flag_values` that `args` (no program name, flagfiles
  expanded) give more than once, and each time it is given. absl would keep the last silently;
  a flag given twice is a mistake (a fixed flag that Vertex AI tuning also searches, say: it
  appends the searched value)."""
  for name, given in flag_occurrences(args, flag_values).items():
    if len(given) > 1:
      times = "twice" if len(given) == 2 else f"{len(given)} times"
      raise errors.UserInputError(
          f"--{name} is given {times} ({', then '.join(given)}): give it once")


def flag_occurrences(args: Sequence[str], flag_values: flags.FlagValues) -> Dict[str, List[str]]:
  """Each flag of `flag_values` that `args` set, by its name, with the arguments that set it as
  written: `--epochs=3`, `-epochs 3` (absl takes the next argument as the value of a flag that
  is not boolean), `--noreport`, a short name. As absl reads them, up to a bare `--`, without
  parsing values; positional arguments, flags `flag_values` lacks, --flagfile (expand it first)
  and multi-valued flags (repeated by design) are left out."""
  occurrences: Dict[str, List[str]] = {}
  remaining = iter(args)
  for arg in remaining:
    if arg == "--":
      break
    if not arg.startswith("-"):
      continue
    name, has_value, _ = arg[2 if arg.startswith("--") else 1:].partition("=")
    flag = _flag_named(name, flag_values)
    if flag is None or isinstance(flag, flags.MultiFlag):
      continue
    if not flag.boolean and not has_value:
      value = next(remaining, None)
      arg = arg if value is None else f"{arg} {value}"
    occurrences.setdefault(flag.name, []).append(arg)
  return occurrences


def _flag_named(name: str, flag_values: flags.FlagValues) -> Optional[flags.Flag]:
  """The flag `--name` sets (`--noreport` sets report), or None if it is none of theirs."""
  if name in flag_values:
    return flag_values[name]
  if name.startswith("no") and name[2:] in flag_values and flag_values[name[2:]].boolean:
    return flag_values[name[2:]]
  return None


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
  if isinstance(default, list):  # A list flag (DEFINE_list) is written comma-separated.
    default = ",".join(map(str, default))
  shown = "''" if default == "" else str(default)
  return f"--{flag.name}={shown}"


# One record of C++ logging, glog style: "I0000 00:00:1795886852.410807    4306 port.cc:153] ..."
# (before Abseil is initialised the time is "00:00:" and the seconds since 1970).
_CPP_RECORD = re.compile(r"^([IWEF])\d{4} \d\d:\d\d:\d+\.\d+ +\d+ [^ \]]+:\d+\] ")
_ABSL_NOT_INITIALIZED = "WARNING: All log messages before absl::InitializeLog() is called"
# Error records that say no more than a warning would, counted as warnings: there is no GPU;
# oneDNN has no float16 (or bfloat16) kernels on a CPU without AVX-512, so Eigen's run them.
_NOT_ERRORS = re.compile(r"cuda_platform\.cc:\d+\] failed call to cuInit"
                         r"|util\.cc:\d+\] oneDNN supports DT_\w+ only on platforms with AVX-512")
_SEVERITIES = "IWEF"


@contextlib.contextmanager
def cpp_startup_log_filtered(min_level: int):
  """Drops C++ log records below `min_level` (0 INFO, 1 WARNING, 2 ERROR) written in the block.

  TensorFlow's own C++ logging honours $TF_CPP_MIN_LOG_LEVEL, but the lines some of its
  libraries write while they load (oneDNN's note, cudart_stub's "Could not find cuda
  drivers") go through Abseil's logging before it is initialised, which writes everything.
  So, around `import tensorflow` (and a first op) only, standard error goes into a pipe at
  the file descriptor, and a thread forwards each line as it arrives, without those records:
  what an import that aborts the process (an unsupported CPU, say) printed before it still
  shows.
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
    severity = ("W" if line.startswith(_ABSL_NOT_INITIALIZED) or _NOT_ERRORS.search(line) else
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
def tensorflow_imported_quietly(verbose: bool = False, float16_op: bool = True):
  """`quiet_tensorflow(verbose)`, then the block (which imports TensorFlow, directly or not)
  and TensorFlow's search for devices, with the C++ records below the level in force dropped;
  with `float16_op`, `float16_op_run_quietly` too.

  The search is made here because, on a machine without a GPU, it logs a failed cuInit as an
  error: counted as a warning (the strategy's line says how many GPUs there are). Pass
  `float16_op=False` where TensorFlow's context must not start yet (the trainer: its strategy
  comes first), and call `float16_op_run_quietly` then.
  """
  with cpp_startup_log_filtered(quiet_tensorflow(verbose)):
    yield
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    tf.config.list_physical_devices()
  if float16_op:
    float16_op_run_quietly(verbose)


def float16_op_run_quietly(verbose: bool = False) -> None:
  """Runs one float16 op on the CPU, with the C++ records below the level in force dropped.

  With oneDNN on (TensorFlow's default on recent Intel CPUs), the first float16 op of a process
  on a CPU without AVX-512 logs, as an error, that Eigen's kernels run it instead: once, and
  whenever a model or an export computes in float16. Run here, the record is counted as a
  warning, and the model's ops say nothing. Starts TensorFlow's context.
  """
  with cpp_startup_log_filtered(quiet_tensorflow(verbose)):
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    with tf.device("/cpu:0"):
      tf.matmul(tf.ones((1, 1), tf.float16), tf.ones((1, 1), tf.float16))


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


# The trainer's flags. A setting's flag by the type of its field; a field with choices is an enum.
_DEFINE_BY_TYPE = {str: flags.DEFINE_string, int: flags.DEFINE_integer,
                   float: flags.DEFINE_float, bool: flags.DEFINE_bool}
# absl's modules whose flags the trainer takes too (--v, --logtostderr, --pdb, ...).
_ABSL_MODULES = ("absl.logging", "absl.app")
# The names of the arguments that make absl or parse_flags print help instead of running.
_HELP_NAMES = frozenset({"h", "help", "helpshort", "helpfull", "helpxml", "?"})
TRAINER_HELP = "python -m trainer.task --help"


def trainer_flags(environ: Mapping[str, str]) -> List[flags.Flag]:
  """One flag per field of TrainConfig, of the same name, with the field's help text and
  choices; its default is the field's, or where the field has an environment variable that is
  set in `environ`, that value. Not yet defined anywhere: pass each to `flags.DEFINE_flag`.
  """
  scratch = flags.FlagValues()  # Only to make them: DEFINE_* is what builds each kind.
  for field in dataclasses.fields(config_lib.TrainConfig):
    default, help_text = config_lib.flag_default(field.name, environ), field.metadata["help"]
    if field.metadata["choices"]:
      flags.DEFINE_enum(field.name, default, list(field.metadata["choices"]), help_text,
                        flag_values=scratch)
    elif field.name == "loss_weights":  # The one dict: NAME=WEIGHT pairs in a string.
      flags.DEFINE_string(field.name, config_lib.format_loss_weights(default), help_text,
                          flag_values=scratch)
    else:
      _DEFINE_BY_TYPE[field.type](field.name, default, help_text, flag_values=scratch)
  return [scratch[field.name] for field in dataclasses.fields(config_lib.TrainConfig)]


def trainer_config(flag_values: flags.FlagValues,
                   environ: Mapping[str, str] = os.environ) -> config_lib.TrainConfig:
  """The validated configuration that parsed trainer flags describe; raises UserInputError.

  `environ` is the environment the flags' defaults were read from: a missing --model_dir is
  refused first, saying whether $AIP_MODEL_DIR is unset or empty there.
  """
  values = {field.name: flag_values[field.name].value
            for field in dataclasses.fields(config_lib.TrainConfig)}
  if not values["model_dir"]:
    raise errors.UserInputError(config_lib.no_model_dir(environ))
  values["loss_weights"] = config_lib.parse_loss_weights(values["loss_weights"])
  return config_lib.TrainConfig(**values)


def refuse_positional_arguments(args: Sequence[str]) -> None:
  """Raises UserInputError if there are any: the trainer takes every setting as a flag."""
  if args:
    raise errors.UserInputError(
        f"unexpected arguments {' '.join(args)}: every setting is a --flag=value")


def _flags_by_name(args: Sequence[str]) -> Dict[str, str]:
  """The flags in `args`, up to a bare `--`, by name (`--noreport` is `noreport`)."""
  given = {}
  for arg in args:
    if arg == "--":
      break
    if arg.startswith("-"):
      given.setdefault(arg.lstrip("-").split("=", 1)[0], arg)
  return given


def _trainer_flag_values(environ: Mapping[str, str]) -> flags.FlagValues:
  """A FlagValues holding what the trainer's command line takes: its flags and absl's."""
  flag_values = flags.FlagValues()
  for flag in trainer_flags(environ):
    flags.DEFINE_flag(flag, flag_values)
  for module in _ABSL_MODULES:
    for flag in flags.FLAGS.get_flags_for_module(module):
      if flag.name not in _HELP_NAMES:
        # A plain stand-in, parsed alike: absl's own flag classes act when parsed (--v would
        # set this process's log level).
        flags.DEFINE_flag(flags.Flag(flag.parser, flag.serializer, flag.name, flag.default,
                                     flag.help, flag.short_name, flag.boolean), flag_values)
  return flag_values


def check_trainer_arguments(args: Sequence[str], environ: Mapping[str, str]) -> None:
  """Raises UserInputError with the message `python -m trainer.task ARGS` would refuse `args`
  with, before it imports TensorFlow, on a machine whose environment is `environ` (only the
  variables the flags read count: $AIP_MODEL_DIR and the like); returns if it would start.

  What the trainer finds out later (a missing file, no TPU) is not checked. A --help is refused:
  the trainer would print its flags and end. With a --flagfile nothing is checked: the file is
  read where the trainer runs.
  """
  given = _flags_by_name(args)
  if "flagfile" in given:
    return
  asked = [arg for name, arg in given.items() if name in _HELP_NAMES]
  if asked:
    raise errors.UserInputError(
        f"{asked[0]} would end the job with the trainer's help, before it trains: to read the "
        f"trainer's flags, run {TRAINER_HELP}")
  flag_values = _trainer_flag_values(environ)
  refuse_repeated_flags(args, flag_values)
  try:
    unparsed = flag_values(["trainer.task", *args])
  except (flags.Error, ValueError) as e:  # ValueError: "--noreport=1 does not take an argument".
    raise errors.UserInputError(f"{e} (see {TRAINER_HELP})") from None
  refuse_positional_arguments(unparsed[1:])
  trainer_config(flag_values, environ)


def trainer_flags_given(args: Sequence[str]) -> Set[str]:
  """The names of the trainer's flags that trainer arguments `args` give (`--noreport` gives
  report), flagfiles unread."""
  return set(flag_occurrences(args, _trainer_flag_values({})))


def is_trainer_flag(name: str) -> bool:
  """Whether `--name` is a flag of the trainer's own (`--noreport` is --report's)."""
  settings = {field.name: field.type for field in dataclasses.fields(config_lib.TrainConfig)}
  return name in settings or (name.startswith("no") and settings.get(name[2:]) is bool)


def misplaced_trainer_flag(error: flags.UnrecognizedFlagError, launcher: str) -> Optional[str]:
  """The message for an unknown flag of `launcher` (a module) that is the trainer's, saying to
  give it after `--`; None for a flag that is no one's."""
  if not is_trainer_flag(error.flagname):
    return None
  return (f"--{error.flagname} is a flag of the trainer, not of {launcher}: put trainer flags "
          f"after --, as in python -m {launcher} [flags] -- {error.flagvalue}")
