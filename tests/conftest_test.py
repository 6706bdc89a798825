"""Tests of tests/conftest.py's share of the machine: a test marked `alone` runs with no other
test of the session beside it, under pytest-xdist's workers."""

import threading
import time

from tests import conftest


def _holds(alone, events, name, directory, seconds=0.3):
  with conftest._machine_share(alone, str(directory)):  # pylint: disable=protected-access
    events.append((name, "start"))
    time.sleep(seconds)
    events.append((name, "end"))


def test_a_test_alone_waits_for_the_shared_ones_and_the_next_wait_for_it(tmp_path):
  events = []
  first = threading.Thread(target=_holds, args=(False, events, "shared", tmp_path))
  alone = threading.Thread(target=_holds, args=(True, events, "alone", tmp_path))
  after = threading.Thread(target=_holds, args=(False, events, "after", tmp_path))
  first.start()
  time.sleep(0.1)
  alone.start()
  time.sleep(0.1)  # The test alone waits at the room, holding the turnstile: "after" queues.
  after.start()
  for thread in (first, alone, after):
    thread.join(timeout=10)
  assert events == [("shared", "start"), ("shared", "end"), ("alone", "start"), ("alone", "end"),
                    ("after", "start"), ("after", "end")]


def test_shared_tests_run_side_by_side(tmp_path):
  events = []
  threads = [threading.Thread(target=_holds, args=(False, events, name, tmp_path)) for name in "ab"]
  for thread in threads:
    thread.start()
  for thread in threads:
    thread.join(timeout=10)
  assert [phase for _, phase in events] == ["start", "start", "end", "end"]
