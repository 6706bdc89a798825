"""Tests of `python -m launch.vertex`, run as a user runs it, against a stand-in Vertex AI on
loopback (tests/fake_vertex.py) reached through --api_endpoint."""

import os
import signal
import subprocess
import sys
import time

import grpc
import numpy as np
import pytest
from google.cloud.aiplatform_v1 import types

from launch import vertex_api
from launch.custom_job import JobSpec, build_custom_job
from tests import endpoints_test, fake_vertex, helpers
from trainer import errors

IMAGE = "us-docker.pkg.dev/PROJECT/trainer/mnist:1"
OUTPUT = "gs://BUCKET/run"
JOB_FLAGS = ["--replica_count=4", "--machine_type=n1-standard-8",
             "--accelerator_type=NVIDIA_TESLA_T4", "--accelerator_count=2",
             f"--image_uri={IMAGE}", f"--base_output_dir={OUTPUT}"]
TRAINER_ARGS = ["--", "--epochs=3", "--dataset=mnist"]
State = types.JobState


@pytest.fixture
def server():
  fake = fake_vertex.FakeVertex().start()
  yield fake
  fake.stop()


# Launcher commands, each run in a fork (under 0.2 s): in the fast tier. The slow tier keeps the
# real processes (Ctrl-C, no credentials), and what waits for seconds or imports TensorFlow.
def _launch(*args, env=None, without_tensorflow=False):
  """`python -m launch.vertex ARGS`, in a process forked from one that has imported its
  libraries (helpers.run_launcher): 0.1 s, not 3-10. The real start-up of `python -m
  launch.vertex` is test_a_dry_run_checks_the_trainer_arguments_without_importing_tensorflow's."""
  return helpers.run_launcher("launch.vertex", *args, env=env, timeout=120,
                              without_tensorflow=without_tensorflow)


def _console_link(job: str) -> str:
  """The Cloud console's page of custom job `job`, as the launcher prints it (vertex_api.
  console_link, from the SDK's console_utils): written out, as importing the SDK here would
  take seconds."""
  project, region, job_id = job.split("/")[1::2]
  return (f"https://console.cloud.google.com/agent-platform/locations/{region}/training/"
          f"{job_id}?project={project}")


def test_submit_sends_what_the_dry_run_prints_and_prints_the_job_and_its_link(server):
  dry_run = _launch("--dry_run", *JOB_FLAGS, *TRAINER_ARGS)
  assert dry_run.returncode == 0, dry_run.stderr[-3000:]
  printed = types.CustomJob.from_json(dry_run.stdout)
  assert [list(p.container_spec.args) for p in printed.job_spec.worker_pool_specs] == [
      ["--epochs=3", "--dataset=mnist"]] * 2

  result = _launch("--project=p", "--region=europe-west4", f"--api_endpoint={server.endpoint}",
                   *JOB_FLAGS, *TRAINER_ARGS)
  assert result.returncode == 0, result.stderr[-3000:]
  (request,) = server.requests_of("CreateCustomJob")
  assert request.parent == "projects/p/locations/europe-west4"
  assert request.custom_job == printed
  name = f"projects/p/locations/europe-west4/customJobs/{fake_vertex.JOB_ID}"
  assert result.stdout.splitlines() == [
      f"submitted {name}", "https://console.cloud.google.com/agent-platform/locations/"
      f"europe-west4/training/{fake_vertex.JOB_ID}?project=p"]


# A launcher process that prints console links (the SDK's import in it: 2 s): the slow tier.
# A job that fails, for its own exit code and error line; exit code 0 through the command is
# test_train_wait_resubmit_follows_each_job_to_its_end's, and vertex_api_test has wait's exit
# code for each end in-process.
@pytest.mark.slow
def test_wait_follows_the_job_to_its_end(server):
  server.states = [State.JOB_STATE_PENDING, State.JOB_STATE_RUNNING, State.JOB_STATE_FAILED]
  server.job_error = "Replica chief exited with a non-zero status of 2."
  result = _launch("--project=p", f"--api_endpoint={server.endpoint}", "--wait",
                   "--poll_seconds=0.05", *JOB_FLAGS, *TRAINER_ARGS)
  assert result.returncode == vertex_api.FAILED_EXIT_CODE, result.stderr[-3000:]
  lines = result.stdout.splitlines()
  link = lines[1]
  assert [line.split(" ", 2)[2] for line in lines[2:] if "JOB_STATE" in line] == [
      f"JOB_STATE_PENDING {link}", f"JOB_STATE_RUNNING {link}", f"JOB_STATE_FAILED {link}"]
  assert lines[-1] == "the job's error: Replica chief exited with a non-zero status of 2."


def _interrupt(tmp_path, args, ready):
  """Runs `python -m launch.vertex ARGS` as a user would (output not unbuffered), sends it
  Ctrl-C once `ready(stdout so far)`; returns (exit code, stderr)."""
  env = {key: value for key, value in os.environ.items() if key != "PYTHONUNBUFFERED"}
  # Started in the background (as CI may start the tests), a process inherits SIGINT ignored,
  # and Python then never raises KeyboardInterrupt: give it a terminal's Ctrl-C, then run the
  # module as `-m` does.
  as_in_a_terminal = ("import runpy, signal, sys; signal.signal(signal.SIGINT, "
                      "signal.default_int_handler); sys.argv[0] = 'launch.vertex'; "
                      "runpy.run_module('launch.vertex', run_name='__main__', alter_sys=True)")
  with open(tmp_path / "out", "w") as out:
    process = subprocess.Popen([sys.executable, "-c", as_in_a_terminal, *args], cwd=helpers.REPO,
                               env=env, stdout=out, stderr=subprocess.PIPE, text=True)
    try:
      deadline = time.time() + 60
      while not ready((tmp_path / "out").read_text()) and time.time() < deadline:
        time.sleep(0.1)
      assert ready((tmp_path / "out").read_text()), "the launcher never got there"
      process.send_signal(signal.SIGINT)
      _, stderr = process.communicate(timeout=60)
    finally:
      process.kill()
  return process.returncode, stderr


@pytest.mark.slow  # A launcher process end to end; keeps the fast tier under five minutes.
def test_ctrl_c_stops_waiting_not_the_job_and_says_how_to_cancel_it(server, tmp_path):
  server.states = [State.JOB_STATE_RUNNING]
  returncode, stderr = _interrupt(
      tmp_path, ["wait", "--job=projects/p/locations/r/customJobs/7",
                 f"--api_endpoint={server.endpoint}", "--poll_seconds=0.05"],
      lambda out: "JOB_STATE_RUNNING" in out)
  assert returncode == errors.INTERRUPTED_EXIT_CODE, stderr[-3000:]
  assert "Traceback" not in stderr
  assert stderr.splitlines()[-2:] == [
      "stopped waiting; the job goes on. Follow it again: python -m launch.vertex wait "
      f"--job=projects/p/locations/r/customJobs/7 --api_endpoint={server.endpoint}",
      "Cancel it: python -m launch.vertex cancel --job=projects/p/locations/r/customJobs/7 "
      f"--api_endpoint={server.endpoint}"]
  assert not server.requests_of("CancelCustomJob")


@pytest.mark.slow  # A launcher process end to end; keeps the fast tier under five minutes.
def test_an_outage_longer_than_retry_seconds_gives_up_and_says_how_to_follow_the_job(server):
  server.states = [State.JOB_STATE_RUNNING]
  server.errors["GetCustomJob"] = [None] + [(grpc.StatusCode.UNAVAILABLE, "backend down")] * 500
  name = "projects/p/locations/r/customJobs/7"
  result = _launch("wait", f"--job={name}", f"--api_endpoint={server.endpoint}",
                   "--poll_seconds=0.05", "--retry_seconds=1")
  line = helpers.assert_one_error_line(result, f"cannot reach Vertex AI at {server.endpoint} (",
                                       vertex_api.UNREACHABLE_EXIT_CODE)
  assert line.startswith(f"error: cannot reach Vertex AI at {server.endpoint} (")
  assert line.endswith(f"; the job goes on: python -m launch.vertex wait --job={name} "
                       f"--api_endpoint={server.endpoint}")
  assert "unavailable (backend down); retrying" in result.stdout
  assert 2 < len(server.requests_of("GetCustomJob")) < 100  # Retried, with backoff.


@pytest.mark.slow  # A launcher process end to end; keeps the fast tier under five minutes.
def test_ctrl_c_during_submission_says_the_job_may_exist(server, tmp_path):
  server.delays["CreateCustomJob"] = 30.0
  returncode, stderr = _interrupt(
      tmp_path, ["--project=p", "--region=europe-west4", f"--api_endpoint={server.endpoint}",
                 *JOB_FLAGS], lambda _: bool(server.requests_of("CreateCustomJob")))
  assert returncode == errors.INTERRUPTED_EXIT_CODE, stderr[-3000:]
  assert "Traceback" not in stderr
  assert stderr.splitlines()[-1] == (
      "interrupted while submitting: the job may have been created; look before submitting "
      "again: gcloud ai custom-jobs list --project=p --region=europe-west4")


def test_batch_predict_submits_and_waits_for_the_batch_job(server):
  result = _launch("batch_predict", "--project=p", f"--api_endpoint={server.endpoint}",
                   "--model=projects/p/locations/us-central1/models/9",
                   "--instances=gs://b/in.jsonl", "--output_dir=gs://b/out", "--wait",
                   "--poll_seconds=0.05")
  assert result.returncode == 0, result.stderr[-3000:]
  (request,) = server.requests_of("CreateBatchPredictionJob")
  assert request.batch_prediction_job.model == "projects/p/locations/us-central1/models/9"
  assert len(server.requests_of("GetBatchPredictionJob")) == 3
  assert result.stdout.splitlines()[-1].endswith(" JOB_STATE_SUCCEEDED")


def test_the_scheduling_identity_and_tensorboard_flags_reach_the_request():
  result = _launch("--dry_run", *JOB_FLAGS, "--scheduling=flex_start", "--max_wait=2h",
                   "--timeout=1d", "--service_account=trainer@p.iam.gserviceaccount.com",
                   "--tensorboard=projects/p/locations/us-central1/tensorboards/7")
  assert result.returncode == 0, result.stderr[-3000:]
  job_spec = types.CustomJob.from_json(result.stdout).job_spec
  assert job_spec.scheduling.strategy == types.Scheduling.Strategy.FLEX_START
  assert job_spec.scheduling.max_wait_duration.total_seconds() == 2 * 3600
  assert job_spec.scheduling.timeout.total_seconds() == 24 * 3600
  assert job_spec.scheduling.restart_job_on_worker_restart  # --replica_count=4.
  assert job_spec.service_account == "trainer@p.iam.gserviceaccount.com"
  assert job_spec.tensorboard == "projects/p/locations/us-central1/tensorboards/7"


NO_CAPACITY = "Resources are insufficient in region: europe-west4. Please try a different region."


def test_resubmit_sends_the_same_spec_as_a_new_job_after_lack_of_capacity(server):
  server.runs = [([State.JOB_STATE_FAILED], (grpc.StatusCode.RESOURCE_EXHAUSTED, NO_CAPACITY))]
  job = build_custom_job(JobSpec(image_uri=IMAGE, base_output_dir=OUTPUT, scheduling="spot",
                                 trainer_args=("--epochs=3",)))
  name = vertex_api.submit(vertex_api.job_client(server.endpoint),
                           "projects/p/locations/europe-west4", job).name
  decision = f"resubmitting: lack of capacity (RESOURCE_EXHAUSTED: {NO_CAPACITY})"

  dry_run = _launch("resubmit", f"--job={name}", f"--api_endpoint={server.endpoint}",
                    "--dry_run")
  assert dry_run.returncode == 0, dry_run.stderr[-3000:]
  assert types.CustomJob.from_json(dry_run.stdout) == job
  assert dry_run.stderr.splitlines()[-1] == decision
  assert len(server.requests_of("CreateCustomJob")) == 1  # Ours: the dry run sent nothing.

  result = _launch("resubmit", f"--job={name}", f"--api_endpoint={server.endpoint}")
  assert result.returncode == 0, result.stderr[-3000:]
  first, second = server.requests_of("CreateCustomJob")
  assert second.parent == first.parent == "projects/p/locations/europe-west4"
  assert second.custom_job == first.custom_job == job
  again = f"projects/p/locations/europe-west4/customJobs/{int(fake_vertex.JOB_ID) + 1}"
  assert result.stdout.splitlines() == [f"submitted {again}", _console_link(again)]
  assert result.stderr.splitlines()[-1] == decision


@pytest.mark.parametrize("args, message", [
    ([*JOB_FLAGS, "--scheduling=spot", "--max_wait=2h"], "--max_wait=2h is for "
     "--scheduling=flex_start only: it bounds how long a flex-start job waits for its machines"),
    ([*JOB_FLAGS, "--tensorboard=projects/p/locations/r/tensorboards/7"], "--tensorboard needs "
     "--service_account: Vertex AI writes to a TensorBoard instance only as a service account "
     "you give (one with the Vertex AI User role and write access to --base_output_dir)"),
    ([*JOB_FLAGS, "--resubmit=2"], "--resubmit=2 needs --wait: only a job followed to its end "
     "can be resubmitted when it ends"),
    (["resubmit", "--job=projects/p/locations/r/customJobs/7"], "not resubmitting "
     "projects/p/locations/r/customJobs/7: the trainer's own error, exit code 2: bad input or a "
     "refused restart, which would fail again the same way (INTERNAL: The replica "
     "workerpool0-0 exited with a non-zero status of 2. Termination reason: Error.)"),
])
def test_refusals_are_one_line_and_send_nothing(server, args, message):
  server.states = [State.JOB_STATE_FAILED]
  server.job_error = ("The replica workerpool0-0 exited with a non-zero status of 2. "
                      "Termination reason: Error.")
  result = _launch(*args, "--project=p", f"--api_endpoint={server.endpoint}")
  helpers.assert_one_error_line(result, message, whole=True)
  # resubmit reads the job to decide; nothing is created.
  assert [method for method, _ in server.requests] == (
      ["GetCustomJob"] if args[0] == "resubmit" else [])


# Another launcher process (3-5 s): the slow tier. vertex_api_test follows and resubmits the
# jobs through the same loop in the fast tier, and the resubmit command's submission is above.
@pytest.mark.slow
def test_train_wait_resubmit_follows_each_job_to_its_end(server):
  preempted = (grpc.StatusCode.INTERNAL,
               "The replica workerpool0-0 exited with a non-zero status of 143.")
  server.runs = [([State.JOB_STATE_RUNNING, State.JOB_STATE_FAILED], preempted),
                 ([State.JOB_STATE_RUNNING, State.JOB_STATE_SUCCEEDED], None)]
  result = _launch("--project=p", f"--api_endpoint={server.endpoint}", "--wait",
                   "--resubmit=2", "--poll_seconds=0.05", *JOB_FLAGS, *TRAINER_ARGS)
  assert result.returncode == 0, result.stderr[-3000:]
  first, second = (f"projects/p/locations/us-central1/customJobs/{int(fake_vertex.JOB_ID) + i}"
                   for i in range(2))
  lines = [line.split(" ", 2)[2] if "JOB_STATE" in line else line
           for line in result.stdout.splitlines()]
  assert lines == [
      f"submitted {first}", _console_link(first),
      f"JOB_STATE_RUNNING {_console_link(first)}",
      f"JOB_STATE_FAILED {_console_link(first)}",
      f"the job's error: {preempted[1]}",
      "resubmitting: preemption: the trainer saved on SIGTERM and exited 143 (INTERNAL: "
      f"{preempted[1]})",
      f"submitted {second}", _console_link(second),
      f"JOB_STATE_RUNNING {_console_link(second)}",
      f"JOB_STATE_SUCCEEDED {_console_link(second)}"]
  requests = server.requests_of("CreateCustomJob")
  assert len(requests) == 2 and requests[0].custom_job == requests[1].custom_job


def test_a_dry_run_checks_the_trainer_arguments_without_importing_tensorflow():
  result = helpers.run_module_without_tensorflow(  # A real `python -m` process.
      "launch.vertex", "--dry_run", *JOB_FLAGS, "--", "--epochs=3", "--noreport", "--v=1")
  assert result.returncode == 0, result.stderr[-3000:]
  printed = types.CustomJob.from_json(result.stdout)
  assert printed.job_spec.worker_pool_specs[0].container_spec.args == [
      "--epochs=3", "--noreport", "--v=1"]


@pytest.mark.parametrize("args, message", [
    # The command: each of these fails on a billed machine.
    (["--dry_run", f"--image_uri={IMAGE}", "--base_output_dir=gs://b/x", "--",
      "--datset=mnist", "--epoch=20", "--batch_size=-5"],
     "trainer argument: Unknown command line flag 'datset'. Did you mean: dataset ? (see "
     "python -m trainer.task --help)"),
    # What the trainer would refuse on the billed machine; a launcher's own flag likewise.
    (["--dry_run", f"--image_uri={IMAGE}", "--base_output_dir=gs://b/x", "--", "--epochs=3",
      "--epochs=5"], "trainer argument: --epochs is given twice (--epochs=3, then --epochs=5): "
     "give it once"),
    (["--dry_run", "--image_uri=a", f"--image_uri={IMAGE}", "--base_output_dir=gs://b/x"],
     f"--image_uri is given twice (--image_uri=a, then --image_uri={IMAGE}): give it once"),
    (["--dry_run", f"--image_uri={IMAGE}", "--base_output_dir=gs://b/x", "--dataset=mnist"],
     "--dataset is a flag of the trainer, not of launch.vertex: put trainer flags after --, as "
     "in python -m launch.vertex [flags] -- --dataset=mnist"),
])
def test_bad_trainer_arguments_are_refused_before_anything_is_sent(args, message):
  result = _launch(*args)
  helpers.assert_one_error_line(result, message, whole=True)
  assert result.stdout == ""


@pytest.mark.parametrize("args, shown, not_shown", [
    (["--help"], ["commands:\n  train ", "\n  batch_predict  run a registered model",
                  "python -m trainer.task --help lists them", "\ntrain flags:\n",
                  "--image_uri=''", "--project=''"], ["--job="]),
    (["wait", "--help"], ["wait: follow a submitted job (--job) to its end\n", "--job=''",
                          "--poll_seconds=30.0", "--project=''"], ["--image_uri", "--model="]),
    (["resubmit", "--help"], ["resubmit: submit a custom job (--job) that ended by preemption",
                              "--resubmit=0", "--job=''", "--[no]wait"],
     ["--image_uri", "--scheduling"]),
    (["deploy", "--help"], ["deploy: serve a registered model (--model)", "--min_replicas=1",
                            "--max_replicas=0", "--[no]spot", "--[no]replace", "--endpoint=''"],
     ["--image_uri", "--deployed_model", "--invert"]),
])
def test_help_exits_0_and_a_commands_help_shows_its_own_flags(args, shown, not_shown):
  result = _launch(*args)
  assert result.returncode == 0, result.stderr[-3000:]
  for text in shown:
    assert text in result.stdout, result.stdout
  for text in not_shown:
    assert text not in result.stdout, result.stdout


def test_a_refused_submission_is_one_error_line(server):
  server.errors["CreateCustomJob"] = [
      (grpc.StatusCode.PERMISSION_DENIED, "Permission 'aiplatform.customJobs.create' denied")]
  result = _launch("--project=p", f"--api_endpoint={server.endpoint}", *JOB_FLAGS)
  helpers.assert_one_error_line(
      result, f"{server.endpoint} answered PERMISSION_DENIED: Permission "
      "'aiplatform.customJobs.create' denied; the account needs the Vertex AI User role "
      "(roles/aiplatform.user) on the project, and the Vertex AI API enabled", whole=True)


def test_an_unreachable_endpoint_is_one_error_line_and_its_own_exit_code():
  result = _launch("--project=p", "--api_endpoint=127.0.0.1:1", *JOB_FLAGS)
  line = helpers.assert_one_error_line(result, "cannot reach Vertex AI at 127.0.0.1:1 (",
                                       vertex_api.UNREACHABLE_EXIT_CODE)
  assert line.startswith("error: cannot reach Vertex AI at 127.0.0.1:1 (")


NO_CREDENTIALS = ("no Google Cloud credentials found: run `gcloud auth application-default "
                  "login` (or set GOOGLE_APPLICATION_CREDENTIALS to a service account's key file)")


def test_no_credentials_are_said_with_how_to_get_them():
  from google.auth import exceptions as auth_exceptions
  error = auth_exceptions.DefaultCredentialsError("Your default credentials were not found.")
  assert vertex_api.explain(error, "us-central1-aiplatform.googleapis.com",
                            "us-central1") == NO_CREDENTIALS


def test_no_credentials_says_how_to_get_them(tmp_path):
  # Nothing of this machine's: no key file (google-auth reads an empty
  # GOOGLE_APPLICATION_CREDENTIALS as none), an empty home and gcloud configuration, and
  # google-auth's metadata server (how it finds a Compute Engine account) on a closed
  # loopback port, never the real metadata address.
  result = _launch("--project=p", *JOB_FLAGS, env=dict(
      GOOGLE_APPLICATION_CREDENTIALS="", GOOGLE_CLOUD_PROJECT="", HOME=str(tmp_path),
      CLOUDSDK_CONFIG=str(tmp_path / "gcloud"), NO_GCE_CHECK="true",
      GCE_METADATA_HOST="127.0.0.1:1", GCE_METADATA_ROOT="127.0.0.1:1",
      GCE_METADATA_IP="127.0.0.1:1"))
  helpers.assert_one_error_line(result, NO_CREDENTIALS, whole=True)


def test_cancel_by_id(server):
  result = _launch("cancel", "--job=7", "--project=p", "--region=asia-east1",
                   f"--api_endpoint={server.endpoint}")
  assert result.returncode == 0, result.stderr[-3000:]
  (request,) = server.requests_of("CancelCustomJob")
  assert request.name == "projects/p/locations/asia-east1/customJobs/7"


def test_batch_predict_and_upload_dry_runs_print_requests_the_sdk_accepts():
  result = _launch("batch_predict", "--dry_run", "--model=projects/p/locations/r/models/9",
                   "--instances=gs://b/in.jsonl", "--output_dir=gs://b/out")
  assert result.returncode == 0, result.stderr[-3000:]
  job = types.BatchPredictionJob.from_json(result.stdout)
  assert job.model == "projects/p/locations/r/models/9"
  result = _launch("upload", "--dry_run", "--model_dir=gs://b/run/model")
  assert result.returncode == 0, result.stderr[-3000:]
  model = types.Model.from_json(result.stdout)
  assert model.artifact_uri == "gs://b/run/model/export"
  assert model.container_spec.image_uri == vertex_api.SERVING_IMAGE


@pytest.mark.parametrize("args, message", [
    (["--image_uri=" + IMAGE, "--base_output_dir=" + OUTPUT],
     "no --project: give the Google Cloud project, or --dry_run"),
    (["--dry_run", "--image_uri=" + IMAGE, "--base_output_dir=" + OUTPUT, "--model_dir=gs://b/m"],
     "--model_dir is not a flag of train: its flags are --accelerator_count, --accelerator_type, "
     "--api_endpoint, --base_output_dir, --display_name, --dry_run, --image_uri, --machine_type, "
     "--max_wait, --poll_seconds, --project, --region, --replica_count, --resubmit, "
     "--retry_seconds, --scheduling, --service_account, --tensorboard, --timeout, "
     "--tpu_topology, --wait; the trainer's --model_dir goes after --, as in python -m "
     "launch.vertex [flags] -- --model_dir=VALUE"),
    (["uplaod"], "unknown command 'uplaod': choose one of train, tune, resubmit, wait, cancel, "
     "upload, batch_predict, deploy, predict, undeploy, first"),
    (["cancel", "--job=7", "--project=p", "--image_uri=x"],
     "--image_uri is not a flag of cancel: its flags are --api_endpoint, --job, "
     "--project, --region"),
    (["upload", "--model_dir=/tmp/run/model"], "--model_dir='/tmp/run/model' must be a "
     "gs:// path: Vertex AI reads the export from Cloud Storage (copy it there with gcloud "
     "storage cp -r)"),
    (["wait", "--job=7", "--project=p", "--poll_seconds=0"],
     "--poll_seconds=0.0 must be more than 0"),
    (["wait", "--job=7", "--project=p", "--retry_seconds=-5"],
     "--retry_seconds=-5.0 must be more than 0"),
    (["wait", "--job=7", "--project=p", "--retry_seconds=nan"],
     "--retry_seconds=nan must be more than 0"),
    (["deploy", "--model=projects/p/locations/r/models/1", "--min_replicas=3",
      "--max_replicas=2"], "--max_replicas=2 is below --min_replicas=3: give a --max_replicas of "
     "3 or more, or leave it out to serve from --min_replicas machines"),
    (["predict", "--endpoint=projects/p/locations/r/endpoints/1", "digit.png"], "no "
     "--model_dir: give the run's (local or gs://); its metrics.json names the classes and the "
     "background the model was trained on"),
])
def test_bad_commands_are_one_error_line(args, message):
  helpers.assert_one_error_line(_launch(*args), message, whole=True)


# Tuning jobs: the trials run the trainer with the arguments after `--` and the searched values.
TUNE_FLAGS = [f"--image_uri={IMAGE}", "--base_output_dir=gs://BUCKET/tune",
              "--machine_type=g2-standard-8", "--accelerator_type=NVIDIA_L4",
              "--accelerator_count=1", "--scheduling=spot",
              "--search=learning_rate:double:1e-4:1e-2:log",
              "--search=decoder_weight:double:1:32:log", "--early_stopping=decay_curve",
              "--max_trials=12", "--parallel_trials=3"]


def test_tune_sends_what_its_dry_run_prints_and_wait_ends_with_the_best_trial(server):
  # Its checks use the trainer's flags and validation, without importing TensorFlow.
  dry_run = _launch("tune", "--dry_run", *TUNE_FLAGS, "--", "--epochs=3", "--dataset=mnist",
                    without_tensorflow=True)
  assert dry_run.returncode == 0, dry_run.stderr[-3000:]
  printed = types.HyperparameterTuningJob.from_json(dry_run.stdout)
  spec = printed.study_spec
  assert [(p.parameter_id, p.double_value_spec.min_value, p.double_value_spec.max_value,
           p.scale_type.name) for p in spec.parameters] == [
      ("learning_rate", 1e-4, 1e-2, "UNIT_LOG_SCALE"), ("decoder_weight", 1, 32, "UNIT_LOG_SCALE")]
  assert [(m.metric_id, m.goal.name) for m in spec.metrics] == [
      ("validation_accuracy", "MAXIMIZE")]
  assert "decay_curve_stopping_spec" in spec
  (pool,) = printed.trial_job_spec.worker_pool_specs
  # The metric the trials report is the study's; the searched settings are Vertex AI's to add.
  assert list(pool.container_spec.args) == [
      "--epochs=3", "--dataset=mnist", "--tuning_metric=validation_accuracy"]
  assert printed.trial_job_spec.scheduling.strategy == types.Scheduling.Strategy.SPOT
  assert pool.machine_spec.accelerator_type == types.AcceleratorType.NVIDIA_L4

  server.states = [State.JOB_STATE_PENDING, State.JOB_STATE_RUNNING, State.JOB_STATE_SUCCEEDED]
  measured = types.Measurement(step_count=9380, metrics=[
      types.Measurement.Metric(metric_id="validation_accuracy", value=0.9731)])
  server.trials = [types.Trial(id="1", state=types.Trial.State.SUCCEEDED, parameters=[
      types.Trial.Parameter(parameter_id="learning_rate", value=0.0021),
      types.Trial.Parameter(parameter_id="decoder_weight", value=4.5)],
      final_measurement=measured)]
  result = _launch("tune", "--project=p", f"--api_endpoint={server.endpoint}", "--wait",
                   "--poll_seconds=0.05", *TUNE_FLAGS, "--", "--epochs=3", "--dataset=mnist")
  assert result.returncode == 0, result.stderr[-3000:]
  (request,) = server.requests_of("CreateHyperparameterTuningJob")
  assert request.parent == "projects/p/locations/us-central1"
  assert request.hyperparameter_tuning_job == printed
  name = f"projects/p/locations/us-central1/hyperparameterTuningJobs/{fake_vertex.TUNING_JOB_ID}"
  lines = [line.split(" ", 2)[2] if "JOB_STATE" in line else line
           for line in result.stdout.splitlines()]
  assert lines == [
      f"submitted {name}", "JOB_STATE_PENDING", "JOB_STATE_RUNNING", "JOB_STATE_SUCCEEDED",
      "best trial 1: validation_accuracy 0.9731 at step 9380, --learning_rate=0.0021 "
      "--decoder_weight=4.5; outputs gs://BUCKET/tune/1/model/",
      "train its settings again: python -m launch.vertex train [flags] -- --epochs=3 "
      "--dataset=mnist --learning_rate=0.0021 --decoder_weight=4.5",
      "trial 1: SUCCEEDED, validation_accuracy 0.9731 at step 9380, --learning_rate=0.0021 "
      "--decoder_weight=4.5"]


@pytest.mark.parametrize("args, message", [
    (["--search=learnig_rate:double:1e-4:1e-2"], "--search=learnig_rate:double:1e-4:1e-2: "
     "learnig_rate is not a setting of the trainer (did you mean learning_rate?): python -m "
     "trainer.task --help lists them"),
    (["--search=learning_rate:double:0:0.1"], "--search=learning_rate:double:0:0.1: the "
     "trainer refuses 0.0: --learning_rate=0.0 must be positive"),
    (["--search=learning_rate:double:1e-4:1e-2", "--", "--learning_rate=0.01"],
     "--search=learning_rate:double:1e-4:1e-2: --learning_rate is also fixed after --: Vertex "
     "AI appends the searched value to the trial's arguments, and the trainer refuses a flag "
     "given twice; drop one of them"),
    (["--search=learning_rate:double:1e-4:1e-2", "--", "--model_dir=gs://BUCKET/m"],
     "trainer argument --model_dir: each trial writes under its own directory, "
     "BASE_OUTPUT_DIR/<trial id>/ ($AIP_MODEL_DIR is its model/), and one directory for all "
     "would make its lease refuse every trial but one; drop it"),
    (["--search=learning_rate:double:1e-4:1e-2", "--algorithm=grid"], "--algorithm=grid cannot "
     "search a double range (--search=learning_rate:double:1e-4:1e-2): list its values as "
     "NAME:discrete:V1,V2,... or choose another --algorithm"),
    (["--search=width:integer:8:64", "--", "--epoch=3"], "trainer argument: Unknown command line "
     "flag 'epoch'. Did you mean: epochs ? (see python -m trainer.task --help)"),
])
def test_tune_refusals_are_one_line_and_send_nothing(server, args, message):
  result = _launch("tune", "--project=p", f"--api_endpoint={server.endpoint}",
                   f"--image_uri={IMAGE}", "--base_output_dir=gs://BUCKET/tune", *args)
  helpers.assert_one_error_line(result, message, whole=True)
  assert result.stdout == "" and server.requests == []


def test_cancel_takes_a_tuning_job_by_its_name(server):
  # (wait takes one as tune --wait follows it, above.)
  name = f"projects/p/locations/europe-west4/hyperparameterTuningJobs/{fake_vertex.TUNING_JOB_ID}"
  result = _launch("cancel", f"--job={name}", f"--api_endpoint={server.endpoint}")
  assert result.returncode == 0, result.stderr[-3000:]
  assert [method for method, _ in server.requests] == ["CancelHyperparameterTuningJob"]
  assert server.requests[0][1].name == name
  assert result.stdout.startswith(f"asked Vertex AI to cancel {name}; ")


# Online serving: deploy, predict and undeploy through the command line (launch.endpoints'
# tests check each request and answer in-process; these, that the flags reach them).
MODEL = "projects/p/locations/europe-west4/models/42"
ENDPOINT = "projects/p/locations/europe-west4/endpoints/77"


def test_deploy_dry_run_prints_each_request_without_importing_tensorflow():
  result = _launch(
      "deploy", "--dry_run", f"--model={MODEL}", "--machine_type=n1-standard-2",
      "--min_replicas=2", "--max_replicas=5", "--spot", without_tensorflow=True)
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stderr.splitlines() == ["--- EndpointService.CreateEndpoint",
                                        "--- EndpointService.DeployModel"]
  create, deploy = endpoints_test.json_documents(result.stdout)
  assert types.CreateEndpointRequest.from_json(create).parent == (
      "projects/p/locations/europe-west4")  # The model's: it deploys only in its region.
  request = types.DeployModelRequest.from_json(deploy)
  assert request.deployed_model.model == MODEL
  resources = request.deployed_model.dedicated_resources
  assert resources.machine_spec.machine_type == "n1-standard-2"
  assert (resources.min_replica_count, resources.max_replica_count, resources.spot) == (2, 5, True)
  assert dict(request.traffic_split) == {"0": 100}


def test_undeploy_takes_the_model_off_and_deletes_the_endpoint_without_tensorflow(server):
  server.endpoints[ENDPOINT] = types.Endpoint(
      name=ENDPOINT, deployed_models=[types.DeployedModel(id="5", model=MODEL)],
      traffic_split={"5": 100})
  result = _launch(
      "undeploy", "--endpoint=77", "--project=p", "--region=europe-west4",
      f"--api_endpoint={server.endpoint}", without_tensorflow=True)
  assert result.returncode == 0, result.stderr[-3000:]
  assert [method for method, _ in server.requests if method != "GetOperation"] == [
      "GetEndpoint", "UndeployModel", "DeleteEndpoint"]
  assert server.requests_of("UndeployModel")[0].deployed_model_id == "5"
  assert server.requests_of("DeleteEndpoint")[0].name == ENDPOINT
  assert result.stdout.splitlines()[-1] == (f"deleted {ENDPOINT}: nothing was deployed on it "
                                            "any more")


# A launcher command that imports TensorFlow to read images: the slow tier, each forked from the
# runner that has imported TensorFlow (the slow tier's: helpers.run_command_forked), not from the
# launchers' (8 s each). endpoints_test sends and answers the same requests in-process in the
# fast one.
@pytest.mark.slow
def test_predict_prints_the_endpoints_answers_and_refuses_a_file_that_is_not_an_image(
    server, tmp_path):
  endpoints_test.serving_endpoint(server, ("6", MODEL, 100))
  run = endpoints_test.run_directory(tmp_path / "run")
  images = endpoints_test.images_of(2, seed=4)
  np.save(tmp_path / "items.npy", images)
  (tmp_path / "notes.txt").write_text("not an image")
  flags = [f"--endpoint={ENDPOINT}", f"--model_dir={run}", f"--api_endpoint={server.endpoint}"]

  result = helpers.run_command_forked("launch.vertex", "predict", *flags,
                                      str(tmp_path / "items.npy"), timeout=120)
  assert result.returncode == 0, result.stderr[-3000:]
  labels = [endpoints_test.label_of(image) for image in images]
  assert result.stdout.splitlines() == [
      f"{tmp_path / 'items.npy'}[{index}]: {label} {endpoints_test.FASHION[label]} (probability "
      "0.9100)" for index, label in enumerate(labels)]

  refused = helpers.run_command_forked("launch.vertex", "predict", *flags,
                                       str(tmp_path / "items.npy"), str(tmp_path / "notes.txt"),
                                       timeout=120)
  helpers.assert_one_error_line(refused, f"{tmp_path / 'notes.txt'}: not an image; give a PNG, "
                                "JPEG, GIF or BMP image, or .npy/.npz arrays", whole=True)
  assert len(server.requests_of("Predict")) == 1  # The first call's: the second sent nothing.
