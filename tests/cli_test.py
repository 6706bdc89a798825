"""Tests of trainer.cli: what every command does with bad input."""

import importlib.util
import logging as std_logging
import os
import subprocess
import sys

import pytest
from absl import flags
from absl import logging as absl_logging

from tests import helpers
from trainer import cli, config, errors


def test_fail_prints_one_error_line_and_exits_with_the_code(capsys):
  result = helpers.run_in_process(capsys, cli.fail, "no --model_dir given")
  helpers.assert_one_error_line(result, "no --model_dir given", whole=True)
  assert (result.stdout, result.stderr) == ("", "error: no --model_dir given\n")
  result = helpers.run_in_process(capsys, lambda: cli.fail("lost a worker", exit_code=1))
  helpers.assert_one_error_line(result, "lost a worker", exit_code=1, whole=True)
  assert result.stderr == "error: lost a worker\n"


def test_a_flag_that_does_not_parse_is_one_error_line(capsys):
  result = helpers.run_in_process(capsys, cli.parse_flags, ["prog", "--no_such_flag_anywhere=1"])
  line = helpers.assert_one_error_line(result, "no_such_flag_anywhere")
  assert result.stderr.splitlines() == [line] and "--helpfull" in line
  # absl says this one as a ValueError, not as one of its flag errors.
  result = helpers.run_in_process(capsys, cli.parse_flags, ["prog", "--nologtostderr=1"])
  helpers.assert_one_error_line(result, "--nologtostderr=1 does not take an argument")


def test_help_lists_the_flags_by_group_and_exits_0(capsys):
  groups = {"outputs": ["no_such_dir_flag_for_cli_test"]}
  if "no_such_dir_flag_for_cli_test" not in flags.FLAGS:
    flags.DEFINE_string("no_such_dir_flag_for_cli_test", "/tmp/out", "Where outputs go.")
    flags.DEFINE_bool("no_such_bool_flag_for_cli_test", True, "Draws the report.")
    flags.DEFINE_list("no_such_list_flag_for_cli_test", ["a", "b"], "Steps.")
  groups["outputs"] += ["no_such_bool_flag_for_cli_test", "no_such_list_flag_for_cli_test"]
  for argv in (["prog", "-h"], ["prog", "--model_dir=x", "--help"]):
    with pytest.raises(SystemExit) as exited:
      cli.parse_flags(argv, description="Trains a model.", groups=groups)
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("Trains a model.\n\noutputs:\n")
    assert "  --no_such_dir_flag_for_cli_test=/tmp/out\n      Where outputs go.\n" in out
    assert "  --[no]no_such_bool_flag_for_cli_test  (default: on)\n" in out
    assert "  --no_such_list_flag_for_cli_test=a,b\n" in out  # As it is written.


def test_help_is_not_asked_for_after_a_bare_double_dash():
  assert cli.wants_help(["prog", "-h"]) and cli.wants_help(["prog", "--helpshort"])
  assert not cli.wants_help(["prog", "--", "-h"])
  assert not cli.wants_help(["prog", "--helpfull"])  # absl's, listing every module's flags.


# What Vertex AI sets for a job with --base_output_dir=gs://b/run (launch.vertex passes it).
ON_VERTEX = {"AIP_MODEL_DIR": "gs://b/run/model/"}


@pytest.mark.parametrize("args, environ, message", [
    (["--datset=mnist", "--epoch=20", "--batch_size=-5"], ON_VERTEX,
     "Unknown command line flag 'datset'. Did you mean: dataset ? (see python -m trainer.task "
     "--help)"),
    (["--epochs=three"], ON_VERTEX, "flag --epochs=three: invalid literal for int() with base "
     "10: 'three' (see python -m trainer.task --help)"),
    (["--noreport=1"], ON_VERTEX, "--noreport=1 does not take an argument (see python -m "
     "trainer.task --help)"),
    (["--dataset=mnist_smaple"], ON_VERTEX,
     "unknown --dataset='mnist_smaple' (did you mean mnist_sample?): use mnist, mnist_sample, "
     "tfds:NAME, idx:DIR or npz:PATH"),
    (["--learning_rate=inf"], ON_VERTEX,
     "--learning_rate=inf must be finite, e.g. --learning_rate=0.003 (the default)"),
    (["--epochs=3", "mnist"], ON_VERTEX,
     "unexpected arguments mnist: every setting is a --flag=value"),
    (["--epochs=3"], {}, "no --model_dir given and $AIP_MODEL_DIR is not set: pass --model_dir"),
    (["--epochs=3"], {"AIP_MODEL_DIR": ""}, "no --model_dir given and $AIP_MODEL_DIR is set but "
     "empty: pass --model_dir, or set $AIP_MODEL_DIR to the job's directory (local or gs://)"),
    (["--epochs=3", "--learning_rate=0.01", "--epochs=5"], ON_VERTEX,
     "--epochs is given twice (--epochs=3, then --epochs=5): give it once"),
    (["--epochs=3", "-h"], ON_VERTEX, "-h would end the job with the trainer's help, before it "
     "trains: to read the trainer's flags, run python -m trainer.task --help"),
])
def test_trainer_arguments_are_refused_as_the_trainer_refuses_them(monkeypatch, args, environ,
                                                                   message):
  monkeypatch.setenv("AIP_MODEL_DIR", "/here")  # Only the environment given counts.
  with pytest.raises(errors.UserInputError) as refused:
    cli.check_trainer_arguments(args, environ)
  assert str(refused.value) == message


@pytest.mark.parametrize("args, message", [
    (["--epochs=3", "--epochs=5"], "--epochs is given twice (--epochs=3, then --epochs=5)"),
    # As Vertex AI tuning appends a searched value after the user's arguments.
    (["--learning_rate=0.01", "--epochs=3", "--learning_rate=0.0042"],
     "--learning_rate is given twice (--learning_rate=0.01, then --learning_rate=0.0042)"),
    (["--batch_size", "32", "-batch_size=64"],
     "--batch_size is given twice (--batch_size 32, then -batch_size=64)"),
    (["--report", "--noreport"], "--report is given twice (--report, then --noreport)"),
    (["--width=8", "--width=8", "--width=16"],
     "--width is given 3 times (--width=8, then --width=8, then --width=16)"),
])
def test_a_trainer_flag_given_twice_is_refused_naming_each_value(capsys, args, message):
  """absl would take the last value silently. Refused before parsing: no flag is set here."""
  from trainer import task
  result = helpers.run_in_process(capsys, task.parse_flags, ["trainer.task", *args])
  helpers.assert_one_error_line(result, f"{message}: give it once", whole=True)


def test_a_flag_in_a_flagfile_and_on_the_command_line_is_given_twice(capsys, tmp_path):
  from trainer import task
  flagfile = tmp_path / "job.flags"
  flagfile.write_text("--dataset=mnist_sample\n--epochs=4\n")
  result = helpers.run_in_process(capsys, task.parse_flags,
                                  ["trainer.task", f"--flagfile={flagfile}", "--epochs=5"])
  helpers.assert_one_error_line(
      result, "--epochs is given twice (--epochs=4, then --epochs=5): give it once", whole=True)


def test_flag_occurrences_reads_arguments_as_absl_does():
  flag_values = flags.FlagValues()
  flags.DEFINE_integer("epochs", 1, "An integer.", short_name="e", flag_values=flag_values)
  flags.DEFINE_bool("report", True, "A boolean.", flag_values=flag_values)
  flags.DEFINE_multi_string("tag", [], "Repeated by design.", flag_values=flag_values)
  args = ["-e", "2", "input.png", "--noreport", "--tag=a", "--tag=b", "--unknown=1",
          "--epochs", "--report", "--", "--epochs=9"]
  # `--epochs --report`: absl takes --report as the value of --epochs (and refuses it).
  assert cli.flag_occurrences(args, flag_values) == {
      "epochs": ["-e 2", "--epochs --report"], "report": ["--noreport"]}
  cli.refuse_repeated_flags(["--epochs=1", "--tag=a", "--tag=b", "--", "--epochs=2"],
                            flag_values)


def test_a_bad_setting_is_refused_with_the_configurations_own_words():
  with pytest.raises(errors.UserInputError) as by_the_config:
    config.TrainConfig(model_dir="gs://b/run/model/", batch_size=-5, jit_compile=True)
  with pytest.raises(errors.UserInputError) as by_the_check:
    cli.check_trainer_arguments(["--batch_size=-5", "--jit_compile"], ON_VERTEX)
  assert str(by_the_check.value) == str(by_the_config.value)


def test_what_the_trainer_takes_passes_the_check_and_sets_nothing_here():
  verbosity = flags.FLAGS["verbosity"].value
  cli.check_trainer_arguments(["--dataset=mnist", "--noreport", "--v=1", "--alsologtostderr",
                               "--loss_weights=classifier=1,decoder=2"], ON_VERTEX)
  cli.check_trainer_arguments(["--model_dir=gs://b/m", "--strategy=tpu", "--tpu=local"], {})
  # The file is read where the trainer runs: nothing here can be checked.
  cli.check_trainer_arguments(["--flagfile=/app/job.flags"], {})
  assert flags.FLAGS["verbosity"].value == verbosity  # --v set nothing in this process.


def test_a_trainer_flag_given_to_a_launcher_is_said_to_go_after_the_double_dash():
  def hint(name, given):
    return cli.misplaced_trainer_flag(flags.UnrecognizedFlagError(name, given), "launch.vertex")

  assert hint("dataset", "--dataset=mnist") == (
      "--dataset is a flag of the trainer, not of launch.vertex: put trainer flags after --, "
      "as in python -m launch.vertex [flags] -- --dataset=mnist")
  assert hint("noreport", "--noreport").startswith("--noreport is a flag of the trainer")
  assert hint("datset", "--datset=mnist") is None and hint("nodataset", "--nodataset") is None


def test_cpp_records_below_the_level_are_dropped_and_the_rest_kept():
  text = ("WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n"
          "I0000 00:00:1795886852.410807    4306 port.cc:153] oneDNN custom operations are on.\n"
          "W0000 00:00:1795886852.411119    4306 cudart_stub.cc:31] a warning\n"
          "E0000 00:00:1795886853.260773    4306 cuda_platform.cc:52] failed call to cuInit\n"
          "E0000 00:00:1795886853.260773    4306 model.cc:52] a real error\n"
          "/some/module.py:3: UserWarning: ours\n")
  # No GPU is not an error here: the strategy's line says so.
  assert cli._without_quiet_records(text, 2) == (
      "E0000 00:00:1795886853.260773    4306 model.cc:52] a real error\n"
      "/some/module.py:3: UserWarning: ours\n")
  assert cli._without_quiet_records(text, 1) == "".join(
      line for line in text.splitlines(keepends=True) if not line.startswith("I0000"))


ONEDNN_FLOAT16_NOTE = (
    "E0000 00:00:1796598142.273402   17085 util.cc:131] oneDNN supports DT_HALF only on "
    "platforms with AVX-512. Falling back to the default Eigen-based implementation if present.\n")


def test_onednns_float16_note_counts_as_a_warning():
  """An error record, but the op runs (on Eigen's kernels): a warning, dropped with them."""
  assert cli._without_quiet_records(ONEDNN_FLOAT16_NOTE, 2) == ""
  assert cli._without_quiet_records(ONEDNN_FLOAT16_NOTE, 1) == ONEDNN_FLOAT16_NOTE


# A float16 op after each entry point's start-up, as a model's first op: --precision=mixed_float16
# on CPU (trainer.task, its training replaced by the op), a float16 export (tensorflow imported
# as trainer.evaluate and trainer.predict import it); the control, the op with no start-up
# before it, which must log the note where the CPU has one to say.
_FLOAT16_OP = "tf.matmul(tf.ones((2, 2), tf.float16), tf.ones((2, 2), tf.float16))"
_FLOAT16_AFTER_START = {
    "trainer.task": f"""
import sys
from trainer import cli, task
# Imported quietly as task.main imports it (which then finds it imported), without an op.
with cli.cpp_startup_log_filtered(cli.quiet_tensorflow()):
  from trainer.job import train
  train.tf.config.list_physical_devices()
def run(config, strategy, make_task):
  import tensorflow as tf
  {_FLOAT16_OP}
train.run = run
sys.argv = ["trainer.task", "--precision=mixed_float16", "--model_dir={{model_dir}}"]
task.app.run(task.main, flags_parser=task.parse_flags)
""",
    "trainer.evaluate": f"""
from trainer import cli
with cli.tensorflow_imported_quietly():
  import tensorflow as tf
{_FLOAT16_OP}
""",
    "control": f"""
import tensorflow as tf
{_FLOAT16_OP}
""",
}


def _run_each_in_a_fork(names, model_dir) -> dict:
  """In a process that has imported TensorFlow but run no op: runs each script named in a
  child forked from it, its standard error to a file; returns {name: [exit code, stderr]}."""
  import json
  import tempfile
  import traceback
  import tensorflow  # noqa: F401  # pylint: disable=unused-import
  answers = {}
  for name in names:
    with tempfile.TemporaryFile("w+") as err:
      sys.stdout.flush()
      sys.stderr.flush()
      pid = os.fork()
      if pid == 0:
        code = 1
        try:
          os.dup2(err.fileno(), 2)
          exec(_FLOAT16_AFTER_START[name].replace("{model_dir}", model_dir))  # pylint: disable=exec-used
          code = 0
        except SystemExit as e:
          code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
        except BaseException:  # pylint: disable=broad-except
          traceback.print_exc()
        finally:
          sys.stderr.flush()
          os._exit(code)  # pylint: disable=protected-access
      _, status = os.waitpid(pid, 0)
      err.seek(0)
      answers[name] = [os.waitstatus_to_exitcode(status), err.read()]
  print(json.dumps(answers))


@pytest.mark.slow  # A TensorFlow start-up (5-8 s).
def test_onednns_float16_note_is_said_at_start_up_inside_the_filter(tmp_path):
  """With oneDNN on (TensorFlow's default on recent Intel CPUs), a CPU without AVX-512 logs
  the note at a process's first float16 op: without its own op at start-up, the note came
  unfiltered in the middle of training. (A CPU with AVX-512 has nothing to say.)

  One process starts TensorFlow with oneDNN on, and forks a child per script: the note comes
  at a process's first float16 op, not at the import, so each child is as its entry point
  started (task_test and evaluate_test start them for real). The control, the op alone,
  proves there is a note to filter."""
  import json
  result = subprocess.run([sys.executable, "-m", "tests.cli_test", str(tmp_path / "run")],
                          cwd=helpers.REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "TF_ENABLE_ONEDNN_OPTS": "1",
                               "TF_CPP_MIN_LOG_LEVEL": "2"})
  assert result.returncode == 0, result.stderr[-3000:]
  answers = json.loads(result.stdout)
  code, stderr = answers.pop("control")
  assert code == 0, stderr[-3000:]
  if "DT_HALF" not in stderr:
    pytest.skip("this CPU has AVX-512: no note to filter")
  for entry_point, (code, stderr) in answers.items():
    assert code == 0, (entry_point, stderr[-3000:])
    assert "DT_HALF" not in stderr, (entry_point, stderr[-3000:])
    assert not [line for line in stderr.splitlines() if line.startswith("E0000")], (
        entry_point, stderr[-3000:])


def test_startup_lines_written_to_the_file_descriptor_are_filtered(capfd):
  with cli.cpp_startup_log_filtered(2):
    os.write(2, b"I0000 00:00:1795886852.410807    4306 port.cc:153] oneDNN note\n"
                b"E0000 00:00:1795886853.260773    4306 kernel.cc:52] kernel failed\n")
  assert capfd.readouterr().err == (
      "E0000 00:00:1795886853.260773    4306 kernel.cc:52] kernel failed\n")
  with cli.cpp_startup_log_filtered(0):
    os.write(2, b"I0000 00:00:1795886852.410807    4306 port.cc:153] oneDNN note\n")
  assert "oneDNN note" in capfd.readouterr().err


def test_a_librarys_info_lines_are_dropped_but_not_ours_nor_its_warnings(monkeypatch):
  # The settings are process-wide: undone after the test.
  tf_logger = std_logging.getLogger("tensorflow")
  absl_logger = absl_logging.get_absl_logger()
  monkeypatch.setattr(cli, "_quiet_filters", {})
  monkeypatch.setattr(absl_logger, "filters", list(absl_logger.filters))
  level = tf_logger.level
  try:
    cli.quiet_library_info("tensorflow")
    assert tf_logger.level == std_logging.WARNING
    tf_dir = os.path.dirname(importlib.util.find_spec("tensorflow").origin)
    saver = os.path.join(tf_dir, "python", "checkpoint", "functional_saver.py")

    def passes(level, pathname):
      record = std_logging.LogRecord("absl", level, pathname, 1, "message", (), None)
      return all(f.filter(record) for f in absl_logger.filters)

    assert not passes(std_logging.INFO, saver)
    assert passes(std_logging.WARNING, saver)
    assert passes(std_logging.INFO, cli.__file__)
  finally:
    tf_logger.setLevel(level)


def test_help_into_a_pipe_its_reader_has_closed_ends_quietly():
  """`python -m launch.vertex wait --help | head`: head may leave before the help is written,
  which must not end in a traceback. The pipe is closed before the program writes."""
  process = subprocess.Popen([sys.executable, "-m", "trainer.predict", "--help"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=helpers.REPO)
  process.stdout.close()
  stderr = process.stderr.read().decode()
  assert process.wait(timeout=60) == 0 and stderr == ""



if __name__ == "__main__":  # python -m tests.cli_test MODEL_DIR: the float16 scripts, forked.
  _run_each_in_a_fork(["control", "trainer.task", "trainer.evaluate"], sys.argv[1])
