"""Tests of trainer.progress: a bar on a terminal, a line about every 30 s elsewhere."""

from absl import logging

from trainer import progress


class _Clock:
  def __init__(self):
    self.now = 0.0

  def __call__(self):
    return self.now


def test_off_a_terminal_logs_a_line_about_every_30_seconds(caplog):
  logging.set_verbosity(logging.INFO)
  caplog.set_level("INFO")
  clock = _Clock()
  report = progress.Progress(epoch=2, epochs=5, steps_per_epoch=100, batch_size=64, bar=False,
                             clock=clock)
  # Steps arrive every 10 s, ten at a time; the first call (tracing) is not timed.
  for step in range(10, 101, 10):
    clock.now += 10.0
    report.update(step, loss=0.5)
  lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("epoch 2/5")]
  # 30 s after the first call: steps 40 and 70; none at the epoch's end, whose line is train's.
  assert lines == ["epoch 2/5: step 40/100 (40%), loss 0.5000, 64 images/s",
                   "epoch 2/5: step 70/100 (70%), loss 0.5000, 64 images/s"]


def test_on_a_terminal_shows_a_bar_and_logs_nothing(caplog, capsys):
  caplog.set_level("INFO")
  report = progress.Progress(epoch=1, epochs=1, steps_per_epoch=4, batch_size=8, bar=True)
  for step in range(1, 5):
    report.update(step, loss=0.25)
  assert "4/4" in capsys.readouterr().out
  assert not caplog.records
