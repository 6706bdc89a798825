"""Tests of trainer.preemption: SIGTERM raises the flag, and only while the context is open."""

import os
import signal
import threading

from trainer import preemption


def test_sigterm_sets_the_flag_instead_of_ending_the_process():
  with preemption.sigterm_flag() as flag:
    assert not flag.requested
    os.kill(os.getpid(), signal.SIGTERM)
    assert flag.requested


def test_the_previous_handler_comes_back_after_the_context():
  previous = signal.getsignal(signal.SIGTERM)
  with preemption.sigterm_flag():
    assert signal.getsignal(signal.SIGTERM) is not previous
  assert signal.getsignal(signal.SIGTERM) is previous


def test_off_the_main_thread_the_flag_is_inert():
  seen = []

  def body():
    with preemption.sigterm_flag() as flag:
      seen.append(flag.requested)

  thread = threading.Thread(target=body)
  thread.start()
  thread.join()
  assert seen == [False]

