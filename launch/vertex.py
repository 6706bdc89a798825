"""Vertex AI custom jobs for the trainer: `python -m launch.vertex [flags] -- [trainer flags]`.

Builds a `CustomJob` with `google-cloud-aiplatform` (the `vertex` extra, imported only here):
the machine, its GPUs or TPU, and the replicas, as the worker pools from which Vertex AI
writes each replica's `TF_CONFIG` (pool 0 the chief, pool 1 the other workers); the container
image; the base output directory, from which Vertex AI sets `AIP_MODEL_DIR`,
`AIP_CHECKPOINT_DIR` and `AIP_TENSORBOARD_LOG_DIR`. Everything after `--` reaches the trainer
untouched. `--dry_run` prints the request as JSON and submits nothing.
"""

import dataclasses
from typing import List, Sequence

from absl import app
from absl import flags

from trainer import cli

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


def to_json(custom_job) -> str:
  """The job as the REST API's JSON: camelCase fields, enum names, defaults left out."""
  return type(custom_job).to_json(custom_job, use_integers_for_enums=False,
                                  always_print_fields_with_no_presence=False, indent=2)


def submit(custom_job, project: str, region: str):
  """Creates the job in Vertex AI; returns its resource name and console link."""
  from google.cloud.aiplatform.utils import console_utils
  from google.cloud.aiplatform_v1.services.job_service import JobServiceClient

  client = JobServiceClient(client_options={"api_endpoint": f"{region}-aiplatform.googleapis.com"})
  created = client.create_custom_job(parent=f"projects/{project}/locations/{region}",
                                     custom_job=custom_job)
  return created.name, console_utils.custom_job_console_uri(created.name)


FLAGS = flags.FLAGS


def _define_flags() -> None:
  """Defined only when run as a program, so that tests may import this module."""
  flags.DEFINE_string("project", "", "Google Cloud project (not needed with --dry_run).")
  flags.DEFINE_string("region", "us-central1", "Vertex AI region.")
  flags.DEFINE_string("image_uri", "", "The trainer's container image.")
  flags.DEFINE_string("machine_type", JobSpec.machine_type,
                      "Machine of every replica: n1-standard-8, a2-highgpu-1g, cloud-tpu, "
                      "ct5lp-hightpu-4t, ...")
  flags.DEFINE_string("accelerator_type", "",
                      "GPU or TPU v2/v3 type, as Vertex AI names it: NVIDIA_TESLA_T4, "
                      "NVIDIA_L4, TPU_V3, ... Empty for CPU and for TPU v5e machines.")
  flags.DEFINE_integer("accelerator_count", 0, "Accelerators per replica (8 for TPU v2/v3).")
  flags.DEFINE_string("tpu_topology", "", "TPU v5e topology, e.g. 2x2; defaults to the machine's.")
  flags.DEFINE_integer("replica_count", 1, "Replicas: the chief plus replica_count - 1 workers.")
  flags.DEFINE_string("base_output_dir", "", "gs:// directory for the model, checkpoints, logs.")
  flags.DEFINE_string("display_name", JobSpec.display_name, "The job's name in the console.")
  flags.DEFINE_bool("dry_run", False, "Print the job request as JSON; submit nothing.")


def main(argv: List[str]) -> None:
  try:
    spec = JobSpec(image_uri=FLAGS.image_uri, base_output_dir=FLAGS.base_output_dir,
                   machine_type=FLAGS.machine_type, accelerator_type=FLAGS.accelerator_type,
                   accelerator_count=FLAGS.accelerator_count, tpu_topology=FLAGS.tpu_topology,
                   replica_count=FLAGS.replica_count, trainer_args=tuple(argv[1:]),
                   display_name=FLAGS.display_name)
    if not FLAGS.dry_run and not FLAGS.project:
      raise LaunchError("no --project: give the Google Cloud project to submit to, or --dry_run")
    custom_job = build_custom_job(spec)
  except LaunchError as e:
    cli.fail(str(e))
  except ImportError:
    cli.fail("google-cloud-aiplatform is not installed: pip install '.[vertex]'")
  if FLAGS.dry_run:
    print(to_json(custom_job))
    return
  name, link = submit(custom_job, FLAGS.project, FLAGS.region)
  print(f"submitted {name}\n{link}")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
