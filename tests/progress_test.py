"""Tests of trainer.job.progress: a bar on a terminal, a line about every 30 s elsewhere, and the
cap on a call's length."""

import re

from absl import logging

from trainer.job import progress


class _Clock:
  def __init__(self):
    self.now = 0.0

  def __call__(self):
    return self.now


def _logged_report(caplog, **kwargs):
  """A Progress off a terminal, logging at INFO into `caplog`, on a clock the test moves."""
  logging.set_verbosity(logging.INFO)
  caplog.set_level("INFO")
  clock = _Clock()
  return progress.Progress(bar=False, clock=clock, **kwargs), clock


def _lines(caplog, prefix="epoch"):
  return [r.getMessage() for r in caplog.records if r.getMessage().startswith(prefix)]


def test_off_a_terminal_logs_a_line_about_every_30_seconds(caplog):
  report, clock = _logged_report(caplog, epochs=5, steps_per_epoch=100, batch_size=64)
  # Epoch 2's steps arrive every 10 s, ten at a time; the first call (tracing) is not timed.
  for step in range(10, 101, 10):
    clock.now += 10.0
    report.update(100 + step, {"loss": 0.5})
  # 30 s after the start: steps 30, 60 and 90; none at the epoch's end, whose line is train's.
  assert _lines(caplog) == ["epoch 2/5: step 30/100 (30%), loss 0.5000, 64 images/s",
                            "epoch 2/5: step 60/100 (60%), loss 0.5000, 64 images/s",
                            "epoch 2/5: step 90/100 (90%), loss 0.5000, 64 images/s"]


def test_a_line_after_the_first_call_has_no_speed_and_epochs_share_one_clock(caplog):
  report, clock = _logged_report(caplog, epochs=2, steps_per_epoch=4, batch_size=80)
  for step, seconds in ((2, 40.0), (4, 40.0), (6, 40.0), (8, 40.0)):
    clock.now += seconds
    report.update(step, {"loss": float(step)})
  # Each epoch's first call reports; its end is the epoch line's (and restarts the 30 s).
  assert _lines(caplog) == ["epoch 1/2: step 2/4 (50%), loss 2.0000, - images/s",
                            "epoch 2/2: step 2/4 (50%), loss 6.0000, 4 images/s"]


def test_on_a_terminal_shows_a_bar_per_epoch_of_the_values_given_and_logs_nothing(caplog,
                                                                                 capsys):
  caplog.set_level("INFO")
  report = progress.Progress(epochs=2, steps_per_epoch=4, batch_size=8, bar=True)
  for step, loss in ((2, 3.0), (4, 2.5), (6, 0.75), (8, 1.25)):
    report.update(step, {"accuracy": 0.5, "loss": loss})
  out = capsys.readouterr().out
  assert "Epoch 1/2" in out and "Epoch 2/2" in out
  ends = [line.rsplit("\r", 1)[-1] for line in out.splitlines() if "4/4" in line]
  # As given, not averaged over updates; the loss first.
  assert [end[end.index(" - loss"):] for end in ends] == [" - loss: 2.5000 - accuracy: 0.5000",
                                                          " - loss: 1.2500 - accuracy: 0.5000"]
  assert not caplog.records


def test_the_bar_shows_the_epochs_own_seconds_and_step_time_over_calls_of_many_steps(capsys):
  clock = _Clock()
  report = progress.Progress(epochs=2, steps_per_epoch=62, batch_size=8, bar=True, clock=clock)
  # The first call traces for 5 s; then 0.25 s a step, in calls of 30 and 31 steps.
  for step, seconds in ((1, 5.0), (31, 7.5), (62, 7.75), (93, 7.75), (124, 7.75)):
    clock.now += seconds
    report.update(step, {"loss": 1.0})
  shown = [re.sub(r"\x1b\[\d+m|\x08", "", update).strip()
           for update in re.split("[\r\n]", capsys.readouterr().out) if "/62" in update]
  ends = [line for line in shown if line.startswith("62/62")]
  # Epoch 2's first update: Keras shows a bar's first and last, others 50 ms apart at most.
  middle = [line for line in shown if line.startswith("31/62")][-1]
  assert re.match(r"31/62 ━+ 7s 250ms/step - loss: 1.0000", middle), shown  # ETA 7.75 s.
  assert re.match(r"62/62 ━+ 16s 250ms/step - loss: 1.0000", ends[1]), shown
  # Epoch 1: the trace counts in its seconds, not in its step time once steps are timed.
  assert re.match(r"62/62 ━+ 20s 250ms/step", ends[0]), shown


def test_the_call_cap_runs_one_step_until_a_call_after_the_first_is_timed():
  cap = progress.CallCap(10.0)
  assert cap.steps(50) == 1
  cap.add(1, 100.0)  # The first call: tracing, not a measure.
  assert cap.steps(50) == 1
  cap.add(1, 3.0)
  assert cap.steps(50) == 3  # floor(10 / 3)
  assert cap.steps(2) == 2  # Never more than asked.
  cap.add(3, 60.0)
  assert cap.steps(50) == 1  # At least one.
  cap.add(1, 0.01)
  assert cap.steps(50) == 50


def test_without_a_cap_calls_run_the_steps_asked():
  cap = progress.CallCap(0.0)
  for seconds in (100.0, 3.0):
    assert cap.steps(50) == 50
    cap.add(50, seconds)
  assert cap.steps(50) == 50
