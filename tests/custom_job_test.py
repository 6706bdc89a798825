"""Tests of launch.custom_job: the CustomJob requests, checked field by field, offline."""

import datetime
import json

import pytest
from google.cloud.aiplatform_v1 import types

from launch import custom_job, vertex_api

IMAGE = "us-docker.pkg.dev/PROJECT/trainer/mnist:1"
OUTPUT = "gs://BUCKET/run"


def _request(**changes):
  """The dry-run JSON of a job, read back through the Vertex AI schema."""
  spec = custom_job.JobSpec(image_uri=IMAGE, base_output_dir=OUTPUT, trainer_args=("--epochs=3",),
                        **changes)
  text = vertex_api.to_json(custom_job.build_custom_job(spec))
  # from_json refuses any field the CustomJob schema does not have.
  job = types.CustomJob.from_json(text)
  return json.loads(text), job


def _check_pool(pool, machine_type, replicas, accelerator=None, count=0, topology=""):
  assert pool.machine_spec.machine_type == machine_type
  assert pool.replica_count == replicas
  assert pool.machine_spec.accelerator_type == (
      types.AcceleratorType[accelerator] if accelerator else
      types.AcceleratorType.ACCELERATOR_TYPE_UNSPECIFIED)
  assert pool.machine_spec.accelerator_count == count
  assert pool.machine_spec.tpu_topology == topology
  assert pool.container_spec.image_uri == IMAGE
  assert list(pool.container_spec.args) == ["--epochs=3"]  # Passed through untouched.


def _check_outputs(job):
  assert job.job_spec.base_output_directory.output_uri_prefix == OUTPUT
  assert job.display_name == "mnist-multitask"


def test_one_cpu_replica():
  raw, job = _request(machine_type="n1-standard-4")
  (pool,) = job.job_spec.worker_pool_specs
  _check_pool(pool, "n1-standard-4", 1)
  _check_outputs(job)
  assert not job.job_spec.scheduling.restart_job_on_worker_restart
  assert "acceleratorType" not in raw["jobSpec"]["workerPoolSpecs"][0]["machineSpec"]


def test_one_machine_with_four_gpus():
  raw, job = _request(machine_type="n1-standard-16", accelerator_type="NVIDIA_TESLA_T4",
                      accelerator_count=4)
  (pool,) = job.job_spec.worker_pool_specs
  _check_pool(pool, "n1-standard-16", 1, "NVIDIA_TESLA_T4", 4)
  _check_outputs(job)
  assert raw["jobSpec"]["workerPoolSpecs"][0]["machineSpec"]["acceleratorType"] == "NVIDIA_TESLA_T4"


def test_four_replicas_with_two_gpus_each_are_a_chief_and_three_workers():
  raw, job = _request(machine_type="n1-standard-8", accelerator_type="NVIDIA_TESLA_T4",
                      accelerator_count=2, replica_count=4)
  chief, workers = job.job_spec.worker_pool_specs
  _check_pool(chief, "n1-standard-8", 1, "NVIDIA_TESLA_T4", 2)
  _check_pool(workers, "n1-standard-8", 3, "NVIDIA_TESLA_T4", 2)
  _check_outputs(job)
  assert job.job_spec.scheduling.restart_job_on_worker_restart
  assert [p["replicaCount"] for p in raw["jobSpec"]["workerPoolSpecs"]] == ["1", "3"]


def test_a_spot_job_with_a_time_limit_a_service_account_and_a_tensorboard_instance():
  raw, job = _request(scheduling="spot", timeout="1h30m",
                      service_account="trainer@p.iam.gserviceaccount.com",
                      tensorboard="projects/p/locations/us-central1/tensorboards/7")
  scheduling = job.job_spec.scheduling
  assert scheduling.strategy == types.Scheduling.Strategy.SPOT
  assert scheduling.timeout == datetime.timedelta(hours=1, minutes=30)
  assert "max_wait_duration" not in scheduling  # Vertex AI's default: for flex-start only.
  assert not scheduling.restart_job_on_worker_restart
  assert job.job_spec.service_account == "trainer@p.iam.gserviceaccount.com"
  assert job.job_spec.tensorboard == "projects/p/locations/us-central1/tensorboards/7"
  assert raw["jobSpec"]["scheduling"] == {"strategy": "SPOT", "timeout": "5400s"}
  _check_pool(job.job_spec.worker_pool_specs[0], "n1-standard-4", 1)
  _check_outputs(job)


@pytest.mark.parametrize("max_wait, seconds", [("2h", 7200), ("0s", 0)])  # 0: without limit.
def test_a_flex_start_job_waits_at_most_max_wait(max_wait, seconds):
  raw, job = _request(scheduling="flex_start", max_wait=max_wait)
  assert job.job_spec.scheduling.strategy == types.Scheduling.Strategy.FLEX_START
  assert job.job_spec.scheduling.max_wait_duration == datetime.timedelta(seconds=seconds)
  assert raw["jobSpec"]["scheduling"] == {"strategy": "FLEX_START",
                                          "maxWaitDuration": f"{seconds}s"}
  assert "serviceAccount" not in raw["jobSpec"] and "tensorboard" not in raw["jobSpec"]


def test_standard_scheduling_is_said_and_keeps_restarting_every_worker_together():
  raw, job = _request(replica_count=2)
  assert raw["jobSpec"]["scheduling"] == {"strategy": "STANDARD",
                                          "restartJobOnWorkerRestart": True}


@pytest.mark.parametrize("text, seconds", [("90m", 5400), ("1h30m", 5400), ("1.5h", 5400),
                                           ("2d", 172800), ("45s", 45)])
def test_durations_are_written_as_gcloud_writes_them(text, seconds):
  assert custom_job.parse_duration("timeout", text) == datetime.timedelta(seconds=seconds)


def test_tpu_v5e_2x2():
  raw, job = _request(machine_type="ct5lp-hightpu-4t", tpu_topology="2x2")
  (pool,) = job.job_spec.worker_pool_specs
  _check_pool(pool, "ct5lp-hightpu-4t", 1, topology="2x2")
  _check_outputs(job)
  assert raw["jobSpec"]["workerPoolSpecs"][0]["machineSpec"] == {
      "machineType": "ct5lp-hightpu-4t", "tpuTopology": "2x2"}


def test_tpu_v3_is_a_cloud_tpu_machine_with_eight_cores():
  _, job = _request(machine_type="cloud-tpu", accelerator_type="TPU_V3", accelerator_count=8)
  _check_pool(job.job_spec.worker_pool_specs[0], "cloud-tpu", 1, "TPU_V3", 8)


@pytest.mark.parametrize("changes, message", [
    (dict(accelerator_type="NVIDIA_TESLA_T4"), "together, or neither"),
    (dict(accelerator_type="NVIDIA_T4", accelerator_count=1), "unknown --accelerator_type=NVIDIA_T4"),
    (dict(machine_type="ct5lp-hightpu-4t", replica_count=2), "a TPU job runs on one replica"),
    (dict(machine_type="n1-standard-8", accelerator_type="TPU_V3", accelerator_count=8),
     "TPU_V3 needs --machine_type=cloud-tpu"),
    (dict(machine_type="ct5lp-hightpu-3t"), "unknown TPU v5e --machine_type"),
    (dict(base_output_dir="/tmp/run"), "must be a gs:// path"),
    (dict(scheduling="cheap"), "unknown --scheduling=cheap: choose one of standard, spot, "
     "flex_start"),
    (dict(timeout="12"), r"--timeout=12 is not a duration: write it as 90m, 12h, 1h30m or 2d"),
    (dict(timeout="0m"), r"--timeout=0m must be more than 0"),
    (dict(scheduling="spot", max_wait="2h"), r"--max_wait=2h is for --scheduling=flex_start "
     "only: it bounds how long a flex-start job waits for its machines"),
    (dict(scheduling="flex_start", max_wait="-1h"), r"--max_wait=-1h is not a duration"),
    (dict(service_account="trainer"), r"--service_account='trainer' is not a service account's "
     "email"),
    (dict(tensorboard="projects/p/locations/r/tensorboards/7"), r"--tensorboard needs "
     r"--service_account: Vertex AI writes to a TensorBoard instance only as a service account "
     r"you give \(one with the Vertex AI User role and write access to --base_output_dir\)"),
    (dict(tensorboard="7", service_account="a@p.iam.gserviceaccount.com"),
     r"--tensorboard='7' is not a TensorBoard instance's resource name: "
     "projects/P/locations/R/tensorboards/ID"),
])
def test_requests_that_cannot_work_are_refused(changes, message):
  settings = dict(image_uri=IMAGE, base_output_dir=OUTPUT)
  settings.update(changes)
  with pytest.raises(custom_job.LaunchError, match=message):
    custom_job.build_custom_job(custom_job.JobSpec(**settings))
