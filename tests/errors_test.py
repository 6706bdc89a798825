"""Tests of trainer.errors: which errors end a command with one line, and how it is made."""

import pytest

from trainer import errors
from trainer.job import controller, lease, storage


@pytest.mark.parametrize("kind", [errors.UserInputError, controller.Diverged, storage.WriteFailed,
                                  lease.LeaseHeld, lease.LeaseLost])
def test_every_kind_the_entry_points_say_in_one_line_is_a_job_error(kind):
  assert issubclass(kind, errors.JobError)


@pytest.mark.parametrize("kind", [controller.Diverged, storage.WriteFailed, lease.LeaseHeld,
                                  lease.LeaseLost])
def test_the_jobs_own_failures_are_not_bad_input(kind):
  # A divergence or a full disk is not the user's input: code that handles bad input (a
  # fallback to another source, say) must not swallow them.
  assert not issubclass(kind, (errors.UserInputError, ValueError))


def test_first_line_and_unknown_choice():
  assert errors.first_line(ValueError("one\ntwo")) == "one"
  assert errors.first_line(KeyError()) == "KeyError"
  assert errors.unknown_choice("strategy", "gpu", ("default", "tpu")) == (
      "unknown --strategy='gpu': choose one of default, tpu")
