"""What the command-line entry points share: bad input ends with one `error:` line and a code."""

import sys

from absl import flags

BAD_INPUT_EXIT_CODE = 2


def fail(message: str, exit_code: int = BAD_INPUT_EXIT_CODE) -> None:
  """Prints `error: message` to standard error and exits with `exit_code`."""
  print(f"error: {message}", file=sys.stderr)
  sys.exit(exit_code)


def parse_flags(argv):
  """absl's flag parsing, with a bad flag reported as one `error:` line like other bad input."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    fail(f"{e} (see --helpfull)")
