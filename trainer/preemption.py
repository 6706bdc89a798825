"""Preemption: noticing SIGTERM, and the exit code that tells the platform to restart the job.

Vertex AI, Compute Engine and Kubernetes announce preemption with SIGTERM and a short grace
period. The handler only raises a flag; the training loop reads it between calls into the
device, all workers agree on it there, save one checkpoint at the same step, and exit.

We do not use `tf.distribute.experimental.PreemptionCheckpointHandler`: on Google Cloud
machines it watches the maintenance-event metadata instead of SIGTERM (and on CPU VMs does
nothing), which misses Vertex AI's SIGTERM, and it restores checkpoints itself, around our
check that a checkpoint fits the model.
"""

import contextlib
import signal
import threading

# 128 + SIGTERM: what a shell reports for a job SIGTERM ended, and what TensorFlow's own
# preemption handler exits with on Google Cloud so that the platform restarts the job.
PREEMPTED_EXIT_CODE = 128 + signal.SIGTERM


class Preempted(Exception):
  """Training stopped on SIGTERM after saving a checkpoint; the same command resumes it."""


class TerminationFlag:
  """Set when this process has been asked to terminate."""

  def __init__(self):
    self._event = threading.Event()

  def set(self, *unused_signal_args) -> None:
    self._event.set()

  @property
  def requested(self) -> bool:
    return self._event.is_set()


@contextlib.contextmanager
def sigterm_flag():
  """Yields a `TerminationFlag` that SIGTERM sets while the context is open.

  Off the main thread (where Python cannot install signal handlers) the flag is never set.
  """
  flag = TerminationFlag()
  if threading.current_thread() is not threading.main_thread():
    yield flag
    return
  previous = signal.signal(signal.SIGTERM, flag.set)
  try:
    yield flag
  finally:
    signal.signal(signal.SIGTERM, previous)
