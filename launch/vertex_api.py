"""Talking to Vertex AI: the clients, the calls the launcher makes, and what their errors mean.

Every call goes through the SDK's own `aiplatform_v1` clients (the `vertex` extra). They reach
`endpoint`: Vertex AI's regional one, a Private Service Connect one, or one on this machine
(localhost, 127.0.0.1), which is spoken to in plain gRPC with no credentials, as local
emulators and the tests' stand-in expect. `explain` turns a failed call into one line a user can
act on; `resubmission` decides which ended jobs are worth submitting again.
"""

import datetime
import functools
import re
import shlex
import time
from typing import Callable, List, Optional, Tuple

from launch.custom_job import LaunchError
from launch.tuning_job import TUNING_METRIC_FLAG
from trainer.job import run_directory
from trainer.errors import (BAD_INPUT_EXIT_CODE, INTERRUPTED_EXIT_CODE, PREEMPTED_EXIT_CODE,
                            first_line)

# Vertex AI's prebuilt TensorFlow prediction containers; 2.15 is the newest TensorFlow offered.
SERVING_IMAGE = "us-docker.pkg.dev/vertex-ai/prediction/tf2-cpu.2-15:latest"
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "[::1]")
# Exit codes of a job that `wait` saw end; a job that succeeded gives 0.
FAILED_EXIT_CODE = 1
UNREACHABLE_EXIT_CODE = 3
CANCELLED_EXIT_CODE = 4
# An outage while waiting is retried for this long before the launcher gives up; each poll
# may take this long before it counts as failed (the API sets no deadline of its own).
UNAVAILABLE_RETRY_SECONDS = 600.0
POLL_TIMEOUT_SECONDS = 60.0
# How gRPC reports google-auth failing to refresh the credentials (an expired login): as
# UNAVAILABLE, though no retry can mend it.
CREDENTIALS_REFRESH_FAILED = "Getting metadata from plugin failed"
JOB_COLLECTIONS = ("customJobs", "batchPredictionJobs", "hyperparameterTuningJobs")
TUNING_JOBS = "hyperparameterTuningJobs"
# How each end of a job sets the exit code of `wait`.
ENDED_EXIT_CODES = {"JOB_STATE_SUCCEEDED": 0, "JOB_STATE_PARTIALLY_SUCCEEDED": 0,
                    "JOB_STATE_FAILED": FAILED_EXIT_CODE, "JOB_STATE_EXPIRED": FAILED_EXIT_CODE,
                    "JOB_STATE_CANCELLED": CANCELLED_EXIT_CODE}

# Which ended custom jobs are submitted again (`resubmission`): only those that ended by
# preemption or lack of capacity, which the same spec may get past on other machines or later,
# resuming from the newest checkpoint. A job's error is a google.rpc.Status; the first rule that
# applies decides:
#   never: a cancelled job (someone chose to stop it); a job that ran out its --timeout
#     (DEADLINE_EXCEEDED, or a run as long as its limit); the trainer's own error, a replica that
#     exited 2 (bad input, a refused restart, a divergence: it would fail again the same way).
#   resubmitted: the codes in CAPACITY_CODES; a message with a word of PREEMPTION_WORDS; a
#     replica that exited 143 (the trainer saved on SIGTERM, how a VM's preemption is announced;
#     in a multi-worker job the others then exit 1, having lost contact with it).
#   never: anything else, such as INTERNAL or another exit status (a crash would happen again).
CAPACITY_CODES = {
    # google.rpc.Code 8, "some resource has been exhausted": Vertex AI's "Resources are
    # insufficient in region"; quota is not it (a job short of quota waits in JOB_STATE_QUEUED).
    "RESOURCE_EXHAUSTED": "lack of capacity",
    # google.rpc.Code 14, "a transient condition, which can be corrected by retrying".
    "UNAVAILABLE": "machines unavailable",
}
# Vertex AI's Spot page: a job whose Spot VMs are reclaimed "fails with a STOCKOUT error";
# Compute Engine says a reclaimed VM was "preempted".
PREEMPTION_WORDS = ("stockout", "preempt")
# How Vertex AI names a replica's exit: "... exited with a non-zero status of 2".
REPLICA_EXIT_STATUS = re.compile(r"non-zero status of (\d+)")


def default_endpoint(region: str) -> str:
  """Vertex AI's regional endpoint: a resource of REGION is reachable only there."""
  return f"{region}-aiplatform.googleapis.com"


def region_of(name: str) -> str:
  """The region of a resource name (projects/P/locations/R/...), '' for another string."""
  parts = name.split("/")
  return parts[3] if len(parts) > 3 and parts[0] == "projects" and parts[2] == "locations" else ""


def collection_of(name: str) -> str:
  """The collection of a resource name's ID: customJobs, batchPredictionJobs, models, ..."""
  parts = name.split("/")
  return parts[4] if len(parts) > 5 else ""


def is_transient(error) -> bool:
  """Whether retrying `error` can help: UNAVAILABLE or a missed deadline, not credentials."""
  from google.api_core import exceptions
  return (isinstance(error, (exceptions.ServiceUnavailable, exceptions.DeadlineExceeded))
          and CREDENTIALS_REFRESH_FAILED not in str(error.message))


def _is_loopback(endpoint: str) -> bool:
  return endpoint.rsplit(":", 1)[0] in LOOPBACK_HOSTS


def job_client(endpoint: str):
  """A JobServiceClient for `endpoint`; raises google-auth's DefaultCredentialsError where a
  remote endpoint needs credentials and there are none."""
  from google.cloud.aiplatform_v1 import JobServiceClient
  from google.cloud.aiplatform_v1.services.job_service.transports import JobServiceGrpcTransport
  return _client(JobServiceClient, JobServiceGrpcTransport, endpoint)


def model_client(endpoint: str):
  """A ModelServiceClient for `endpoint` (as `job_client`)."""
  from google.cloud.aiplatform_v1 import ModelServiceClient
  from google.cloud.aiplatform_v1.services.model_service.transports import (
      ModelServiceGrpcTransport)
  return _client(ModelServiceClient, ModelServiceGrpcTransport, endpoint)


def endpoint_client(endpoint: str):
  """An EndpointServiceClient for `endpoint` (as `job_client`)."""
  from google.cloud.aiplatform_v1 import EndpointServiceClient
  from google.cloud.aiplatform_v1.services.endpoint_service.transports import (
      EndpointServiceGrpcTransport)
  return _client(EndpointServiceClient, EndpointServiceGrpcTransport, endpoint)


def prediction_client(endpoint: str):
  """A PredictionServiceClient for `endpoint` (as `job_client`): online predictions go to the
  same regional endpoint as the other calls."""
  from google.cloud.aiplatform_v1 import PredictionServiceClient
  from google.cloud.aiplatform_v1.services.prediction_service.transports import (
      PredictionServiceGrpcTransport)
  return _client(PredictionServiceClient, PredictionServiceGrpcTransport, endpoint)


def _client(client_type, transport_type, endpoint: str):
  if _is_loopback(endpoint):
    import grpc
    # A channel given to the transport means no credential lookup and no TLS.
    return client_type(transport=transport_type(channel=grpc.insecure_channel(endpoint),
                                                host=endpoint))
  return client_type(client_options={"api_endpoint": endpoint})


def to_json(message) -> str:
  """A request message as the REST API's JSON: camelCase fields, enum names, defaults left out."""
  return type(message).to_json(message, use_integers_for_enums=False,
                               always_print_fields_with_no_presence=False, indent=2)


def console_link(custom_job_name: str) -> str:
  """The Cloud console's page of a custom job."""
  from google.cloud.aiplatform.utils import console_utils
  return console_utils.custom_job_console_uri(custom_job_name)


def submit(client, parent: str, custom_job):
  """Creates `custom_job` under `parent` (projects/P/locations/R); returns the created job.

  Never retried: a retry after a lost answer could start the job twice.
  """
  return client.create_custom_job(parent=parent, custom_job=custom_job)


def job_name(job: str, project: str, region: str) -> str:
  """A job's resource name from `job`: the name itself (of a custom, batch prediction or tuning
  job), or a custom job's ID within --project/--region (a bare ID is always a custom job's: the
  other kinds are named in full, as the commands that submit them print them)."""
  kind = "customJobs"
  if job.startswith("projects/"):
    if not region_of(job) or collection_of(job) not in JOB_COLLECTIONS:
      raise LaunchError(f"--job={job!r} is not a job's resource name: projects/P/locations/R/"
                        f"customJobs/ID, .../batchPredictionJobs/ID or "
                        f".../{TUNING_JOBS}/ID")
    return job
  if not job.isdigit():
    raise LaunchError(f"--job={job!r} is neither a job's resource name "
                      f"(projects/P/locations/R/{kind}/ID) nor a custom job's numeric ID")
  if not project:
    raise LaunchError(f"--job={job} is an ID: give --project too, or the full resource name")
  return f"projects/{project}/locations/{region}/{kind}/{job}"


def submit_tuning_job(client, parent: str, tuning_job):
  """Creates `tuning_job` (a HyperparameterTuningJob) under `parent`; returns the created job.
  Never retried, as `submit`."""
  return client.create_hyperparameter_tuning_job(parent=parent,
                                                 hyperparameter_tuning_job=tuning_job)


def tuning_summary(job) -> List[str]:
  """How the ended tuning `job` went, a line each: its best trial (parameters, metric, output
  directory), the trainer arguments that train its settings again, then every trial's state."""
  metric_spec = job.study_spec.metrics[0]
  kinds = {spec.parameter_id: _parameter_kind(spec) for spec in job.study_spec.parameters}
  return _best_trial_lines(job, metric_spec, kinds) + [
      _trial_line(trial, metric_spec.metric_id, kinds) for trial in job.trials]


def _best_trial_lines(job, metric_spec, kinds) -> List[str]:
  """The trial whose final measurement is best by the study's goal, with its output directory
  (BASE_OUTPUT_DIR/<trial id>/model/) and the trainer arguments that train its settings again;
  or that no trial has one."""
  metric = metric_spec.metric_id
  measured = [(trial, _final_value(trial, metric)) for trial in job.trials]
  measured = [(trial, value) for trial, value in measured if value is not None]
  if not measured:
    return [f"no trial reported {metric}: see each trial's state below"]
  best_of = max if metric_spec.goal.name == "MAXIMIZE" else min
  best, value = best_of(measured, key=lambda pair: pair[1])
  base = job.trial_job_spec.base_output_directory.output_uri_prefix.rstrip("/")
  fixed = [arg for arg in job.trial_job_spec.worker_pool_specs[0].container_spec.args
           if not arg.startswith(f"--{TUNING_METRIC_FLAG}=")]  # Only trials report.
  searched = _arguments(best, kinds)
  return [f"best trial {best.id}: {metric} {value:.6g} at step "
          f"{best.final_measurement.step_count}, {' '.join(searched)}; outputs "
          f"{base}/{best.id}/model/",
          "train its settings again: python -m launch.vertex train [flags] -- "
          + shlex.join([*fixed, *searched])]


def _parameter_kind(spec) -> str:
  """Which value spec a study's ParameterSpec has: double, integer, discrete or categorical."""
  return next(kind for kind in ("double", "integer", "discrete", "categorical")
              if f"{kind}_value_spec" in spec)


def _final_value(trial, metric: str) -> Optional[float]:
  """The trial's final `metric`, or None where it has no final measurement of it."""
  return next((m.value for m in trial.final_measurement.metrics if m.metric_id == metric), None)


def _arguments(trial, kinds) -> List[str]:
  """The trial's parameters as the trainer arguments Vertex AI gave it: --NAME=VALUE each."""
  def value(parameter):
    if kinds.get(parameter.parameter_id) == "integer":
      return str(int(parameter.value))
    return repr(parameter.value) if isinstance(parameter.value, float) else str(parameter.value)
  return [f"--{p.parameter_id}={value(p)}" for p in trial.parameters]


def _trial_line(trial, metric: str, kinds) -> str:
  """One trial: its state, its final metric and step where it has them, its parameters and
  why it was infeasible, if it was."""
  parts = [trial.state.name]
  value = _final_value(trial, metric)
  if value is not None:
    parts.append(f"{metric} {value:.6g} at step {trial.final_measurement.step_count}")
  parts.append(" ".join(_arguments(trial, kinds)))
  reason = f": {trial.infeasible_reason}" if trial.infeasible_reason else ""
  return f"trial {trial.id}: {', '.join(part for part in parts if part)}{reason}"


def check_wait_seconds(poll_seconds: float, retry_seconds: float) -> None:
  """Raises LaunchError unless `wait`'s two times are above 0 (NaN is not): a zero or negative
  deadline would give up at the first outage. The command line calls it before sending
  anything, `wait` for every other caller."""
  for name, seconds in (("poll_seconds", poll_seconds), ("retry_seconds", retry_seconds)):
    if not seconds > 0:
      raise LaunchError(f"--{name}={seconds} must be more than 0")


def follow(get: Callable, name: str, link: str, poll_seconds: float,
           say: Callable[[str], None] = functools.partial(print, flush=True),
           retry_seconds: float = UNAVAILABLE_RETRY_SECONDS):
  """Polls the job `name` with `get` (e.g. a JobServiceClient's get_custom_job) until it ends,
  and returns it as it ended; says each state it enters, with the time and `link`, then the
  error of a job that failed.

  Transient failures (UNAVAILABLE, a poll past POLL_TIMEOUT_SECONDS) are retried with
  exponential backoff for `retry_seconds`, then raise `google.api_core.exceptions.RetryError`:
  the job goes on whether or not this process can reach the API. The first poll is not
  retried: a wrong endpoint shows at once.
  """
  from google.api_core import retry

  def on_error(error):
    say(f"{_now()} Vertex AI unavailable ({error.message}); retrying")

  check_wait_seconds(poll_seconds, retry_seconds)
  patient = retry.Retry(predicate=is_transient, initial=poll_seconds,
                        maximum=max(poll_seconds, 60.0), multiplier=2.0, timeout=retry_seconds,
                        on_error=on_error)
  state = None
  while True:
    job = get(name=name, retry=patient if state is not None else None,
              timeout=POLL_TIMEOUT_SECONDS)
    if job.state != state:
      state = job.state
      say(f"{_now()} {state.name} {link}".rstrip())
    if state.name in ENDED_EXIT_CODES:
      if job.error.message:
        say(f"the job's error: {job.error.message}")
      for failure in getattr(job, "partial_failures", ())[:5]:  # Batch prediction only.
        say(f"a partial failure: {failure.message}")
      return job
    time.sleep(poll_seconds)


def exit_code(job) -> int:
  """The exit code for how the ended `job` ended: 0 succeeded (or, a batch job, partly
  succeeded), FAILED_EXIT_CODE failed or expired, CANCELLED_EXIT_CODE cancelled."""
  return ENDED_EXIT_CODES[job.state.name]


def wait(get: Callable, name: str, link: str, poll_seconds: float,
         say: Callable[[str], None] = functools.partial(print, flush=True),
         retry_seconds: float = UNAVAILABLE_RETRY_SECONDS) -> int:
  """Follows the job `name` to its end (`follow`); returns the exit code for how it ended
  (`exit_code`)."""
  return exit_code(follow(get, name, link, poll_seconds, say, retry_seconds))


def wait_resubmitting(follow_job: Callable, submit_job: Callable, job, resubmit: int,
                      say: Callable[[str], None] = functools.partial(print, flush=True)) -> int:
  """Follows the custom job `job` to its end with `follow_job` (a job's name -> the job as it
  ended, or None where following stopped); while it ended by preemption or lack of capacity
  (`resubmission`) and fewer than `resubmit` jobs were resubmitted, submits its spec again as a
  new job with `submit_job` (parent, custom job -> the created job) and follows that. Says each
  decision in one line, with its reason. Returns the exit code of the last job's end, or
  INTERRUPTED_EXIT_CODE where following stopped."""
  resubmitted = 0
  while True:
    ended = follow_job(job.name)
    if ended is None:
      return INTERRUPTED_EXIT_CODE
    code = exit_code(ended)
    if code == 0 or not resubmit:
      return code
    again, reason = resubmission(ended)
    if again and resubmitted == resubmit:
      again, reason = False, f"{reason}; resubmitted {resubmitted} times already (--resubmit)"
    say(f"{'resubmitting' if again else 'not resubmitting'}: {reason}")
    if not again:
      return code
    resubmitted += 1
    job = submit_job(parent_of(ended.name), resubmitted_job(ended))


def resubmission(job) -> Tuple[bool, str]:
  """Whether the custom job `job` is to be submitted again, by the rule above CAPACITY_CODES,
  and why or why not, in words that finish "resubmitting: " or "not resubmitting: "."""
  from google.rpc import code_pb2
  state = job.state.name
  if state not in ENDED_EXIT_CODES:
    return False, f"the job has not ended ({state}): follow it with wait"
  if state == "JOB_STATE_SUCCEEDED":
    return False, "the job succeeded: there is nothing to resume"
  if state == "JOB_STATE_CANCELLED":
    return False, "the job was cancelled"
  code = (code_pb2.Code.Name(job.error.code) if job.error.code in code_pb2.Code.values()
          else str(job.error.code))
  error = f"{code}: {job.error.message}"
  statuses = {int(status) for status in REPLICA_EXIT_STATUS.findall(job.error.message)}
  if code == "DEADLINE_EXCEEDED" or _ran_out_its_timeout(job):
    return False, f"the job ran out its --timeout ({error})"
  if BAD_INPUT_EXIT_CODE in statuses:
    return False, (f"the trainer's own error, exit code {BAD_INPUT_EXIT_CODE}: bad input or a "
                   f"refused restart, which would fail again the same way ({error})")
  if code in CAPACITY_CODES:
    return True, f"{CAPACITY_CODES[code]} ({error})"
  if any(word in job.error.message.lower() for word in PREEMPTION_WORDS):
    return True, f"preemption ({error})"
  if PREEMPTED_EXIT_CODE in statuses:
    return True, (f"preemption: the trainer saved on SIGTERM and exited {PREEMPTED_EXIT_CODE} "
                  f"({error})")
  return False, f"neither preemption nor lack of capacity ({error})"


def _ran_out_its_timeout(job) -> bool:
  """Whether `job` ran for as long as its scheduling's timeout, whatever its error says."""
  scheduling = job.job_spec.scheduling
  if "timeout" not in scheduling or not (job.start_time and job.end_time):
    return False
  return job.end_time - job.start_time >= scheduling.timeout


def resubmitted_job(job):
  """A new custom job with `job`'s spec (image, arguments, machines, scheduling, base output
  directory, service account...), display name, labels and encryption; nothing of what Vertex
  AI filled in (name, state, times, error)."""
  from google.cloud.aiplatform_v1 import types
  new = types.CustomJob(display_name=job.display_name, job_spec=job.job_spec,
                        labels=dict(job.labels))
  if "encryption_spec" in job:
    new.encryption_spec = job.encryption_spec
  return new


def parent_of(name: str) -> str:
  """The project and region (projects/P/locations/R) of a resource name."""
  return "/".join(name.split("/")[:4])


def _now() -> str:
  return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")


def check_finished(model_dir: str) -> dict:
  """The metrics of the finished job whose --model_dir is `model_dir` (any path tf.io.gfile
  reads, gs:// included); LaunchError where the job has not finished or exported."""
  import json
  import tensorflow as tf  # Only upload needs it: for gs:// paths.
  run = run_directory.of(model_dir)
  try:
    text = _finished_metrics_text(tf, run)
  except tf.errors.OpError as e:
    raise LaunchError(f"cannot read {model_dir}: {first_line(e.message)}; check the path and "
                      "that these credentials may read it (gcloud storage ls "
                      f"{model_dir})") from None
  try:
    metrics = json.loads(text)
  except ValueError as e:
    metrics = e
  if not isinstance(metrics, dict):
    problem = metrics if isinstance(metrics, ValueError) else "not an object"
    raise LaunchError(f"{run.metrics} is not the JSON a finished job writes ({problem}): give "
                      "the --model_dir of a finished job")
  return metrics


def _finished_metrics_text(tf, run: run_directory.RunDirectory) -> str:
  """The text of a finished run's metrics.json; LaunchError where the run has no such file,
  or no export."""
  if not tf.io.gfile.exists(run.metrics):
    raise LaunchError(f"no {run.metrics}: the job has not finished (it writes metrics.json "
                      "last); wait for it, or give the --model_dir of a finished job")
  if not tf.io.gfile.exists(run.saved_model):
    raise LaunchError(f"no SavedModel in {run.export}: give the --model_dir of a finished job, "
                      "with its export/ directory")
  with tf.io.gfile.GFile(run.metrics) as f:
    return f.read()


def model_for(model_dir: str, display_name: str, serving_image: str, metrics: dict):
  """The Model Registry entry for the export under `model_dir`, served by `serving_image`."""
  from google.cloud.aiplatform_v1 import types
  description = ""
  if isinstance(metrics.get("test_accuracy"), float) and isinstance(
      metrics.get("test_reconstruction_mse"), float):
    description = (f"test accuracy {metrics['test_accuracy']:.4f}, reconstruction MSE "
                   f"{metrics['test_reconstruction_mse']:.4f}")
  return types.Model(display_name=display_name, description=description,
                     artifact_uri=run_directory.of(model_dir).export,
                     container_spec=types.ModelContainerSpec(image_uri=serving_image))


def upload(client, parent: str, model, timeout: float = 1800.0,
           say: Callable[[str], None] = functools.partial(print, flush=True)) -> str:
  """Registers `model` under `parent`; says the operation's name, waits for it; returns the
  model's name."""
  import concurrent.futures
  operation = client.upload_model(parent=parent, model=model)
  say(f"registering: operation {operation.operation.name}")
  try:
    return operation.result(timeout=timeout).model
  except concurrent.futures.TimeoutError:
    raise LaunchError(f"still registering after {timeout:.0f} s: see operation "
                      f"{operation.operation.name} in the console's Model Registry") from None


def batch_prediction_job(model: str, instances: str, output_dir: str, machine_type: str,
                         replica_count: int, display_name: str):
  """A batch prediction job of `model` over the JSON lines at `instances` (gs://, one image per
  line, see launch.batch_input), writing its predictions under `output_dir`."""
  from google.cloud.aiplatform_v1 import types
  if replica_count < 1:
    raise LaunchError(f"--replica_count={replica_count} must be 1 or more")
  if not region_of(model) or collection_of(model) != "models":
    raise LaunchError(f"--model={model!r} is not a model's resource name "
                      "(projects/P/locations/R/models/ID, as upload prints it)")
  for flag, path in (("--instances", instances), ("--output_dir", output_dir)):
    if not path.startswith("gs://"):
      raise LaunchError(f"{flag}={path!r} must be a gs:// path: Vertex AI reads and writes "
                        "batch predictions in Cloud Storage")
  job = types.BatchPredictionJob
  return job(display_name=display_name, model=model,
             input_config=job.InputConfig(instances_format="jsonl",
                                          gcs_source=types.GcsSource(uris=[instances])),
             output_config=job.OutputConfig(
                 predictions_format="jsonl",
                 gcs_destination=types.GcsDestination(output_uri_prefix=output_dir)),
             dedicated_resources=types.BatchDedicatedResources(
                 machine_spec=types.MachineSpec(machine_type=machine_type),
                 starting_replica_count=1, max_replica_count=replica_count))


def explain(error: Exception, endpoint: str, region: str) -> Optional[str]:
  """One line saying what went wrong in a call to Vertex AI and what to do; None for an error
  that is not the API's or google-auth's (a defect, which should show its traceback)."""
  from google.api_core import exceptions
  from google.auth import exceptions as auth_exceptions
  if isinstance(error, auth_exceptions.DefaultCredentialsError):
    return ("no Google Cloud credentials found: run `gcloud auth application-default login` "
            "(or set GOOGLE_APPLICATION_CREDENTIALS to a service account's key file)")
  if isinstance(error, exceptions.RetryError) and error.cause is not None:
    error = error.cause  # UNAVAILABLE for longer than the retries wait.
  if not isinstance(error, exceptions.GoogleAPICallError):
    return None
  status = error.grpc_status_code.name if error.grpc_status_code else str(error.code)
  said = f"{endpoint} answered {status}: {error.message}"
  if isinstance(error, exceptions.Unauthenticated):
    return (f"{said}; the credentials were refused: run `gcloud auth application-default login` "
            "again")
  if isinstance(error, exceptions.PermissionDenied):
    return (f"{said}; the account needs the Vertex AI User role (roles/aiplatform.user) on the "
            "project, and the Vertex AI API enabled")
  if isinstance(error, exceptions.NotFound):
    return f"{said}; check --project, and that --region={region} is a Vertex AI region"
  if isinstance(error, exceptions.InvalidArgument):
    return f"{said}; Vertex AI refused the request as it is: fix what it names"
  if CREDENTIALS_REFRESH_FAILED in str(error.message):
    return (f"the credentials could not be refreshed ({error.message}): run `gcloud auth "
            "application-default login` again")
  if isinstance(error, exceptions.ServiceUnavailable):
    return (f"cannot reach Vertex AI at {endpoint} ({error.message}): check the network, and "
            f"--region={region} or --api_endpoint")
  return said
