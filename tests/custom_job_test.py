"""Tests of launch.custom_job: the CustomJob requests, checked field by field, offline."""

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
])
def test_requests_that_cannot_work_are_refused(changes, message):
  settings = dict(image_uri=IMAGE, base_output_dir=OUTPUT)
  settings.update(changes)
  with pytest.raises(custom_job.LaunchError, match=message):
    custom_job.build_custom_job(custom_job.JobSpec(**settings))
