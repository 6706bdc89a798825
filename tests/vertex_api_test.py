"""Tests of launch.vertex_api: the SDK's real clients against a stand-in Vertex AI on loopback."""

import datetime
import functools
import json
import re

import grpc
import pytest
from google.api_core import exceptions
from google.cloud.aiplatform_v1 import types

from launch import vertex_api
from launch.custom_job import JobSpec, LaunchError, build_custom_job
from tests import fake_vertex

State = types.JobState
PARENT = "projects/p/locations/europe-west4"


@pytest.fixture
def server():
  fake = fake_vertex.FakeVertex().start()
  yield fake
  fake.stop()


def _job():
  return build_custom_job(JobSpec(image_uri="IMAGE", base_output_dir="gs://b/run",
                                  trainer_args=("--epochs=3",)))


def test_submit_sends_the_whole_job_to_the_project_and_region(server):
  created = vertex_api.submit(vertex_api.job_client(server.endpoint), PARENT, _job())
  assert created.name == f"{PARENT}/customJobs/{fake_vertex.JOB_ID}"
  (request,) = server.requests_of("CreateCustomJob")
  assert request.parent == PARENT
  assert request.custom_job == _job()
  # The routing header that sends the call to the region's backend.
  assert server.metadata[0]["x-goog-request-params"] == f"parent={PARENT}"
  assert vertex_api.console_link(created.name).endswith(
      f"/locations/europe-west4/training/{fake_vertex.JOB_ID}?project=p")


@pytest.mark.parametrize("states, exit_code", [
    ([State.JOB_STATE_PENDING, State.JOB_STATE_RUNNING, State.JOB_STATE_SUCCEEDED], 0),
    ([State.JOB_STATE_RUNNING, State.JOB_STATE_FAILED], vertex_api.FAILED_EXIT_CODE),
    ([State.JOB_STATE_RUNNING, State.JOB_STATE_CANCELLING, State.JOB_STATE_CANCELLED],
     vertex_api.CANCELLED_EXIT_CODE),
])
def test_wait_says_each_state_once_and_ends_with_the_jobs_outcome(server, states, exit_code):
  server.states = [states[0], *states]  # The first state is seen twice: said once.
  server.job_error = "Replica chief exited with a non-zero status of 2."
  said = []
  client = vertex_api.job_client(server.endpoint)
  name = f"{PARENT}/customJobs/{fake_vertex.JOB_ID}"
  assert vertex_api.wait(client.get_custom_job, name, "LINK", 0.01, said.append) == exit_code
  assert [line.split(" ", 2)[2] for line in said if "JOB_STATE" in line] == [
      f"{state.name} LINK" for state in states]
  assert all(re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\dZ JOB_STATE_", line)
             for line in said if "JOB_STATE" in line)
  failed = states[-1] == State.JOB_STATE_FAILED
  assert (said[-1] == f"the job's error: {server.job_error}") == failed
  assert len(server.requests_of("GetCustomJob")) == len(states) + 1


def test_wait_retries_an_unavailable_api_and_goes_on(server):
  server.errors["GetCustomJob"] = [None] + [(grpc.StatusCode.UNAVAILABLE, "backend restarting")] * 2
  server.states = [State.JOB_STATE_RUNNING, State.JOB_STATE_SUCCEEDED]
  said = []
  client = vertex_api.job_client(server.endpoint)
  assert vertex_api.wait(client.get_custom_job, "projects/p/locations/r/customJobs/1", "",
                         0.01, said.append) == 0
  assert sum("unavailable (backend restarting); retrying" in line for line in said) == 2
  assert len(server.requests_of("GetCustomJob")) == 4


def test_wait_gives_up_after_retry_seconds_of_an_unavailable_api(server):
  server.errors["GetCustomJob"] = [None] + [(grpc.StatusCode.UNAVAILABLE, "backend down")] * 500
  server.states = [State.JOB_STATE_RUNNING]
  client = vertex_api.job_client(server.endpoint)
  with pytest.raises(exceptions.RetryError) as raised:
    vertex_api.wait(client.get_custom_job, "projects/p/locations/r/customJobs/1", "", 0.05,
                    [].append, retry_seconds=1.0)
  assert isinstance(raised.value.cause, exceptions.ServiceUnavailable)
  assert vertex_api.explain(raised.value, server.endpoint, "r").startswith(
      f"cannot reach Vertex AI at {server.endpoint} (")


@pytest.mark.parametrize("seconds, message", [
    (dict(poll_seconds=0.0), "--poll_seconds=0.0 must be more than 0"),
    (dict(retry_seconds=-5.0), "--retry_seconds=-5.0 must be more than 0"),
    (dict(retry_seconds=float("nan")), "--retry_seconds=nan must be more than 0")])
def test_wait_refuses_a_poll_or_retry_time_that_is_not_positive(server, seconds, message):
  # Callers other than the command line (a notebook, a script) get the same check.
  client = vertex_api.job_client(server.endpoint)
  with pytest.raises(LaunchError, match=re.escape(message)):
    vertex_api.wait(client.get_custom_job, "projects/p/locations/r/customJobs/1", "",
                    **{"poll_seconds": 0.01, **seconds})
  assert not server.requests_of("GetCustomJob")


def test_wait_does_not_retry_its_first_poll_nor_expired_credentials(server):
  # A wrong endpoint or job shows at once; an expired login, which gRPC reports as
  # UNAVAILABLE, is no outage either.
  refresh = "Getting metadata from plugin failed with error: Reauthentication is needed."
  server.errors["GetCustomJob"] = [(grpc.StatusCode.UNAVAILABLE, "no route")]
  client = vertex_api.job_client(server.endpoint)
  name = "projects/p/locations/r/customJobs/1"
  with pytest.raises(exceptions.ServiceUnavailable):
    vertex_api.wait(client.get_custom_job, name, "", 0.01, [].append)
  server.errors["GetCustomJob"] = [None, (grpc.StatusCode.UNAVAILABLE, refresh)]
  server.states = [State.JOB_STATE_RUNNING]
  with pytest.raises(exceptions.ServiceUnavailable) as raised:
    vertex_api.wait(client.get_custom_job, name, "", 0.01, [].append)
  assert len(server.requests_of("GetCustomJob")) == 3
  assert vertex_api.explain(raised.value, server.endpoint, "r") == (
      f"the credentials could not be refreshed ({refresh}): run `gcloud auth "
      "application-default login` again")


def test_a_failed_submission_is_not_retried(server):
  server.errors["CreateCustomJob"] = [(grpc.StatusCode.UNAVAILABLE, "try again")]
  with pytest.raises(exceptions.ServiceUnavailable):
    vertex_api.submit(vertex_api.job_client(server.endpoint), PARENT, _job())
  assert len(server.requests_of("CreateCustomJob")) == 1  # A retry could start two jobs.


@pytest.mark.parametrize("code, message, expected", [
    (grpc.StatusCode.UNAUTHENTICATED, "Request had invalid authentication credentials.",
     "gcloud auth application-default login"),
    (grpc.StatusCode.PERMISSION_DENIED,
     "Permission 'aiplatform.customJobs.create' denied on resource",
     "roles/aiplatform.user"),
    (grpc.StatusCode.NOT_FOUND, "Project 'typo' not found", "check --project, and that "
     "--region=europe-west4 is a Vertex AI region"),
    (grpc.StatusCode.INVALID_ARGUMENT, "machine type n1-standard-3 is not supported",
     "Vertex AI refused the request as it is"),
])
def test_each_refusal_is_one_line_naming_the_endpoint_the_answer_and_the_fix(
    server, code, message, expected):
  server.errors["CreateCustomJob"] = [(code, message)]
  with pytest.raises(exceptions.GoogleAPICallError) as raised:
    vertex_api.submit(vertex_api.job_client(server.endpoint), PARENT, _job())
  line = vertex_api.explain(raised.value, server.endpoint, "europe-west4")
  assert line.startswith(f"{server.endpoint} answered {code.name}: {message}; ")
  assert expected in line and "\n" not in line


def test_an_unreachable_endpoint_is_explained():
  client = vertex_api.job_client("127.0.0.1:1")  # Nothing listens on port 1.
  with pytest.raises(exceptions.ServiceUnavailable) as raised:
    client.get_custom_job(name="projects/p/locations/r/customJobs/1", timeout=10)
  line = vertex_api.explain(raised.value, "127.0.0.1:1", "europe-west4")
  assert line.startswith("cannot reach Vertex AI at 127.0.0.1:1 (")
  assert line.endswith("check the network, and --region=europe-west4 or --api_endpoint")


def test_errors_that_are_not_the_apis_are_left_to_show_their_traceback():
  assert vertex_api.explain(KeyError("x"), "e", "r") is None


def test_job_names_from_ids_or_resource_names():
  assert vertex_api.job_name("123", "p", "r") == "projects/p/locations/r/customJobs/123"
  assert vertex_api.job_name("projects/q/locations/s/customJobs/9", "", "r") == (
      "projects/q/locations/s/customJobs/9")
  with pytest.raises(LaunchError, match="give --project too"):
    vertex_api.job_name("123", "", "r")
  with pytest.raises(LaunchError, match="neither a job's resource name"):
    vertex_api.job_name("my-job", "p", "r")
  with pytest.raises(LaunchError, match="is not a job's resource name"):
    vertex_api.job_name("projects/p/locations/r/models/9", "p", "r")
  assert vertex_api.region_of("projects/p/locations/asia-east1/customJobs/7") == "asia-east1"


def _finished_model_dir(path, metrics=True):
  (path / "export").mkdir(parents=True)
  (path / "export" / "saved_model.pb").write_bytes(b"")
  if metrics:
    (path / "metrics.json").write_text(json.dumps(
        {"test_accuracy": 0.98, "test_reconstruction_mse": 0.0102}))
  return str(path)


def test_upload_registers_a_finished_export_and_waits_for_the_operation(server, tmp_path):
  model_dir = _finished_model_dir(tmp_path / "model")
  model = vertex_api.model_for(model_dir, "mnist", vertex_api.SERVING_IMAGE,
                               vertex_api.check_finished(model_dir))
  said = []
  name = vertex_api.upload(vertex_api.model_client(server.endpoint), PARENT, model, timeout=60,
                           say=said.append)
  assert name == f"{PARENT}/models/{fake_vertex.MODEL_ID}"
  assert said == [f"registering: operation {PARENT}/operations/77"]
  (request,) = server.requests_of("UploadModel")
  assert request.parent == PARENT
  assert request.model.artifact_uri == f"{model_dir}/export"
  assert request.model.container_spec.image_uri == vertex_api.SERVING_IMAGE
  assert request.model.description == "test accuracy 0.9800, reconstruction MSE 0.0102"
  assert len(server.requests_of("GetOperation")) == 2  # Polled until done.


def test_upload_refuses_a_job_that_has_not_finished(tmp_path):
  with pytest.raises(LaunchError, match="metrics.json: the job has not finished"):
    vertex_api.check_finished(_finished_model_dir(tmp_path / "model", metrics=False))
  (tmp_path / "empty").mkdir()
  (tmp_path / "empty" / "metrics.json").write_text("{}")
  with pytest.raises(LaunchError, match="no SavedModel in"):
    vertex_api.check_finished(str(tmp_path / "empty"))
  broken = _finished_model_dir(tmp_path / "broken", metrics=False)
  (tmp_path / "broken" / "metrics.json").write_text("{not json")
  with pytest.raises(LaunchError, match="is not the JSON a finished job writes"):
    vertex_api.check_finished(broken)


def test_batch_prediction_reads_json_lines_and_writes_predictions_to_cloud_storage(server):
  job = vertex_api.batch_prediction_job("projects/p/locations/r/models/9", "gs://b/in.jsonl",
                                        "gs://b/out", "n1-standard-4", 3, "predict")
  client = vertex_api.job_client(server.endpoint)
  created = client.create_batch_prediction_job(parent=PARENT, batch_prediction_job=job)
  assert created.name.startswith(f"{PARENT}/batchPredictionJobs/")
  (request,) = server.requests_of("CreateBatchPredictionJob")
  sent = request.batch_prediction_job
  assert sent.input_config.instances_format == "jsonl"
  assert list(sent.input_config.gcs_source.uris) == ["gs://b/in.jsonl"]
  assert sent.output_config.gcs_destination.output_uri_prefix == "gs://b/out"
  assert sent == job  # Everything the dry run prints reached the server.
  model = "projects/p/locations/r/models/9"
  with pytest.raises(LaunchError, match="--instances='in.jsonl' must be a gs:// path"):
    vertex_api.batch_prediction_job(model, "in.jsonl", "gs://b/out", "n1-standard-4", 1, "p")
  with pytest.raises(LaunchError, match="--model='9' is not a model's resource name"):
    vertex_api.batch_prediction_job("9", "gs://b/i", "gs://b/out", "n1-standard-4", 1, "p")
  with pytest.raises(LaunchError, match="--replica_count=0 must be 1 or more"):
    vertex_api.batch_prediction_job(model, "gs://b/i", "gs://b/out", "n1-standard-4", 0, "p")


def test_cancel_asks_for_the_named_job(server):
  vertex_api.job_client(server.endpoint).cancel_custom_job(name=f"{PARENT}/customJobs/1")
  (request,) = server.requests_of("CancelCustomJob")
  assert request.name == f"{PARENT}/customJobs/1"


def _spot_job():
  return build_custom_job(JobSpec(
      image_uri="IMAGE", base_output_dir="gs://b/run", trainer_args=("--epochs=3",),
      replica_count=2, scheduling="spot", timeout="12h",
      service_account="trainer@p.iam.gserviceaccount.com",
      tensorboard=f"{PARENT}/tensorboards/7"))


def test_scheduling_timeout_service_account_and_tensorboard_reach_vertex_ai(server):
  vertex_api.submit(vertex_api.job_client(server.endpoint), PARENT, _spot_job())
  (request,) = server.requests_of("CreateCustomJob")
  sent = request.custom_job.job_spec
  assert sent.scheduling.strategy == types.Scheduling.Strategy.SPOT
  assert sent.scheduling.timeout == datetime.timedelta(hours=12)
  assert "max_wait_duration" not in sent.scheduling
  assert sent.scheduling.restart_job_on_worker_restart  # Two replicas: restarted together.
  assert sent.service_account == "trainer@p.iam.gserviceaccount.com"
  assert sent.tensorboard == f"{PARENT}/tensorboards/7"
  assert sent.base_output_directory.output_uri_prefix == "gs://b/run"


def test_a_flex_start_jobs_wait_reaches_vertex_ai(server):
  job = build_custom_job(JobSpec(image_uri="IMAGE", base_output_dir="gs://b/run",
                                 scheduling="flex_start", max_wait="30m"))
  vertex_api.submit(vertex_api.job_client(server.endpoint), PARENT, job)
  (request,) = server.requests_of("CreateCustomJob")
  scheduling = request.custom_job.job_spec.scheduling
  assert scheduling.strategy == types.Scheduling.Strategy.FLEX_START
  assert scheduling.max_wait_duration == datetime.timedelta(minutes=30)
  assert "timeout" not in scheduling


def test_a_resubmitted_job_has_the_same_spec_and_nothing_vertex_ai_filled_in(server):
  client = vertex_api.job_client(server.endpoint)
  job = _spot_job()
  job.labels = {"team": "vision"}
  job.encryption_spec = types.EncryptionSpec(kms_key_name="projects/p/keys/k")
  server.runs = [([State.JOB_STATE_FAILED], (grpc.StatusCode.RESOURCE_EXHAUSTED, "stockout"))]
  created = vertex_api.submit(client, PARENT, job)
  ended = client.get_custom_job(name=created.name)
  assert ended.state == State.JOB_STATE_FAILED and ended.error.message == "stockout"
  again = vertex_api.resubmitted_job(ended)
  assert again == job  # Spec, display name, labels, encryption; no name, state, error.
  vertex_api.submit(client, vertex_api.parent_of(ended.name), again)
  first, second = server.requests_of("CreateCustomJob")
  assert second.parent == first.parent == PARENT
  assert second.custom_job == first.custom_job


PREEMPTED = (grpc.StatusCode.INTERNAL,
             "The replica workerpool0-0 exited with a non-zero status of 143. Termination "
             "reason: Error.")
NO_CAPACITY = (grpc.StatusCode.RESOURCE_EXHAUSTED,
               "Resources are insufficient in region: europe-west4. Please try a different region.")
TRAINER_ERROR = (grpc.StatusCode.INTERNAL,
                 "The replica workerpool0-0 exited with a non-zero status of 2. Termination "
                 "reason: Error.")


def _failed(error):
  return [State.JOB_STATE_RUNNING, State.JOB_STATE_FAILED], error


@pytest.mark.parametrize("runs, exit_code, decisions", [
    # Preempted, then short of capacity, then finished: resubmitted twice.
    ([_failed(PREEMPTED), _failed(NO_CAPACITY),
      ([State.JOB_STATE_RUNNING, State.JOB_STATE_SUCCEEDED], None)], 0,
     ["resubmitting: preemption: the trainer saved on SIGTERM and exited 143 (INTERNAL: "
      f"{PREEMPTED[1]})",
      f"resubmitting: lack of capacity (RESOURCE_EXHAUSTED: {NO_CAPACITY[1]})"]),
    # Preempted, then the trainer's own error: that job is not resubmitted.
    ([_failed(PREEMPTED), _failed(TRAINER_ERROR)], vertex_api.FAILED_EXIT_CODE,
     ["resubmitting: preemption: the trainer saved on SIGTERM and exited 143 (INTERNAL: "
      f"{PREEMPTED[1]})",
      "not resubmitting: the trainer's own error, exit code 2: bad input or a refused restart, "
      f"which would fail again the same way (INTERNAL: {TRAINER_ERROR[1]})"]),
    ([([State.JOB_STATE_RUNNING, State.JOB_STATE_CANCELLING, State.JOB_STATE_CANCELLED],
       (grpc.StatusCode.CANCELLED, "CANCELED"))], vertex_api.CANCELLED_EXIT_CODE,
     ["not resubmitting: the job was cancelled"]),
    # Preempted three times: --resubmit=2 gives up on the third.
    ([_failed(PREEMPTED), _failed((grpc.StatusCode.INTERNAL, "Spot VM stockout")),
      _failed(NO_CAPACITY)], vertex_api.FAILED_EXIT_CODE,
     ["resubmitting: preemption: the trainer saved on SIGTERM and exited 143 (INTERNAL: "
      f"{PREEMPTED[1]})",
      "resubmitting: preemption (INTERNAL: Spot VM stockout)",
      f"not resubmitting: lack of capacity (RESOURCE_EXHAUSTED: {NO_CAPACITY[1]}); resubmitted "
      "2 times already (--resubmit)"]),
])
def test_wait_resubmitting_submits_the_same_spec_again_only_after_preemption(
    server, runs, exit_code, decisions):
  server.runs = runs
  client = vertex_api.job_client(server.endpoint)
  said = []
  created = vertex_api.submit(client, PARENT, _spot_job())
  assert vertex_api.wait_resubmitting(
      lambda name: vertex_api.follow(client.get_custom_job, name, "", 0.01, said.append),
      functools.partial(vertex_api.submit, client), created, 2, said.append) == exit_code
  assert [line for line in said if "resubmitting: " in line] == decisions
  requests = server.requests_of("CreateCustomJob")
  assert len(requests) == len(runs)
  assert all(r.parent == PARENT and r.custom_job == _spot_job() for r in requests)
  # Each job followed to its end, under its own name.
  assert [r.name for r in server.requests_of("GetCustomJob")] == [
      f"{PARENT}/customJobs/{int(fake_vertex.JOB_ID) + i}"
      for i, (states, _) in enumerate(runs) for _ in states]


def _ended(state=State.JOB_STATE_FAILED, code=grpc.StatusCode.INTERNAL, message="",
           ran=None, timeout=None):
  job = types.CustomJob(name=f"{PARENT}/customJobs/1", state=state,
                        error={"code": code.value[0], "message": message})
  if timeout:
    job.job_spec.scheduling.timeout = timeout
  if ran:
    start = datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc)
    job.start_time, job.end_time = start, start + ran
  return job


@pytest.mark.parametrize("job, again, reason", [
    (_ended(code=grpc.StatusCode.RESOURCE_EXHAUSTED, message=NO_CAPACITY[1]), True,
     "lack of capacity (RESOURCE_EXHAUSTED: Resources are insufficient"),
    (_ended(code=grpc.StatusCode.UNAVAILABLE, message="zone unavailable"), True,
     "machines unavailable (UNAVAILABLE: zone unavailable)"),
    (_ended(message="Job failed with a STOCKOUT error."), True, "preemption (INTERNAL: Job"),
    (_ended(message="Instance was preempted."), True, "preemption (INTERNAL: Instance"),
    (_ended(message=PREEMPTED[1]), True, "preemption: the trainer saved on SIGTERM and exited 143"),
    # One worker preempted, the other lost contact with it.
    (_ended(message="The replica workerpool0-0 exited with a non-zero status of 143. The "
            "replica workerpool1-0 exited with a non-zero status of 1."), True, "preemption: "),
    (_ended(code=grpc.StatusCode.RESOURCE_EXHAUSTED, message=TRAINER_ERROR[1]), False,
     "the trainer's own error, exit code 2: bad input or a refused restart"),
    (_ended(message="The replica workerpool0-0 exited with a non-zero status of 1."), False,
     "neither preemption nor lack of capacity (INTERNAL: The replica"),
    (_ended(message="Internal error occurred."), False, "neither preemption nor lack"),
    (_ended(state=State.JOB_STATE_CANCELLED, code=grpc.StatusCode.CANCELLED, message="CANCELED"),
     False, "the job was cancelled"),
    (_ended(code=grpc.StatusCode.DEADLINE_EXCEEDED, message="Job ran too long."), False,
     "the job ran out its --timeout (DEADLINE_EXCEEDED: Job ran too long.)"),
    # Stopped by its time limit, whatever the error says.
    (_ended(message=PREEMPTED[1], ran=datetime.timedelta(hours=2),
            timeout=datetime.timedelta(hours=2)), False, "the job ran out its --timeout"),
    (_ended(message=PREEMPTED[1], ran=datetime.timedelta(hours=1),
            timeout=datetime.timedelta(hours=2)), True, "preemption: "),
    (_ended(state=State.JOB_STATE_SUCCEEDED), False, "the job succeeded: there is nothing"),
    (_ended(state=State.JOB_STATE_RUNNING), False,
     "the job has not ended (JOB_STATE_RUNNING): follow it with wait"),
])
def test_only_jobs_ended_by_preemption_or_lack_of_capacity_are_resubmitted(job, again, reason):
  decision = vertex_api.resubmission(job)
  assert decision[0] is again
  assert decision[1].startswith(reason), decision[1]
