"""The Vertex AI CustomJob that trains the package: what runs where, checked before it is sent.

`JobSpec` holds the machine, its GPUs or TPU, and the replicas; `build_custom_job` turns it into
the API's `CustomJob` with its worker pools, from which Vertex AI writes each replica's
`TF_CONFIG` (pool 0 the chief, pool 1 the other workers), and the base output directory, from
which Vertex AI sets `AIP_MODEL_DIR`, `AIP_CHECKPOINT_DIR` and `AIP_TENSORBOARD_LOG_DIR`.
"""

import dataclasses
from typing import Sequence

# Cloud TPU v2 and v3 come as a "cloud-tpu" machine with 8 cores; a v5e slice is a
# ct5lp-hightpu-{1,4,8}t machine with its chip topology and no accelerator fields.
TPU_V2_V3 = ("TPU_V2", "TPU_V3")
TPU_V5E_TOPOLOGIES = {"ct5lp-hightpu-1t": "1x1", "ct5lp-hightpu-4t": "2x2",
                      "ct5lp-hightpu-8t": "2x4"}


class LaunchError(ValueError):
  """A launch request that cannot work: the message names the problem and the fix."""


@dataclasses.dataclass(frozen=True)
class JobSpec:
  """What to run where: everything a CustomJob needs, validated on construction."""

  image_uri: str
  base_output_dir: str
  machine_type: str = "n1-standard-4"
  accelerator_type: str = ""
  accelerator_count: int = 0
  tpu_topology: str = ""
  replica_count: int = 1
  trainer_args: Sequence[str] = ()
  display_name: str = "mnist-multitask"

  def __post_init__(self):
    if not self.image_uri:
      raise LaunchError("no --image_uri: give the trainer's container image (see the Dockerfile)")
    if not self.base_output_dir.startswith("gs://"):
      raise LaunchError(f"--base_output_dir={self.base_output_dir!r} must be a gs:// path: "
                        "every replica writes and reads it")
    if self.replica_count < 1:
      raise LaunchError(f"--replica_count={self.replica_count} must be 1 or more")
    if self.accelerator_count < 0 or bool(self.accelerator_type) != (self.accelerator_count > 0):
      raise LaunchError("give --accelerator_type and a positive --accelerator_count together, "
                        "or neither")
    if self.is_tpu and self.replica_count != 1:
      raise LaunchError(f"--replica_count={self.replica_count}: a TPU job runs on one replica "
                        "(the TPU slice holds the parallelism)")
    if self.accelerator_type in TPU_V2_V3 and (self.machine_type != "cloud-tpu"
                                               or self.accelerator_count != 8):
      raise LaunchError(f"{self.accelerator_type} needs --machine_type=cloud-tpu and "
                        "--accelerator_count=8")
    if self.machine_type.startswith("ct5lp-"):
      if self.machine_type not in TPU_V5E_TOPOLOGIES:
        raise LaunchError(f"unknown TPU v5e --machine_type={self.machine_type}: choose one of "
                          f"{', '.join(TPU_V5E_TOPOLOGIES)}")
      if self.accelerator_type:
        raise LaunchError("a TPU v5e machine carries its chips: drop --accelerator_type and "
                          "--accelerator_count")

  @property
  def is_tpu(self) -> bool:
    return self.accelerator_type in TPU_V2_V3 or self.machine_type.startswith("ct5lp-")

  @property
  def topology(self) -> str:
    """The TPU v5e topology: the one given, else the only one the machine type has."""
    return self.tpu_topology or TPU_V5E_TOPOLOGIES.get(self.machine_type, "")


def build_custom_job(spec: JobSpec):
  """The `aiplatform_v1.types.CustomJob` for `spec`."""
  from google.cloud.aiplatform_v1 import types  # The vertex extra: only the launcher needs it.

  machine = types.MachineSpec(machine_type=spec.machine_type)
  if spec.accelerator_type:
    if spec.accelerator_type not in types.AcceleratorType.__members__:
      raise LaunchError(f"unknown --accelerator_type={spec.accelerator_type}: use Vertex AI's "
                        "name, e.g. NVIDIA_TESLA_T4, NVIDIA_L4 or TPU_V3")
    machine.accelerator_type = types.AcceleratorType[spec.accelerator_type]
    machine.accelerator_count = spec.accelerator_count
  if spec.topology:
    machine.tpu_topology = spec.topology
  container = types.ContainerSpec(image_uri=spec.image_uri, args=list(spec.trainer_args))

  def pool(replicas: int):
    return types.WorkerPoolSpec(machine_spec=machine, replica_count=replicas,
                                container_spec=container)

  # Pool 0 is the chief (Vertex AI allows it one replica); pool 1 holds the other workers.
  pools = [pool(1)] + ([pool(spec.replica_count - 1)] if spec.replica_count > 1 else [])
  job_spec = types.CustomJobSpec(
      worker_pool_specs=pools,
      base_output_directory=types.GcsDestination(output_uri_prefix=spec.base_output_dir))
  if spec.replica_count > 1:
    # One worker's restart invalidates every worker's collectives: restart them all, and the
    # trainer resumes from its latest checkpoint.
    job_spec.scheduling = types.Scheduling(restart_job_on_worker_restart=True)
  return types.CustomJob(display_name=spec.display_name, job_spec=job_spec)
