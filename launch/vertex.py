"""Vertex AI for the trainer: `python -m launch.vertex [COMMAND] [flags] [-- trainer flags]`.

The command comes first. train, the default, submits a custom job running `python -m
trainer.task` with the flags after `--`, which are checked first as the trainer checks them
(under --dry_run too); with `--wait --resubmit=N` it submits the same job again, up to N times,
when it ends by preemption or lack of capacity (`vertex_api.resubmission` decides), as the
resubmit command does once. tune submits a hyperparameter tuning job whose trials are that
custom job, each given values of the --search settings (`launch.tuning_job`). deploy, predict
and undeploy serve a registered model online, from an endpoint (`launch.endpoints`).
COMMAND_SUMMARIES says what the others do, as `--help` does, and `python -m launch.vertex
COMMAND --help` lists a command's flags. `--dry_run` prints the request as the API's JSON and
sends nothing. Calls go through `launch.vertex_api` (the `vertex` extra, imported only here); a
refused call ends with one `error:` line, and a waited-for job's end sets the exit code (see
the README).
"""

import functools
import shlex
import sys
import textwrap
from typing import Dict, List

from absl import app
from absl import flags

from launch import endpoints
from launch import tuning_job
from launch import vertex_api
from launch.custom_job import SCHEDULING_STRATEGIES, JobSpec, LaunchError, build_custom_job
from trainer import cli, errors
from trainer.config import TUNING_METRICS
from trainer.errors import UserInputError
from trainer.job import run_directory

COMMON_FLAGS = {"project", "region", "api_endpoint"}
# What a custom job of the trainer runs on, and where its outputs go: train's, and each trial's.
TRAINER_JOB_FLAGS = {"image_uri", "machine_type", "accelerator_type", "accelerator_count",
                     "tpu_topology", "replica_count", "base_output_dir", "display_name",
                     "scheduling", "timeout", "max_wait", "service_account", "tensorboard"}
COMMAND_FLAGS = {
    "train": TRAINER_JOB_FLAGS | {"dry_run", "wait", "resubmit", "poll_seconds",
                                  "retry_seconds"},
    "tune": TRAINER_JOB_FLAGS | {"search", "metric", "goal", "max_trials", "parallel_trials",
                                 "max_failed_trials", "algorithm", "early_stopping", "dry_run",
                                 "wait", "poll_seconds", "retry_seconds"},
    "resubmit": {"job", "dry_run", "wait", "resubmit", "poll_seconds", "retry_seconds"},
    "wait": {"job", "poll_seconds", "retry_seconds"},
    "cancel": {"job"},
    "upload": {"model_dir", "display_name", "serving_image", "dry_run"},
    "batch_predict": {"model", "instances", "output_dir", "machine_type", "replica_count",
                      "display_name", "dry_run", "wait", "poll_seconds", "retry_seconds"},
    "deploy": {"model", "model_dir", "serving_image", "endpoint", "machine_type",
               "accelerator_type", "accelerator_count", "min_replicas", "max_replicas", "spot",
               "replace", "display_name", "dry_run"},
    "predict": {"endpoint", "model_dir", "invert", "resize", "key", "dry_run"},
    "undeploy": {"endpoint", "deployed_model", "keep_endpoint", "dry_run"},
}
COMMANDS = tuple(COMMAND_FLAGS)
# The commands that pass the arguments after `--` to the trainer.
TRAINER_COMMANDS = ("train", "tune")
COMMAND_SUMMARIES = {
    "train": "(the default) submit a custom job running `python -m trainer.task` with the flags "
             "after `--`; --wait follows it to its end",
    "tune": "submit a hyperparameter tuning job whose trials run the trainer with the flags "
            "after `--` and values of the --search settings; --wait follows it to its end and "
            "says its best trial",
    "resubmit": "submit a custom job (--job) that ended by preemption or lack of capacity again, "
                "as a new job that resumes from its newest checkpoint",
    "wait": "follow a submitted job (--job) to its end",
    "cancel": "cancel a job (--job)",
    "upload": "register a finished job's export (--model_dir) in the Model Registry",
    "batch_predict": "run a registered model (--model) over JSON lines (--instances)",
    "deploy": "serve a registered model (--model), or a finished run's export (--model_dir, "
              "uploaded first), from an endpoint for online prediction: a new one, or "
              "--endpoint, whose traffic it then takes",
    "predict": "send images (PNG, .npy, .npz) to an endpoint (--endpoint) and print each "
               "answer, with the class names of the run's metrics.json (--model_dir)",
    "undeploy": "take a deployed model off its endpoint (--endpoint), and delete the endpoint "
                "once nothing is deployed on it",
}
# predict's flags come first, then its inputs.
PREDICT_USAGE = "python -m launch.vertex predict --endpoint=ENDPOINT --model_dir=DIR INPUT..."
# Said by the help of train, and of no command.
TRAINER_FLAGS_NOTE = """\
The trainer's flags go after `--`; its --model_dir defaults to BASE_OUTPUT_DIR/model, and
python -m trainer.task --help lists them. For example:
  python -m launch.vertex --image_uri=IMAGE --base_output_dir=gs://BUCKET/run -- --epochs=20"""
# Said by the help of tune.
TUNE_NOTE = """\
Each --search is a trainer setting the trials search, which the trainer flags
after `--` must not fix:
  NAME:double:MIN:MAX[:SCALE]      NAME:integer:MIN:MAX[:SCALE]
  NAME:discrete:V1,V2,...[:SCALE]  NAME:categorical:V1,V2,...
SCALE is linear (the default), log or reverse_log. Each trial writes under
BASE_OUTPUT_DIR/<trial id>/ and reports --metric at every evaluation. For example:
  python -m launch.vertex tune --image_uri=IMAGE --base_output_dir=gs://BUCKET/tune \\
    --search=learning_rate:double:1e-4:1e-2:log --search=decoder_weight:double:1:32:log \\
    --early_stopping=decay_curve -- --dataset=mnist --epochs=10"""

FLAGS = flags.FLAGS


def _define_flags() -> None:
  """Defined only when run as a program, so that tests may import this module."""
  flags.DEFINE_string("project", "", "Google Cloud project (not needed with --dry_run).")
  flags.DEFINE_string("region", "us-central1", "Vertex AI region.")
  flags.DEFINE_string("api_endpoint", "",
                      "Vertex AI's address; default REGION-aiplatform.googleapis.com. Give it "
                      "for a Private Service Connect endpoint. On localhost or 127.0.0.1 it is "
                      "spoken to without TLS or credentials (local emulators).")
  flags.DEFINE_string("image_uri", "", "train, tune: the trainer's container image.")
  flags.DEFINE_string("machine_type", JobSpec.machine_type,
                      "train, tune, batch_predict, deploy: machine of every replica: "
                      "n1-standard-8, a2-highgpu-1g, cloud-tpu, ct5lp-hightpu-4t, ...")
  flags.DEFINE_string("accelerator_type", "",
                      "train, tune, deploy: GPU or TPU v2/v3 type, as Vertex AI names it: "
                      "NVIDIA_TESLA_T4, NVIDIA_L4, TPU_V3, ... Empty for CPU and for TPU v5e "
                      "machines. deploy: a GPU needs a GPU --serving_image.")
  flags.DEFINE_integer("accelerator_count", 0, "train, tune, deploy: accelerators per replica "
                       "(8 for TPU v2/v3).")
  flags.DEFINE_string("tpu_topology", "", "train, tune: TPU v5e topology, e.g. 2x2; default the "
                      "machine's.")
  flags.DEFINE_integer("replica_count", 1, "train, tune: the chief plus replica_count - 1 "
                       "workers; batch_predict: at most this many machines.")
  flags.DEFINE_string("base_output_dir", "",
                      "train: gs:// directory for the job's outputs; the trainer's --model_dir "
                      "is BASE_OUTPUT_DIR/model. tune: each trial's is BASE_OUTPUT_DIR/<trial "
                      "id>/model.")
  flags.DEFINE_string("display_name", "mnist-multitask",
                      "The job's, model's or endpoint's name in the console.")
  flags.DEFINE_enum("scheduling", "standard", list(SCHEDULING_STRATEGIES),
                    "train, tune: which machines: standard (on demand), spot (Spot VMs: far "
                    "cheaper, reclaimed at any time; the trainer saves and resumes) or "
                    "flex_start (Dynamic Workload Scheduler: queued until the machines are "
                    "free).")
  flags.DEFINE_string("timeout", "", "train, tune: the longest the job (a trial) may run, as "
                      "90m, 12h, 1h30m or 2d; default Vertex AI's, 7 days.")
  flags.DEFINE_string("max_wait", "", "train, tune, --scheduling=flex_start only: the longest "
                      "the job waits for its machines (default Vertex AI's, 24h; 0s waits "
                      "without limit).")
  flags.DEFINE_string("service_account", "", "train, tune: the service account the job runs as "
                      "(NAME@PROJECT.iam.gserviceaccount.com); default Vertex AI's own.")
  flags.DEFINE_string("tensorboard", "", "train, tune: a Vertex AI TensorBoard instance "
                      "(projects/P/locations/R/tensorboards/ID) that shows the job's logs as it "
                      "runs; needs --service_account.")
  flags.DEFINE_bool("dry_run", False, "Print the request as JSON; send nothing (upload and "
                    "deploy do not read --model_dir either). deploy, predict, undeploy: each "
                    "request, after a `--- Service.Method` line on standard error; undeploy, and "
                    "deploy with --endpoint, read that endpoint.")
  flags.DEFINE_bool("wait", False, "train, tune, resubmit, batch_predict: follow the job to "
                    "its end; the exit code says how it ended.")
  flags.DEFINE_integer("resubmit", 0, "train, resubmit, with --wait: when the job ends by "
                       "preemption or lack of capacity, submit it again as a new job, which "
                       "resumes from its newest checkpoint; at most this many times.")
  flags.DEFINE_float("poll_seconds", 30.0, "How often --wait asks for the job's state.")
  flags.DEFINE_float("retry_seconds", vertex_api.UNAVAILABLE_RETRY_SECONDS,
                     "How long --wait goes on asking while Vertex AI cannot be reached, before "
                     "it gives up (the job goes on either way).")
  flags.DEFINE_string("job", "", "wait, cancel, resubmit: the job's resource name (a custom, "
                      "batch prediction or tuning job's), or a custom job's numeric ID in "
                      "--project and --region.")
  flags.DEFINE_multi_string("search", [], "tune: a trainer setting the trials search, one "
                            f"--search each: {tuning_job.SEARCH_SYNTAX}; SCALE linear (the "
                            "default), log or reverse_log")
  flags.DEFINE_enum("metric", tuning_job.Study.metric, list(TUNING_METRICS),
                    "tune: what each trial reports at every evaluation, and the study "
                    "optimises: " + ", ".join(f"{metric} (to {goal})"
                                              for metric, goal in TUNING_METRICS.items()) + ".")
  flags.DEFINE_string("goal", "", "tune: maximize or minimize, which must be --metric's own (a "
                      "check for scripts); default --metric's.")
  flags.DEFINE_integer("max_trials", tuning_job.Study.max_trials, "tune: how many trials in all.")
  flags.DEFINE_integer("parallel_trials", tuning_job.Study.parallel_trials,
                       "tune: how many trials run at once (fewer let each learn from more "
                       "finished ones).")
  flags.DEFINE_integer("max_failed_trials", tuning_job.Study.max_failed_trials,
                       "tune: how many trials may fail before the job does; 0: Vertex AI "
                       "decides.")
  flags.DEFINE_enum("algorithm", tuning_job.Study.algorithm, list(tuning_job.ALGORITHMS),
                    "tune: how trials pick their values: bayesian (Vertex AI's default), grid "
                    "(every combination; no double ranges) or random.")
  flags.DEFINE_enum("early_stopping", tuning_job.Study.early_stopping,
                    list(tuning_job.EARLY_STOPPING),
                    "tune: stop trials whose --metric is unpromising by their global step: "
                    "decay_curve (by their predicted final value), median (below the median of "
                    "the others at the same step) or none.")
  flags.DEFINE_string("model_dir", "", "upload, deploy: the finished job's --model_dir (gs://), "
                      "which holds metrics.json and export/; deploy uploads it first. predict: "
                      "the run's (local or gs://), whose metrics.json names the classes and the "
                      "background the model was trained on.")
  flags.DEFINE_string("serving_image", vertex_api.SERVING_IMAGE,
                      "upload, deploy: the prediction container that serves the export.")
  flags.DEFINE_string("model", "", "batch_predict, deploy: the registered model's resource "
                      "name (what upload prints).")
  flags.DEFINE_string("instances", "", "batch_predict: gs:// JSON lines file, one 28x28 image "
                      "per line (python -m launch.batch_input makes it).")
  flags.DEFINE_string("output_dir", "", "batch_predict: gs:// directory for the predictions.")
  flags.DEFINE_string("endpoint", "", "deploy, predict, undeploy: the endpoint's resource name "
                      "(deploy prints it) or its ID in --project and --region; deploy creates "
                      "one without it.")
  flags.DEFINE_integer("min_replicas", 1, "deploy: how many machines always serve the model.")
  flags.DEFINE_integer("max_replicas", 0, "deploy: how many machines may serve it under load "
                       "(Vertex AI adds them); default --min_replicas.")
  flags.DEFINE_bool("spot", False, "deploy: serve from Spot VMs: far cheaper, but reclaimed at "
                    "any time (Vertex AI replaces them; requests may fail meanwhile).")
  flags.DEFINE_bool("replace", False, "deploy, with --endpoint: take the models deployed there "
                    "before off it once the new one serves; without it they stay, with no "
                    "traffic, and billed.")
  flags.DEFINE_string("deployed_model", "", "undeploy: the deployed model's ID on --endpoint "
                      "(deploy prints it); default the only one there.")
  flags.DEFINE_bool("keep_endpoint", False, "undeploy: keep the endpoint once nothing is "
                    "deployed on it (an empty endpoint costs nothing).")
  flags.DEFINE_enum("invert", "auto", ["auto", "always", "never"],
                    "predict: invert images (255 - pixel) before sending them: auto inverts "
                    "those whose background (outer ring of pixels) is not like the training "
                    "images', with a note, as trainer.predict does.")
  flags.DEFINE_bool("resize", False, "predict: scale images of another size to 28x28 instead "
                    "of refusing.")
  flags.DEFINE_string("key", "", "predict: the array of each npz input that holds the images; "
                      "default the only array, else 'images', else 'X' (the trainer's npz "
                      "layout).")


def help_description(command: str, named: bool) -> str:
  """What --help says above the flags: the commands, and then the default command's flags,
  unless the command was `named` on the command line, when only its own."""
  def wrapped(text, indent=""):  # Paths and flags are not broken across lines.
    return textwrap.fill(text, 80, subsequent_indent=indent, break_long_words=False,
                         break_on_hyphens=False)

  if not named:
    commands = "\n".join(wrapped(f"  {name:<15}{summary}", " " * 17)
                         for name, summary in COMMAND_SUMMARIES.items())
    return (f"{__doc__.splitlines()[0]}\n\ncommands:\n{commands}\n\n"
            f"{TRAINER_FLAGS_NOTE}\n\n"
            "python -m launch.vertex COMMAND --help lists a command's own flags; below, train's.")
  summary = wrapped(f"{command}: {COMMAND_SUMMARIES[command]}")
  usage = f"usage: python -m launch.vertex {command} [flags]"
  if command == "predict":
    inputs = wrapped("INPUTs (local or gs://) are 28x28 greyscale images (PNG, JPEG, GIF, BMP) "
                     "and .npy/.npz arrays of them, read and inverted as python -m "
                     "trainer.predict reads them.")
    return f"{summary}\n\n{usage} INPUT...\n\n{inputs}"
  if command not in TRAINER_COMMANDS:
    return f"{summary}\n\n{usage}"
  note = TRAINER_FLAGS_NOTE if command == "train" else TUNE_NOTE
  return f"{summary}\n\n{usage} [-- trainer flags]\n\n{note}"


def help_groups(command: str) -> Dict[str, List[str]]:
  """The sections of `command`'s --help: its own flags, then those every command takes, each in
  the order they are defined."""
  def in_order(names):
    return [name for name in FLAGS if name in names]
  return {f"{command} flags": in_order(COMMAND_FLAGS[command]),
          "common flags": in_order(COMMON_FLAGS)}


def trial_environment(base_output_dir: str) -> Dict[str, str]:
  """The variables Vertex AI sets for a tuning job's trial: its directories are under
  BASE_OUTPUT_DIR/<trial id>/ (here trial 1's)."""
  return trainer_environment(f"{base_output_dir.rstrip('/')}/1")


def trainer_environment(base_output_dir: str) -> Dict[str, str]:
  """The variables Vertex AI sets for the trainer from the job's base output directory, which
  its directory flags default to."""
  layout = run_directory.on_vertex(base_output_dir)
  return {"AIP_MODEL_DIR": f"{layout.model_dir}/",
          "AIP_CHECKPOINT_DIR": f"{layout.checkpoints}/",
          "AIP_TENSORBOARD_LOG_DIR": f"{layout.logs}/"}


def split_command(argv: List[str]):
  """(command, argv without it): the command is the first argument if it is not a flag."""
  if len(argv) > 1 and not argv[1].startswith("-"):
    if argv[1] not in COMMANDS:
      cli.fail(f"unknown command {argv[1]!r}: choose one of {', '.join(COMMANDS)}, first")
    return argv[1], [argv[0], *argv[2:]]
  return "train", argv


def _refuse_other_commands_flags(command: str) -> None:
  """Exits with one `error:` line if a flag of another command is given to `command`."""
  own = COMMAND_FLAGS[command] | COMMON_FLAGS
  foreign = sorted(name for name in set().union(*COMMAND_FLAGS.values())
                   if FLAGS[name].present and name not in own)
  if not foreign:
    return
  # --model_dir is upload's, and the trainer's too: given to train, it is meant for the trainer.
  trainers = (f"; the trainer's --{foreign[0]} goes after --, as in python -m launch.vertex "
              f"[flags] -- --{foreign[0]}=VALUE"
              if command in TRAINER_COMMANDS and cli.is_trainer_flag(foreign[0]) else "")
  cli.fail(f"--{foreign[0]} is not a flag of {command}: its flags are "
           f"{', '.join('--' + name for name in sorted(own))}{trainers}")


def main(argv: List[str], command: str) -> None:
  """Runs `command` with the parsed flags; exits with its code, or one `error:` line."""
  _refuse_other_commands_flags(command)
  if command not in (*TRAINER_COMMANDS, "predict") and argv[1:]:
    cli.fail(f"{command} takes no arguments, only flags: {shlex.join(argv[1:])}")
  # A job's or endpoint's full name carries its region, as does the model deploy serves, and
  # only that region's endpoint knows them.
  named = FLAGS.job or FLAGS.endpoint or (FLAGS.model if command == "deploy" else "")
  region = vertex_api.region_of(named) or FLAGS.region
  endpoint = FLAGS.api_endpoint or vertex_api.default_endpoint(region)
  try:
    vertex_api.check_wait_seconds(FLAGS.poll_seconds, FLAGS.retry_seconds)  # Before any request.
    sys.exit(COMMAND_RUNNERS[command](argv[1:], endpoint))
  except KeyboardInterrupt:
    print(INTERRUPTED[command].format(project=FLAGS.project or "PROJECT", region=region),
          file=sys.stderr)
    sys.exit(errors.INTERRUPTED_EXIT_CODE)
  except LaunchError as e:
    cli.fail(str(e))
  except ImportError as e:
    if not (e.name or "").startswith("google"):
      raise
    cli.fail("google-cloud-aiplatform is not installed: pip install '.[vertex]'")
  except Exception as e:  # The API's and google-auth's errors, said in one line.
    line = vertex_api.explain(e, endpoint, region)
    if line is None:
      raise
    cause = getattr(e, "cause", None) or e
    line += "".join(f"; {note}" for note in getattr(e, "__notes__", ()))
    cli.fail(line, exit_code=vertex_api.UNREACHABLE_EXIT_CODE
             if vertex_api.is_transient(cause) else errors.BAD_INPUT_EXIT_CODE)


# What Ctrl-C outside waiting leaves behind: a request may have reached Vertex AI.
INTERRUPTED = {
    "train": "interrupted while submitting: the job may have been created; look before "
             "submitting again: gcloud ai custom-jobs list --project={project} --region={region}",
    "resubmit": "interrupted while submitting: the job may have been created; look before "
                "submitting again: gcloud ai custom-jobs list --project={project} "
                "--region={region}",
    "tune": "interrupted while submitting: the tuning job may have been created; look before "
            "submitting again: gcloud ai hp-tuning-jobs list --project={project} "
            "--region={region}",
    "batch_predict": "interrupted while submitting: the job may have been created; look before "
                     "submitting again: gcloud ai batch-prediction-jobs list "
                     "--project={project} --region={region}",
    "upload": "interrupted while registering: the model may have been registered; look before "
              "uploading again: gcloud ai models list --project={project} --region={region}",
    "cancel": "interrupted: the job may or may not have been asked to cancel; run cancel again",
    "deploy": "interrupted: a model may have been registered, an endpoint created or a "
              "deployment started, which goes on; look before deploying again: gcloud ai "
              "endpoints list --project={project} --region={region}",
    "undeploy": "interrupted: a model may be coming off its endpoint, or the endpoint being "
                "deleted, which goes on; look: gcloud ai endpoints list --project={project} "
                "--region={region}",
    "predict": "interrupted: the answers above are all that were printed",
    "wait": "stopped waiting; the job goes on",
}


def _parent() -> str:
  if not FLAGS.project:
    raise LaunchError("no --project: give the Google Cloud project, or --dry_run")
  return f"projects/{FLAGS.project}/locations/{FLAGS.region}"


def _follow_up(verb: str, name: str) -> str:
  """The command that does `verb` (wait, cancel) to the job `name` from here."""
  endpoint = f" --api_endpoint={FLAGS.api_endpoint}" if FLAGS.api_endpoint else ""
  return f"python -m launch.vertex {verb} --job={name}{endpoint}"


def _job_method(client, verb: str, name: str):
  """The client's method that does `verb` (get, cancel) to the job `name`, of its kind."""
  kind = {"batchPredictionJobs": "batch_prediction_job",
          vertex_api.TUNING_JOBS: "hyperparameter_tuning_job"}.get(
              vertex_api.collection_of(name), "custom_job")
  return getattr(client, f"{verb}_{kind}")


def _follow(client, name: str, link: str):
  """Follows the job `name` (custom, batch prediction or tuning) and returns it as it ended;
  None where Ctrl-C stopped following (not the job)."""
  get = _job_method(client, "get", name)
  from google.api_core import exceptions
  try:
    return vertex_api.follow(get, name, link, FLAGS.poll_seconds,
                             retry_seconds=FLAGS.retry_seconds)
  except exceptions.RetryError as e:  # Gave up on an unreachable API: the job is not lost.
    e.add_note(f"the job goes on: {_follow_up('wait', name)}")
    raise
  except KeyboardInterrupt:
    print(f"stopped waiting; the job goes on. Follow it again: {_follow_up('wait', name)}\n"
          f"Cancel it: {_follow_up('cancel', name)}", file=sys.stderr)
    return None


def _wait(client, name: str, link: str) -> int:
  """Follows the job `name` to its end, and a tuning job's trials after it; the exit code says
  how it ended, or that Ctrl-C stopped following."""
  job = _follow(client, name, link)
  if job is None:
    return errors.INTERRUPTED_EXIT_CODE
  if vertex_api.collection_of(name) == vertex_api.TUNING_JOBS:
    print("\n".join(vertex_api.tuning_summary(job)), flush=True)
  return vertex_api.exit_code(job)


def _check_resubmit() -> None:
  """Refuses a --resubmit that could not act: below 0, or without --wait (only a job followed
  to its end is seen to end)."""
  if FLAGS.resubmit < 0:
    raise LaunchError(f"--resubmit={FLAGS.resubmit} must be 0 or more")
  if FLAGS.resubmit and not FLAGS.wait:
    raise LaunchError(f"--resubmit={FLAGS.resubmit} needs --wait: only a job followed to its "
                      "end can be resubmitted when it ends")


def _submit(client, parent: str, custom_job):
  """Creates `custom_job` under `parent`; says its name and console link; returns it."""
  created = vertex_api.submit(client, parent, custom_job)
  print(f"submitted {created.name}", flush=True)  # First: the link's import takes seconds.
  print(_link(created.name), flush=True)
  return created


def _wait_resubmitting(client, created) -> int:
  """Follows the custom job `created` to its end, resubmitting it as --resubmit says."""
  return vertex_api.wait_resubmitting(
      lambda name: _follow(client, name, _link(name)), functools.partial(_submit, client),
      created, FLAGS.resubmit)


def _link(name: str) -> str:
  """The console page of a custom job; '' for other jobs (the SDK builds no link for them)."""
  return vertex_api.console_link(name) if vertex_api.collection_of(name) == "customJobs" else ""


def _job_spec(trainer_args: List[str]) -> JobSpec:
  """The custom job of the trainer with `trainer_args` that TRAINER_JOB_FLAGS describe."""
  return JobSpec(image_uri=FLAGS.image_uri, base_output_dir=FLAGS.base_output_dir,
                 machine_type=FLAGS.machine_type, accelerator_type=FLAGS.accelerator_type,
                 accelerator_count=FLAGS.accelerator_count, tpu_topology=FLAGS.tpu_topology,
                 replica_count=FLAGS.replica_count, trainer_args=tuple(trainer_args),
                 display_name=FLAGS.display_name, scheduling=FLAGS.scheduling,
                 timeout=FLAGS.timeout, max_wait=FLAGS.max_wait,
                 service_account=FLAGS.service_account, tensorboard=FLAGS.tensorboard)


def _check_trainer_arguments(trainer_args: List[str], environ: Dict[str, str]) -> None:
  """Raises LaunchError where the trainer would refuse `trainer_args` in `environ`: before
  anything is sent, since a typo would otherwise fail on a billed machine."""
  try:
    cli.check_trainer_arguments(trainer_args, environ)
  except UserInputError as e:
    raise LaunchError(f"trainer argument: {e}") from None


def train(trainer_args: List[str], endpoint: str) -> int:
  """Submits the custom job; with --wait, follows it to its end, and with --resubmit, submits
  it again where it ended by preemption or lack of capacity."""
  _check_resubmit()
  spec = _job_spec(trainer_args)
  _check_trainer_arguments(trainer_args, trainer_environment(spec.base_output_dir))
  custom_job = build_custom_job(spec)
  if FLAGS.dry_run:
    print(vertex_api.to_json(custom_job))
    return 0
  parent = _parent()
  client = vertex_api.job_client(endpoint)
  created = _submit(client, parent, custom_job)
  return _wait_resubmitting(client, created) if FLAGS.wait else 0


def tune(trainer_args: List[str], endpoint: str) -> int:
  """Submits a hyperparameter tuning job whose trials run the trainer with `trainer_args` and
  the --search settings' values, each checked as the trainer checks it; with --wait, follows
  it to its end and says its best trial."""
  trial_args = [*trainer_args, f"--{tuning_job.TUNING_METRIC_FLAG}={FLAGS.metric}"]
  spec = _job_spec(trial_args)
  study = tuning_job.Study(
      parameters=tuple(map(tuning_job.parse_search, FLAGS.search)), metric=FLAGS.metric,
      goal=FLAGS.goal, algorithm=FLAGS.algorithm, early_stopping=FLAGS.early_stopping,
      max_trials=FLAGS.max_trials, parallel_trials=FLAGS.parallel_trials,
      max_failed_trials=FLAGS.max_failed_trials)
  tuning_job.check_trial_arguments(trainer_args)
  environ = trial_environment(spec.base_output_dir)
  _check_trainer_arguments(trial_args, environ)
  tuning_job.check_search(study.parameters, trial_args, environ)
  job = tuning_job.build_tuning_job(study, build_custom_job(spec), FLAGS.display_name)
  if FLAGS.dry_run:
    print(vertex_api.to_json(job))
    return 0
  client = vertex_api.job_client(endpoint)
  created = vertex_api.submit_tuning_job(client, _parent(), job)
  print(f"submitted {created.name}", flush=True)
  if not FLAGS.wait:
    print(f"follow it: {_follow_up('wait', created.name)}")
    return 0
  return _wait(client, created.name, "")


def resubmit(_, endpoint: str) -> int:
  """Submits --job again as a new custom job with the same spec, if it ended by preemption or
  lack of capacity; the trainer resumes from the newest checkpoint in its base output
  directory. With --wait, follows the new job (and --resubmit goes on resubmitting it)."""
  _check_resubmit()
  name = vertex_api.job_name(FLAGS.job, FLAGS.project, FLAGS.region)
  if vertex_api.collection_of(name) != "customJobs":
    raise LaunchError(f"--job={name} is not a custom job: resubmit takes a training job")
  client = vertex_api.job_client(endpoint)
  job = client.get_custom_job(name=name)
  again, reason = vertex_api.resubmission(job)
  if not again:
    raise LaunchError(f"not resubmitting {name}: {reason}")
  # A log line: what --dry_run prints on standard output stays the request's JSON alone.
  print(f"resubmitting: {reason}", file=sys.stderr, flush=True)
  custom_job = vertex_api.resubmitted_job(job)
  if FLAGS.dry_run:
    print(vertex_api.to_json(custom_job))
    return 0
  created = _submit(client, vertex_api.parent_of(name), custom_job)
  return _wait_resubmitting(client, created) if FLAGS.wait else 0


def wait(_, endpoint: str) -> int:
  """Follows --job to its end."""
  name = vertex_api.job_name(FLAGS.job, FLAGS.project, FLAGS.region)
  return _wait(vertex_api.job_client(endpoint), name, _link(name))


def cancel(_, endpoint: str) -> int:
  """Asks Vertex AI to cancel --job (custom, batch prediction or tuning)."""
  name = vertex_api.job_name(FLAGS.job, FLAGS.project, FLAGS.region)
  _job_method(vertex_api.job_client(endpoint), "cancel", name)(name=name)
  print(f"asked Vertex AI to cancel {name}; it ends as JOB_STATE_CANCELLED: "
        f"{_follow_up('wait', name)}")
  return 0


def upload(_, endpoint: str) -> int:
  """Registers the export of a finished job's --model_dir in the Model Registry."""
  if not FLAGS.model_dir:
    raise LaunchError("no --model_dir: give the finished job's model directory "
                      "(BASE_OUTPUT_DIR/model for a Vertex AI job)")
  if not FLAGS.model_dir.startswith("gs://"):
    raise LaunchError(f"--model_dir={FLAGS.model_dir!r} must be a gs:// path: Vertex AI reads "
                      "the export from Cloud Storage (copy it there with gcloud storage cp -r)")
  parent = "" if FLAGS.dry_run else _parent()
  metrics = {} if FLAGS.dry_run else vertex_api.check_finished(FLAGS.model_dir)
  model = vertex_api.model_for(FLAGS.model_dir, FLAGS.display_name, FLAGS.serving_image, metrics)
  if FLAGS.dry_run:
    print(vertex_api.to_json(model))
    return 0
  name = vertex_api.upload(vertex_api.model_client(endpoint), parent, model)
  print(f"uploaded {name}\npredict with it: python -m launch.vertex batch_predict --model={name} "
        "--instances=gs://... --output_dir=gs://...")
  return 0


def batch_predict(_, endpoint: str) -> int:
  """Submits a batch prediction job of --model over --instances; with --wait, follows it."""
  if not FLAGS.model:
    raise LaunchError("no --model: give the registered model's resource name (upload prints it)")
  job = vertex_api.batch_prediction_job(FLAGS.model, FLAGS.instances, FLAGS.output_dir,
                                        FLAGS.machine_type, FLAGS.replica_count,
                                        FLAGS.display_name)
  if FLAGS.dry_run:
    print(vertex_api.to_json(job))
    return 0
  parent = _parent()
  client = vertex_api.job_client(endpoint)
  created = client.create_batch_prediction_job(parent=parent, batch_prediction_job=job)
  print(f"submitted {created.name}\npredictions go to {FLAGS.output_dir}", flush=True)
  return _wait(client, created.name, "") if FLAGS.wait else 0


def _command(verb: str, *args: str) -> str:
  """The launch.vertex command line that does `verb` with `args` from here."""
  endpoint = (f"--api_endpoint={FLAGS.api_endpoint}",) if FLAGS.api_endpoint else ()
  return shlex.join(["python", "-m", "launch.vertex", verb, *args, *endpoint])


def _deployment_parent(endpoint: str) -> str:
  """Where deploy works: the project and region of --endpoint, else of --model, else --project
  in --region (PROJECT in a dry run without it)."""
  if endpoint:
    return vertex_api.parent_of(endpoint)
  if FLAGS.model:
    return vertex_api.parent_of(endpoints.check_model_name(FLAGS.model))
  if FLAGS.dry_run and not FLAGS.project:
    return f"projects/PROJECT/locations/{FLAGS.region}"
  return _parent()


def deploy(_, endpoint: str) -> int:
  """Deploys --model, or the export of --model_dir (uploaded first), on --endpoint or a new
  endpoint; says how to predict with it and take it down."""
  name = FLAGS.endpoint and endpoints.endpoint_name(FLAGS.endpoint, FLAGS.project, FLAGS.region)
  serving = endpoints.Serving(FLAGS.machine_type, FLAGS.accelerator_type, FLAGS.accelerator_count,
                              FLAGS.min_replicas, FLAGS.max_replicas, FLAGS.spot)
  plan = endpoints.Deployment(_deployment_parent(name), serving, model=FLAGS.model,
                              model_dir=FLAGS.model_dir, serving_image=FLAGS.serving_image,
                              endpoint=name, display_name=FLAGS.display_name,
                              replace=FLAGS.replace)
  done = endpoints.deploy(plan, endpoints.Clients(endpoint), FLAGS.dry_run)
  if FLAGS.dry_run:
    return 0
  predict_command = _command("predict", f"--endpoint={done.endpoint}",
                             f"--model_dir={done.model_dir or 'MODEL_DIR'}")
  undeploy_command = _command("undeploy", f"--endpoint={done.endpoint}",
                              f"--deployed_model={done.deployed_model_id}")
  print(f"predict with it: {predict_command} INPUT...\ntake it down: {undeploy_command}")
  return 0


def predict(inputs: List[str], endpoint: str) -> int:
  """Sends the images of `inputs` to --endpoint and prints each answer; exits 2, sending
  nothing, where an input cannot be read (each said in one `error:` line)."""
  name = endpoints.endpoint_name(FLAGS.endpoint, FLAGS.project, FLAGS.region)
  if not FLAGS.model_dir:
    raise LaunchError("no --model_dir: give the run's (local or gs://); its metrics.json names "
                      "the classes and the background the model was trained on")
  if not inputs:
    raise LaunchError(f"no inputs given (images, or .npy/.npz arrays): {PREDICT_USAGE}")
  from trainer import predict as trainer_predict
  with cli.tensorflow_imported_quietly():
    import tensorflow  # noqa: F401  It reads the inputs; here, its start-up lines are filtered.
  options = trainer_predict.Options(model_dir=FLAGS.model_dir, invert=FLAGS.invert,
                                    resize=FLAGS.resize, key=FLAGS.key)
  failed = endpoints.predict(name, inputs, options, endpoints.Clients(endpoint), FLAGS.dry_run)
  return errors.BAD_INPUT_EXIT_CODE if failed else 0


def undeploy(_, endpoint: str) -> int:
  """Takes --deployed_model (by default the only one) off --endpoint, and deletes the endpoint
  once nothing is deployed on it, unless --keep_endpoint."""
  name = endpoints.endpoint_name(FLAGS.endpoint, FLAGS.project, FLAGS.region)
  endpoints.undeploy(name, FLAGS.deployed_model, FLAGS.keep_endpoint,
                     endpoints.Clients(endpoint), FLAGS.dry_run)
  return 0


COMMAND_RUNNERS = {"train": train, "tune": tune, "resubmit": resubmit, "wait": wait,
                   "cancel": cancel, "upload": upload, "batch_predict": batch_predict,
                   "deploy": deploy, "predict": predict, "undeploy": undeploy}


if __name__ == "__main__":
  _define_flags()
  command, argv = split_command(sys.argv)
  named = len(argv) < len(sys.argv)  # The command was given, not train by default.
  # A bad flag is one `error:` line and exit code 2, as elsewhere; only train and tune pass
  # the arguments after `--` to the trainer, so only there is a trainer flag before it misplaced.
  app.run(functools.partial(main, command=command), argv=argv, flags_parser=functools.partial(
      cli.parse_flags, description=help_description(command, named), groups=help_groups(command),
      launcher="launch.vertex" if command in TRAINER_COMMANDS else ""))
