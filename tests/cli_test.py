"""Tests of trainer.cli: what every command does with bad input."""

import pytest

from trainer import cli


def test_fail_prints_one_error_line_and_exits_with_the_code(capsys):
  with pytest.raises(SystemExit) as exited:
    cli.fail("no --model_dir given")
  assert exited.value.code == 2
  assert capsys.readouterr().err == "error: no --model_dir given\n"
  with pytest.raises(SystemExit) as exited:
    cli.fail("lost a worker", exit_code=1)
  assert exited.value.code == 1


def test_a_flag_that_does_not_parse_is_one_error_line(capsys):
  with pytest.raises(SystemExit) as exited:
    cli.parse_flags(["prog", "--no_such_flag_anywhere=1"])
  assert exited.value.code == 2
  (line,) = capsys.readouterr().err.splitlines()
  assert line.startswith("error: ") and "no_such_flag_anywhere" in line and "--helpfull" in line
