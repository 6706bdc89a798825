"""The errors that end a command with one `error:` line, and the pieces of those lines.

An entry point catches `JobError` and prints its message alone: what went wrong, and what to
do. `UserInputError` is the kind the user caused and can fix (a flag, a data file, a run
directory); the job's own kinds (a divergence, a full disk, a lost lease) derive from
`JobError` beside it, where they are raised.
"""

import signal

# How a command ends, for the launchers that read it back: 2, as absl says a bad flag, for
# any `JobError`; 128 + the signal for a stop on SIGTERM or Ctrl-C, as a shell counts it (143,
# SIGTERM's, is also what TensorFlow's own preemption handler exits with so that Google Cloud
# restarts the job).
BAD_INPUT_EXIT_CODE = 2
PREEMPTED_EXIT_CODE = 128 + signal.SIGTERM
INTERRUPTED_EXIT_CODE = 128 + signal.SIGINT


class JobError(Exception):
  """Ends the command with one line: the message names the problem and the fix."""


class UserInputError(JobError, ValueError):
  """Bad input the user can fix: the message names the problem and the fix."""


def first_line(error: BaseException) -> str:
  """The first line of an exception's message (its type name if it has none), for error lines."""
  text = str(error).strip()
  return text.splitlines()[0] if text else type(error).__name__


def unknown_choice(flag: str, value: str, choices) -> str:
  """The error message for a --flag value that is not one of `choices`."""
  return f"unknown --{flag}={value!r}: choose one of {', '.join(choices)}"
