"""The errors that end a command with one `error:` line, and the pieces of those lines.

An entry point catches `JobError` and prints its message alone: what went wrong, and what to
do. `UserInputError` is the kind the user caused and can fix (a flag, a data file, a run
directory); the job's own kinds (a divergence, a full disk, a lost lease) derive from
`JobError` beside it, where they are raised.
"""


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
