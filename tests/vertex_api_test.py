"""Tests of launch.vertex_api: the SDK's real clients against a stand-in Vertex AI on loopback."""

import datetime
import functools
import json
import re

import grpc
import pytest
from google.api_core import exceptions
from google.cloud.aiplatform_v1 import types

from launch import tuning_job, vertex_api
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
  # The created job's console link, whole, is vertex_test's: the launcher prints it (the SDK
  # that builds it takes seconds to import, there in the launcher's process, not here).


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
                    [].append, retry_seconds=0.3)
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


# Tuning jobs. A trial is the custom job train builds, with the trainer's fixed arguments.
TRIAL = JobSpec(image_uri="IMAGE", base_output_dir="gs://b/tune", machine_type="n1-standard-8",
                accelerator_type="NVIDIA_L4", accelerator_count=1, replica_count=2,
                scheduling="spot", timeout="2h",
                service_account="trainer@p.iam.gserviceaccount.com",
                trainer_args=("--epochs=3", "--tuning_metric=validation_reconstruction_mse"))
SEARCH = ("learning_rate:double:1e-4:1e-2:log", "decoder_weight:double:1:32:reverse_log",
          "width:integer:8:32", "unlabeled_weight:discrete:2,0.5,1",
          "precision:categorical:float32,mixed_bfloat16")
ParameterSpec = types.StudySpec.ParameterSpec


def _study(search=SEARCH, **settings):
  return tuning_job.Study(parameters=tuple(map(tuning_job.parse_search, search)), **settings)


def test_a_tuning_job_reaches_vertex_ai_field_by_field(server):
  study = _study(metric="validation_reconstruction_mse", algorithm="random",
                 early_stopping="decay_curve", max_trials=12, parallel_trials=3,
                 max_failed_trials=2)
  trial_job = build_custom_job(TRIAL)
  job = tuning_job.build_tuning_job(study, trial_job, "tune-mnist")
  created = vertex_api.submit_tuning_job(vertex_api.job_client(server.endpoint), PARENT, job)
  assert created.name == f"{PARENT}/hyperparameterTuningJobs/{fake_vertex.TUNING_JOB_ID}"
  (request,) = server.requests_of("CreateHyperparameterTuningJob")
  assert request.parent == PARENT
  sent = request.hyperparameter_tuning_job
  assert sent.display_name == "tune-mnist"
  assert (sent.max_trial_count, sent.parallel_trial_count, sent.max_failed_trial_count) == (
      12, 3, 2)
  spec = sent.study_spec
  assert [(m.metric_id, m.goal) for m in spec.metrics] == [
      ("validation_reconstruction_mse", types.StudySpec.MetricSpec.GoalType.MINIMIZE)]
  assert spec.algorithm == types.StudySpec.Algorithm.RANDOM_SEARCH
  assert "decay_curve_stopping_spec" in spec and "median_automated_stopping_spec" not in spec
  assert not spec.decay_curve_stopping_spec.use_elapsed_duration  # By global step.
  rate, decoder, width, unlabeled, precision = spec.parameters
  assert [p.parameter_id for p in spec.parameters] == [
      "learning_rate", "decoder_weight", "width", "unlabeled_weight", "precision"]
  assert (rate.double_value_spec.min_value, rate.double_value_spec.max_value) == (1e-4, 1e-2)
  assert rate.scale_type == ParameterSpec.ScaleType.UNIT_LOG_SCALE
  assert (decoder.double_value_spec.min_value, decoder.double_value_spec.max_value) == (1, 32)
  assert decoder.scale_type == ParameterSpec.ScaleType.UNIT_REVERSE_LOG_SCALE
  assert (width.integer_value_spec.min_value, width.integer_value_spec.max_value) == (8, 32)
  assert width.scale_type == ParameterSpec.ScaleType.UNIT_LINEAR_SCALE
  assert list(unlabeled.discrete_value_spec.values) == [0.5, 1.0, 2.0]  # In increasing order.
  assert list(precision.categorical_value_spec.values) == ["float32", "mixed_bfloat16"]
  assert precision.scale_type == ParameterSpec.ScaleType.SCALE_TYPE_UNSPECIFIED
  trial = sent.trial_job_spec
  chief, workers = trial.worker_pool_specs
  assert (chief.replica_count, workers.replica_count) == (1, 1)
  assert chief.machine_spec.machine_type == "n1-standard-8"
  assert chief.machine_spec.accelerator_type == types.AcceleratorType.NVIDIA_L4
  assert chief.machine_spec.accelerator_count == 1
  assert chief.container_spec.image_uri == "IMAGE"
  assert list(chief.container_spec.args) == [
      "--epochs=3", "--tuning_metric=validation_reconstruction_mse"]
  assert trial.scheduling.strategy == types.Scheduling.Strategy.SPOT
  assert trial.scheduling.timeout == datetime.timedelta(hours=2)
  assert trial.scheduling.restart_job_on_worker_restart
  assert trial.base_output_directory.output_uri_prefix == "gs://b/tune"
  assert trial.service_account == "trainer@p.iam.gserviceaccount.com"
  assert trial == trial_job.job_spec  # Nothing else: as train builds it.


@pytest.mark.parametrize("early_stopping, present", [
    ("none", []), ("decay_curve", ["decay_curve_stopping_spec"]),
    ("median", ["median_automated_stopping_spec"])])
@pytest.mark.parametrize("algorithm, expected", [
    ("bayesian", types.StudySpec.Algorithm.ALGORITHM_UNSPECIFIED),  # Vertex AI's default.
    ("grid", types.StudySpec.Algorithm.GRID_SEARCH),
    ("random", types.StudySpec.Algorithm.RANDOM_SEARCH)])
def test_each_algorithm_and_early_stopping_reach_the_study(server, early_stopping, present,
                                                           algorithm, expected):
  study = _study(SEARCH[2:], algorithm=algorithm, early_stopping=early_stopping)
  job = tuning_job.build_tuning_job(study, build_custom_job(TRIAL), "tune")
  vertex_api.submit_tuning_job(vertex_api.job_client(server.endpoint), PARENT, job)
  (request,) = server.requests_of("CreateHyperparameterTuningJob")
  spec = request.hyperparameter_tuning_job.study_spec
  assert spec.algorithm == expected
  assert [name for name in ("decay_curve_stopping_spec", "median_automated_stopping_spec",
                            "convex_automated_stopping_spec") if name in spec] == present
  assert spec.metrics[0].goal == types.StudySpec.MetricSpec.GoalType.MAXIMIZE  # Accuracy.


def _trial(trial_id, state, rate, width, mse=None, step=0, reason=""):
  measurement = types.Measurement(step_count=step, metrics=[
      types.Measurement.Metric(metric_id="validation_reconstruction_mse", value=mse)])
  return types.Trial(id=trial_id, state=state, infeasible_reason=reason, parameters=[
      types.Trial.Parameter(parameter_id="learning_rate", value=rate),
      types.Trial.Parameter(parameter_id="width", value=width)],
      final_measurement=measurement if mse is not None else None)


def test_a_finished_tuning_job_says_its_best_trial_and_each_trials_state(server):
  Trial = types.Trial.State
  server.states = [State.JOB_STATE_RUNNING, State.JOB_STATE_SUCCEEDED]
  server.trials = [_trial("1", Trial.SUCCEEDED, 0.001, 16.0, mse=0.0213, step=640),
                   _trial("2", Trial.SUCCEEDED, 0.0042, 32.0, mse=0.0187, step=640),
                   _trial("3", Trial.SUCCEEDED, 0.0003, 8.0, mse=0.0402, step=192),
                   _trial("4", Trial.INFEASIBLE, 0.009, 8.0, reason="training diverged")]
  client = vertex_api.job_client(server.endpoint)
  study = _study(("learning_rate:double:1e-4:1e-2:log", "width:integer:8:32"),
                 metric="validation_reconstruction_mse", early_stopping="median")
  created = vertex_api.submit_tuning_job(client, PARENT, tuning_job.build_tuning_job(
      study, build_custom_job(TRIAL), "tune"))
  ended = vertex_api.follow(client.get_hyperparameter_tuning_job, created.name, "", 0.01,
                            [].append)
  assert vertex_api.exit_code(ended) == 0
  assert vertex_api.tuning_summary(ended) == [
      "best trial 2: validation_reconstruction_mse 0.0187 at step 640, --learning_rate=0.0042 "
      "--width=32; outputs gs://b/tune/2/model/",
      "train its settings again: python -m launch.vertex train [flags] -- --epochs=3 "
      "--learning_rate=0.0042 --width=32",
      "trial 1: SUCCEEDED, validation_reconstruction_mse 0.0213 at step 640, "
      "--learning_rate=0.001 --width=16",
      "trial 2: SUCCEEDED, validation_reconstruction_mse 0.0187 at step 640, "
      "--learning_rate=0.0042 --width=32",
      # Stopped early, at its 192nd step.
      "trial 3: SUCCEEDED, validation_reconstruction_mse 0.0402 at step 192, "
      "--learning_rate=0.0003 --width=8",
      "trial 4: INFEASIBLE, --learning_rate=0.009 --width=8: training diverged"]


def test_a_tuning_job_without_a_measured_trial_says_so():
  study = _study(("learning_rate:double:1e-4:1e-2:log", "width:integer:8:32"))
  job = tuning_job.build_tuning_job(study, build_custom_job(TRIAL), "tune")
  job.trials = [_trial("1", types.Trial.State.INFEASIBLE, 0.001, 8.0, reason="out of memory")]
  assert vertex_api.tuning_summary(job) == [
      "no trial reported validation_accuracy: see each trial's state below",
      "trial 1: INFEASIBLE, --learning_rate=0.001 --width=8: out of memory"]


TRIAL_ENVIRONMENT = {"AIP_MODEL_DIR": "gs://b/tune/1/model/"}


@pytest.mark.parametrize("search, fixed, message", [
    ("learnig_rate:double:1e-4:1e-2", [], "--search=learnig_rate:double:1e-4:1e-2: learnig_rate "
     "is not a setting of the trainer (did you mean learning_rate?): python -m trainer.task "
     "--help lists them"),
    # A range the setting's own check refuses, at either end.
    ("learning_rate:double:0:0.1", [], "--search=learning_rate:double:0:0.1: the trainer "
     "refuses 0.0: --learning_rate=0.0 must be positive"),
    ("shift_pixels:integer:0:9", [], "--search=shift_pixels:integer:0:9: the trainer refuses 9: "
     "--shift_pixels=9 must be between 0 and 8"),
    ("strategy:categorical:mirrored,horovod", [], "the trainer refuses horovod: flag "
     "--strategy=horovod: value should be one of"),
    # Checked beside the fixed arguments, as the trial gets them.
    ("decoder_weight:double:1:32:log", ["--loss_weights=classifier=1,decoder=2"],
     "the trainer refuses 1.0: --decoder_weight=1.0 and --loss_weights=classifier=1.0,"
     "decoder=2.0 give the decoder two weights"),
    ("learning_rate:double:1e-4:1e-2", ["--epochs=3", "--learning_rate=0.01"],
     "--learning_rate is also fixed after --: Vertex AI appends the searched value to the "
     "trial's arguments, and the trainer refuses a flag given twice; drop one of them"),
    ("width:double:8:64", [], "--width takes integers, which a double parameter cannot set: "
     "make it integer or categorical"),
    ("width:discrete:8,16", [], "--width takes integers, which a discrete parameter cannot set"),
    ("loss_weights:categorical:a,b", [], "--loss_weights is NAME=WEIGHT pairs, which Vertex AI "
     "cannot search: search the decoder's weight, --search=decoder_weight:double:1:32:log"),
    ("model_dir:categorical:gs://b/a,gs://b/c", [], "--model_dir is not searched: each trial "
     "has its own"),
    ("tuning_metric:categorical:validation_accuracy", [], "--tuning_metric is not searched: "
     "--metric sets it"),
])
def test_a_search_the_trainer_would_refuse_is_refused_with_its_reason(search, fixed, message):
  parameter = tuning_job.parse_search(search)
  with pytest.raises(LaunchError, match=re.escape(message)):
    tuning_job.check_search([parameter], fixed, TRIAL_ENVIRONMENT)


@pytest.mark.parametrize("search, message", [
    ("learning_rate", "--search=learning_rate: write it as NAME:double:MIN:MAX[:SCALE], "),
    ("learning_rate:float:1:2", "write it as NAME:double"),
    ("learning_rate:double:1e-2:1e-4", "its MIN 1e-2 must be below its MAX 1e-4 (a fixed value "
     "goes after --)"),
    ("learning_rate:double:1e-4:1e-2:cubic", "unknown scale 'cubic': choose one of linear, log, "
     "reverse_log"),
    ("learning_rate:double:0:1e-2:log", "a log scale needs every value above 0"),
    ("width:integer:8:3e1", "'3e1' is not an integer"),
    ("learning_rate:double:1e-4:inf", "'inf' is not a number"),
    ("unlabeled_weight:discrete:1,,2", "a value is empty"),
    ("precision:categorical:float32,float32", "a value is listed twice"),
])
def test_a_search_that_is_not_one_is_refused_with_its_syntax(search, message):
  with pytest.raises(LaunchError, match=re.escape(message)):
    tuning_job.parse_search(search)


def test_a_searched_setting_once_and_each_search_checked():
  parameters = [tuning_job.parse_search(text) for text in SEARCH]
  tuning_job.check_search(parameters, ["--epochs=3"], TRIAL_ENVIRONMENT)  # All fine.
  with pytest.raises(LaunchError, match=re.escape(
      "--search=width:integer:16:64: --width is searched twice: give it one --search")):
    tuning_job.check_search([*parameters, tuning_job.parse_search("width:integer:16:64")],
                            ["--epochs=3"], TRIAL_ENVIRONMENT)


@pytest.mark.parametrize("args, message", [
    (["--model_dir=gs://b/m"], "trainer argument --model_dir: each trial writes under its own "
     "directory, BASE_OUTPUT_DIR/<trial id>/ ($AIP_MODEL_DIR is its model/), and one directory "
     "for all would make its lease refuse every trial but one; drop it"),
    (["--epochs=3", "--checkpoint_dir", "gs://b/c"], "trainer argument --checkpoint_dir: "),
    (["--tensorboard_dir=gs://b/l"], "trainer argument --tensorboard_dir: "),
    (["--tuning_metric=validation_accuracy"], "trainer argument --tuning_metric: tune sets it "
     "from --metric; drop it"),
    (["--flagfile=gs://b/flags"], "trainer argument --flagfile: a tuning job's trainer "
     "arguments are checked against its --search"),
])
def test_a_trials_directories_metric_and_flagfile_are_not_fixed_arguments(args, message):
  with pytest.raises(LaunchError, match=re.escape(message)):
    tuning_job.check_trial_arguments(args)


@pytest.mark.parametrize("settings, message", [
    (dict(search=()), "no --search: give a trainer setting to search, as NAME:double:"),
    (dict(goal="minimize"), "--goal=minimize: validation_accuracy is to maximize; drop --goal "
     "(its default is the metric's goal) or choose another --metric"),
    (dict(algorithm="grid"), "--algorithm=grid cannot search a double range (--search="
     "learning_rate:double:1e-4:1e-2:log): list its values as NAME:discrete:V1,V2,... or choose "
     "another --algorithm"),
    (dict(max_trials=0), "--max_trials=0 must be 1 or more"),
    (dict(parallel_trials=11), "--parallel_trials=11 must be between 1 and --max_trials (10)"),
    (dict(max_failed_trials=-1), "--max_failed_trials=-1 must be 0 (Vertex AI decides) or more"),
])
def test_a_study_vertex_ai_would_refuse_or_that_contradicts_itself_is_refused(settings, message):
  with pytest.raises(LaunchError, match=re.escape(message)):
    _study(**settings)


def test_tuning_jobs_are_named_in_full_and_a_bare_id_is_a_custom_jobs():
  name = f"{PARENT}/hyperparameterTuningJobs/777"
  assert vertex_api.job_name(name, "", "r") == name
  assert vertex_api.collection_of(name) == vertex_api.TUNING_JOBS
  assert vertex_api.job_name("777", "p", "r") == "projects/p/locations/r/customJobs/777"
