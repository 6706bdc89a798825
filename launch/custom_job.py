"""The Vertex AI CustomJob that trains the package: what runs where, checked before it is sent.

`JobSpec` holds the machine, its GPUs or TPU, the replicas, how they are scheduled (Spot,
flex-start, a time limit) and whom the job runs as; `build_custom_job` turns it into the API's
`CustomJob` with its worker pools, from which Vertex AI writes each replica's `TF_CONFIG` (pool 0
the chief, pool 1 the other workers), and the base output directory, from which Vertex AI sets
`AIP_MODEL_DIR`, `AIP_CHECKPOINT_DIR` and `AIP_TENSORBOARD_LOG_DIR`.
"""

import dataclasses
import datetime
import re
from typing import Sequence

# Cloud TPU v2 and v3 come as a "cloud-tpu" machine with 8 cores; a v5e slice is a
# ct5lp-hightpu-{1,4,8}t machine with its chip topology and no accelerator fields.
TPU_V2_V3 = ("TPU_V2", "TPU_V3")
TPU_V5E_TOPOLOGIES = {"ct5lp-hightpu-1t": "1x1", "ct5lp-hightpu-4t": "2x2",
                      "ct5lp-hightpu-8t": "2x4"}
# --scheduling's choices: Scheduling.Strategy's names, in lower case.
SCHEDULING_STRATEGIES = ("standard", "spot", "flex_start")
# A duration as gcloud writes one: 90m, 12h, 1h30m, 2d.
DURATION = re.compile(r"(?:\d+(?:\.\d+)?[dhms])+")
DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)([dhms])")
UNIT_SECONDS = {"d": 86400, "h": 3600, "m": 60, "s": 1}
TENSORBOARD_NAME = re.compile(r"projects/[^/]+/locations/[^/]+/tensorboards/[^/]+")


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
  scheduling: str = "standard"
  timeout: str = ""  # A duration (see DURATION); "" for Vertex AI's, 7 days.
  max_wait: str = ""  # flex_start only; "" for Vertex AI's, 24 hours.
  service_account: str = ""
  tensorboard: str = ""

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
    self._check_scheduling()
    self._check_identity()

  def _check_scheduling(self):
    """Refuses a strategy, a duration or a --max_wait that Vertex AI would refuse or ignore."""
    if self.scheduling not in SCHEDULING_STRATEGIES:
      raise LaunchError(f"unknown --scheduling={self.scheduling}: choose one of "
                        f"{', '.join(SCHEDULING_STRATEGIES)}")
    if self.timeout and parse_duration("timeout", self.timeout) <= datetime.timedelta(0):
      raise LaunchError(f"--timeout={self.timeout} must be more than 0")
    if self.max_wait:
      parse_duration("max_wait", self.max_wait)
      if self.scheduling != "flex_start":
        raise LaunchError(f"--max_wait={self.max_wait} is for --scheduling=flex_start only: it "
                          "bounds how long a flex-start job waits for its machines")

  def _check_identity(self):
    """Refuses a service account or TensorBoard instance that cannot be one, and a TensorBoard
    instance without a service account."""
    if self.service_account and "@" not in self.service_account:
      raise LaunchError(f"--service_account={self.service_account!r} is not a service account's "
                        "email: NAME@PROJECT.iam.gserviceaccount.com")
    if not self.tensorboard:
      return
    if not TENSORBOARD_NAME.fullmatch(self.tensorboard):
      raise LaunchError(f"--tensorboard={self.tensorboard!r} is not a TensorBoard instance's "
                        "resource name: projects/P/locations/R/tensorboards/ID")
    if not self.service_account:
      # Vertex AI uploads the job's logs to the instance with the job's own credentials, and
      # its default identity may not write there.
      raise LaunchError("--tensorboard needs --service_account: Vertex AI writes to a TensorBoard "
                        "instance only as a service account you give (one with the Vertex AI User "
                        "role and write access to --base_output_dir)")

  @property
  def is_tpu(self) -> bool:
    return self.accelerator_type in TPU_V2_V3 or self.machine_type.startswith("ct5lp-")

  @property
  def topology(self) -> str:
    """The TPU v5e topology: the one given, else the only one the machine type has."""
    return self.tpu_topology or TPU_V5E_TOPOLOGIES.get(self.machine_type, "")


def parse_duration(flag: str, text: str) -> datetime.timedelta:
  """`text`, a duration as gcloud writes one (90m, 12h, 1h30m, 2d, 0s), as a timedelta; a
  LaunchError naming --`flag` for anything else (a bare number's unit would be a guess)."""
  if not DURATION.fullmatch(text):
    raise LaunchError(f"--{flag}={text} is not a duration: write it as 90m, 12h, 1h30m or 2d")
  return datetime.timedelta(seconds=sum(float(number) * UNIT_SECONDS[unit]
                                        for number, unit in DURATION_PART.findall(text)))


def _scheduling(spec: JobSpec):
  """The job's `Scheduling`: its strategy, always said, and the limits that were given."""
  from google.cloud.aiplatform_v1 import types
  scheduling = types.Scheduling(strategy=types.Scheduling.Strategy[spec.scheduling.upper()])
  if spec.replica_count > 1:
    # One worker's restart invalidates every worker's collectives: restart them all, and the
    # trainer resumes from its latest checkpoint.
    scheduling.restart_job_on_worker_restart = True
  if spec.timeout:
    scheduling.timeout = parse_duration("timeout", spec.timeout)
  if spec.max_wait:
    scheduling.max_wait_duration = parse_duration("max_wait", spec.max_wait)
  return scheduling


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
      base_output_directory=types.GcsDestination(output_uri_prefix=spec.base_output_dir),
      scheduling=_scheduling(spec), service_account=spec.service_account,
      tensorboard=spec.tensorboard)
  return types.CustomJob(display_name=spec.display_name, job_spec=job_spec)
