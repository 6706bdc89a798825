"""Online prediction on Vertex AI: a registered model deployed on an endpoint, asked image by
image, and taken down.

`python -m launch.vertex deploy`, `predict` and `undeploy` run these functions:
  deploy    puts a registered model (or a finished run's export, registered first, as `upload`
            does) on an endpoint, a new one or `--endpoint`, on dedicated machines. The new model
            takes all of the endpoint's traffic; models deployed there before stay, with none,
            unless `replace` takes them off once the new one serves.
  predict   sends images as the export's serving signature takes them, 28x28 nested ints 0-255
            (`launch.batch_input`'s instances), prepared as `trainer.predict` prepares them (the
            same background inversion), in requests under Vertex AI's online size limit, and
            prints each answer as `trainer.predict` does. The class names and the background the
            model was trained on come from the run's metrics.json (`--model_dir`).
  undeploy  takes a deployed model off its endpoint (its traffic, if any, to those left), and
            deletes the endpoint once nothing is deployed on it, unless told to keep it.

Every check that can be made before sending is made first: a refusal is one `LaunchError` and
nothing sent. With `dry_run`, each request that would change something is printed as the API's
JSON on standard output, after a `--- Service.Method` line on standard error, and none is sent;
only the endpoint that would change is read (what is sent there depends on what it serves).

TensorFlow is imported only by `predict`, which reads images and metrics.json through
`trainer.data.image_files` and `trainer.predict`.
"""

import concurrent.futures
import dataclasses
import functools
import json
import sys
from typing import Callable, Dict, List, Optional, Sequence

from launch import vertex_api
from launch.custom_job import LaunchError
from trainer.job import run_directory

# Vertex AI refuses an online prediction request above about 1.5 MB. Requests are bounded by
# their size as sent (protobuf: 11 bytes a pixel), which is above their JSON's (at most 4).
ONLINE_REQUEST_BYTES = 1_500_000
# A deployment takes several minutes (machines start, the container loads the model).
OPERATION_TIMEOUT_SECONDS = 3600.0
# What a dry run names the resources that only the calls before it would create.
NEW_ENDPOINT_ID = "NEW_ENDPOINT_ID"
UPLOADED_MODEL_ID = "UPLOADED_MODEL_ID"
NEW_DEPLOYED_MODEL_ID = "NEW_DEPLOYED_MODEL_ID"
# In a DeployModelRequest's traffic split, the model being deployed.
NEW_DEPLOYED_MODEL = "0"

Say = Callable[[str], None]
_print = functools.partial(print, flush=True)


def _sayer(say: Optional[Say], dry_run: bool) -> Say:
  """`say`, else a line on standard output; a dry run's on standard error, which leaves
  standard output to the requests' JSON."""
  return say or (functools.partial(print, file=sys.stderr, flush=True) if dry_run else _print)


def endpoint_name(endpoint: str, project: str, region: str) -> str:
  """An endpoint's resource name from --endpoint: the name itself (projects/P/locations/R/
  endpoints/ID), or an ID within `project` and `region`; LaunchError for anything else."""
  if not endpoint:
    raise LaunchError("no --endpoint: give the endpoint's resource name (deploy prints it) or "
                      "its ID with --project")
  if endpoint.startswith("projects/"):
    if len(endpoint.split("/")) != 6 or vertex_api.collection_of(endpoint) != "endpoints":
      raise LaunchError(f"--endpoint={endpoint!r} is not an endpoint's resource name: "
                        "projects/P/locations/R/endpoints/ID")
    return endpoint
  if "/" in endpoint:
    raise LaunchError(f"--endpoint={endpoint!r} is neither an endpoint's resource name "
                      "(projects/P/locations/R/endpoints/ID) nor its ID")
  if not project:
    raise LaunchError(f"--endpoint={endpoint} is an ID: give --project too, or the full "
                      "resource name")
  return f"projects/{project}/locations/{region}/endpoints/{endpoint}"


def check_model_name(model: str) -> str:
  """`model` if it is a registered model's resource name; LaunchError otherwise."""
  if len(model.split("/")) != 6 or vertex_api.collection_of(model) != "models":
    raise LaunchError(f"--model={model!r} is not a model's resource name "
                      "(projects/P/locations/R/models/ID, as upload prints it)")
  return model


@dataclasses.dataclass(frozen=True)
class Serving:
  """The machines a deployed model runs on, checked on construction: `min_replicas` always
  run, Vertex AI adds up to `max_replicas` under load (0: as many as `min_replicas`)."""

  machine_type: str = "n1-standard-4"
  accelerator_type: str = ""
  accelerator_count: int = 0
  min_replicas: int = 1
  max_replicas: int = 0
  spot: bool = False

  def __post_init__(self):
    if self.min_replicas < 1:
      raise LaunchError(f"--min_replicas={self.min_replicas} must be 1 or more: a deployed "
                        "model serves from at least one machine")
    if self.max_replicas and self.max_replicas < self.min_replicas:
      raise LaunchError(f"--max_replicas={self.max_replicas} is below --min_replicas="
                        f"{self.min_replicas}: give a --max_replicas of {self.min_replicas} or "
                        "more, or leave it out to serve from --min_replicas machines")
    if self.accelerator_count < 0 or bool(self.accelerator_type) != (self.accelerator_count > 0):
      raise LaunchError("give --accelerator_type and a positive --accelerator_count together, "
                        "or neither")
    from google.cloud.aiplatform_v1 import types
    if self.accelerator_type and self.accelerator_type not in types.AcceleratorType.__members__:
      raise LaunchError(f"unknown --accelerator_type={self.accelerator_type}: use Vertex AI's "
                        "name, e.g. NVIDIA_TESLA_T4 or NVIDIA_L4")

  @property
  def replicas(self) -> range:
    return range(self.min_replicas, (self.max_replicas or self.min_replicas) + 1)

  def resources(self):
    """The API's DedicatedResources for these machines."""
    from google.cloud.aiplatform_v1 import types
    machine = types.MachineSpec(machine_type=self.machine_type)
    if self.accelerator_type:
      machine.accelerator_type = types.AcceleratorType[self.accelerator_type]
      machine.accelerator_count = self.accelerator_count
    return types.DedicatedResources(machine_spec=machine, min_replica_count=self.replicas[0],
                                    max_replica_count=self.replicas[-1], spot=self.spot)

  def __str__(self) -> str:
    """As a log line says it: 'n1-standard-4 with 1 NVIDIA_L4, 1 to 3 replicas, Spot VMs'."""
    gpus = (f" with {self.accelerator_count} {self.accelerator_type}" if self.accelerator_type
            else "")
    low, high = self.replicas[0], self.replicas[-1]
    count = f"{low} replica{'s' * (high > 1)}" if low == high else f"{low} to {high} replicas"
    return f"{self.machine_type}{gpus}, {count}{', Spot VMs' * self.spot}"


@dataclasses.dataclass(frozen=True)
class Deployment:
  """What deploy does, checked on construction: `model` (a registered model's name), or the
  export of the finished run at `model_dir` (gs://), registered first with `serving_image`;
  onto `endpoint` (a resource name), or a new endpoint under `parent` (projects/P/locations/R);
  on `serving`'s machines; `replace` takes the models deployed there before off it."""

  parent: str
  serving: Serving
  model: str = ""
  model_dir: str = ""
  serving_image: str = vertex_api.SERVING_IMAGE
  endpoint: str = ""
  display_name: str = "mnist-multitask"
  replace: bool = False

  def __post_init__(self):
    if bool(self.model) == bool(self.model_dir):
      raise LaunchError("give --model (a registered model's resource name) or --model_dir (a "
                        "finished run's, registered first as upload does), not both or neither")
    if self.model:
      check_model_name(self.model)
    if self.model_dir and not self.model_dir.startswith("gs://"):
      raise LaunchError(f"--model_dir={self.model_dir!r} must be a gs:// path: Vertex AI reads "
                        "the export from Cloud Storage (copy it there with gcloud storage cp -r)")
    if self.replace and not self.endpoint:
      raise LaunchError("--replace needs --endpoint: a new endpoint serves nothing to replace")
    # A model is deployed only on an endpoint of its own project and region.
    if self.model and self.endpoint and (vertex_api.parent_of(self.model) !=
                                         vertex_api.parent_of(self.endpoint)):
      raise LaunchError(f"--model={self.model} and --endpoint={self.endpoint} are in different "
                        "projects or regions: a model is deployed only in its own region")


@dataclasses.dataclass
class Clients:
  """The SDK's clients for Vertex AI at `address`, each made when first used."""

  address: str

  @functools.cached_property
  def endpoints(self):
    return vertex_api.endpoint_client(self.address)

  @functools.cached_property
  def models(self):
    return vertex_api.model_client(self.address)

  @functools.cached_property
  def predictions(self):
    return vertex_api.prediction_client(self.address)


@dataclasses.dataclass(frozen=True)
class Deployed:
  """What deploy did: the endpoint, the new deployed model's ID on it, and the run directory
  whose metrics.json predict reads ('' where the model's export is not in one)."""

  endpoint: str
  deployed_model_id: str
  model_dir: str


def show_request(method: str, request) -> None:
  """A dry run's request: `--- method` on standard error, the API's JSON on standard output."""
  print(f"--- {method}", file=sys.stderr, flush=True)
  print(vertex_api.to_json(request), flush=True)


def _wait_for(operation, doing: str, say: Say):
  """Says `doing` with the long-running operation's name, waits for it and returns its result;
  LaunchError after OPERATION_TIMEOUT_SECONDS (the operation goes on)."""
  name = operation.operation.name
  say(f"{doing}: operation {name}")
  try:
    return operation.result(timeout=OPERATION_TIMEOUT_SECONDS)
  except concurrent.futures.TimeoutError:
    raise LaunchError(f"still {doing} after {OPERATION_TIMEOUT_SECONDS:.0f} s; it goes on: see "
                      f"operation {name}") from None


def _not_found(what: str, name: str, error) -> LaunchError:
  """The refusal for a model or endpoint Vertex AI does not know."""
  project, region = name.split("/")[1], vertex_api.region_of(name)
  listing = {"model": "models", "endpoint": "endpoints"}[what]
  return LaunchError(f"no {what} {name} ({error.message}): gcloud ai {listing} list "
                     f"--project={project} --region={region} lists them")


def get_model(client, name: str):
  """The registered model `name`; LaunchError where there is none."""
  from google.api_core import exceptions
  try:
    return client.get_model(name=name)
  except exceptions.NotFound as e:
    raise _not_found("model", name, e) from None


def get_endpoint(client, name: str):
  """The endpoint `name`, with what it serves; LaunchError where there is none."""
  from google.api_core import exceptions
  try:
    return client.get_endpoint(name=name)
  except exceptions.NotFound as e:
    raise _not_found("endpoint", name, e) from None


def run_of_export(artifact_uri: str) -> str:
  """The run directory of a model whose export is at `artifact_uri` (RUN/export), else ''."""
  head, _, tail = artifact_uri.rstrip("/").rpartition("/")
  return head if tail == run_directory.EXPORT else ""


def deploy_request(endpoint: str, model: str, serving: Serving, display_name: str):
  """The DeployModelRequest that puts `model` on `endpoint` with `serving`'s machines and gives
  it all of the endpoint's traffic (any model deployed there before gets none)."""
  from google.cloud.aiplatform_v1 import types
  return types.DeployModelRequest(
      endpoint=endpoint, traffic_split={NEW_DEPLOYED_MODEL: 100},
      deployed_model=types.DeployedModel(model=model, display_name=display_name,
                                         dedicated_resources=serving.resources()))


def deploy(plan: Deployment, clients: Clients, dry_run: bool = False,
           say: Optional[Say] = None) -> Deployed:
  """Deploys as `plan` says (see Deployment) and returns what it did; says each step, and the
  models left deployed on the endpoint or taken off. Reads the model and the endpoint before
  sending anything: a missing one is a LaunchError. A dry run reads only the endpoint, prints
  the requests (see the module docstring) and returns placeholders for what they would create."""
  from google.cloud.aiplatform_v1 import types
  say = _sayer(say, dry_run)
  before = get_endpoint(clients.endpoints, plan.endpoint) if plan.endpoint else types.Endpoint()
  model, model_dir = plan.model, plan.model_dir
  if model and not dry_run:
    model_dir = run_of_export(get_model(clients.models, model).artifact_uri)
  if not model:
    model = _upload(plan, clients, dry_run, say)
  endpoint = plan.endpoint or _create_endpoint(plan, clients, dry_run, say)
  request = deploy_request(endpoint, model, plan.serving, plan.display_name)
  if dry_run:
    show_request("EndpointService.DeployModel", request)
    new_id = NEW_DEPLOYED_MODEL_ID
  else:
    operation = clients.endpoints.deploy_model(request=request)
    new_id = _wait_for(operation, f"deploying {model} on {endpoint} ({plan.serving})",
                       say).deployed_model.id
    say(f"deployed {model} on {endpoint} as deployed model {new_id}; it takes all of the "
        "endpoint's traffic")
  for old in before.deployed_models:
    if plan.replace:
      _undeploy(endpoint, old, {}, "replaced (--replace)", clients, dry_run, say)
    else:
      say(f"{endpoint} also serves deployed model {old.id} ({old.model}): it stays deployed, "
          f"with no traffic, and billed; undeploy --deployed_model={old.id} takes it off "
          "(deploy --replace would have)")
  return Deployed(endpoint, new_id, model_dir)


def _upload(plan: Deployment, clients: Clients, dry_run: bool, say: Say) -> str:
  """Registers the export of `plan.model_dir` as upload does; returns the model's name."""
  from google.cloud.aiplatform_v1 import types
  metrics = {} if dry_run else vertex_api.check_finished(plan.model_dir)
  model = vertex_api.model_for(plan.model_dir, plan.display_name, plan.serving_image, metrics)
  if dry_run:
    show_request("ModelService.UploadModel",
                 types.UploadModelRequest(parent=plan.parent, model=model))
    return f"{plan.parent}/models/{UPLOADED_MODEL_ID}"
  name = vertex_api.upload(clients.models, plan.parent, model, OPERATION_TIMEOUT_SECONDS, say)
  say(f"uploaded {name}")
  return name


def _create_endpoint(plan: Deployment, clients: Clients, dry_run: bool, say: Say) -> str:
  """Creates an endpoint under `plan.parent`; returns its name."""
  from google.cloud.aiplatform_v1 import types
  request = types.CreateEndpointRequest(
      parent=plan.parent, endpoint=types.Endpoint(display_name=plan.display_name))
  if dry_run:
    show_request("EndpointService.CreateEndpoint", request)
    return f"{plan.parent}/endpoints/{NEW_ENDPOINT_ID}"
  operation = clients.endpoints.create_endpoint(request=request)
  name = _wait_for(operation, "creating an endpoint", say).name
  say(f"created endpoint {name}")
  return name


def _undeploy(endpoint: str, deployed, traffic_split: Dict[str, int], why: str,
              clients: Clients, dry_run: bool, say: Say) -> None:
  """Takes the deployed model `deployed` off `endpoint`, the endpoint's traffic then split as
  `traffic_split` says (empty: as it is; the model must have none of it)."""
  from google.cloud.aiplatform_v1 import types
  request = types.UndeployModelRequest(endpoint=endpoint, deployed_model_id=deployed.id,
                                       traffic_split=traffic_split)
  if dry_run:
    show_request("EndpointService.UndeployModel", request)
    return
  _wait_for(clients.endpoints.undeploy_model(request=request),
            f"undeploying deployed model {deployed.id} ({deployed.model}), {why}", say)
  say(f"undeployed deployed model {deployed.id} from {endpoint}")


def traffic_without(traffic_split: Dict[str, int], removed: str, remaining) -> Dict[str, int]:
  """The endpoint's traffic split once the deployed model `removed` is taken off, for the
  deployed models `remaining`: {} (left as it is) where `removed` has no traffic or nothing
  remains; else its share goes to the others in proportion to theirs, or all of it to the
  newest where they have none. Whole percentages that add up to 100."""
  if not traffic_split.get(removed) or not remaining:
    return {}
  shares = {model.id: traffic_split.get(model.id, 0) for model in remaining}
  total = sum(shares.values())
  if not total:
    newest = max(remaining, key=lambda model: model.create_time)
    return {model_id: 100 * (model_id == newest.id) for model_id in shares}
  # Largest remainders: each gets its share of 100 rounded down, the rest one by one.
  exact = {model_id: 100 * share / total for model_id, share in shares.items()}
  split = {model_id: int(value) for model_id, value in exact.items()}
  by_remainder = sorted(exact, key=lambda model_id: split[model_id] - exact[model_id])
  for model_id in by_remainder[:100 - sum(split.values())]:
    split[model_id] += 1
  return split


def _chosen(endpoint, deployed_model_id: str):
  """The deployed model of `endpoint` to take off: `deployed_model_id`, else the only one;
  None where nothing is deployed; LaunchError where the ID is not there or several are."""
  deployed = list(endpoint.deployed_models)
  described = ", ".join(f"{model.id} ({model.model}, {endpoint.traffic_split.get(model.id, 0)}% "
                        "of the traffic)" for model in deployed)
  if deployed_model_id:
    chosen = [model for model in deployed if model.id == deployed_model_id]
    if not chosen:
      raise LaunchError(f"--deployed_model={deployed_model_id} is not deployed on "
                        f"{endpoint.name}; it serves {described or 'nothing'}")
    return chosen[0]
  if len(deployed) > 1:
    raise LaunchError(f"{endpoint.name} serves several deployed models: {described}; give "
                      "--deployed_model=ID to say which to take off")
  return deployed[0] if deployed else None


def undeploy(name: str, deployed_model_id: str, keep_endpoint: bool, clients: Clients,
             dry_run: bool = False, say: Optional[Say] = None) -> None:
  """Takes `deployed_model_id` (by default the only deployed model) off the endpoint `name`,
  its traffic to the models left (`traffic_without`); then deletes the endpoint if nothing is
  deployed on it, unless `keep_endpoint`. Says what it did and kept. Reads the endpoint first,
  a dry run too: LaunchError where it does not exist, or the model to take off is unclear."""
  from google.cloud.aiplatform_v1 import types
  say = _sayer(say, dry_run)
  endpoint = get_endpoint(clients.endpoints, name)
  chosen = _chosen(endpoint, deployed_model_id)
  remaining = [model for model in endpoint.deployed_models if chosen and model.id != chosen.id]
  if chosen:
    split = traffic_without(dict(endpoint.traffic_split), chosen.id, remaining)
    if split:
      say(f"its {endpoint.traffic_split[chosen.id]}% of the traffic goes to "
          + ", ".join(f"{model_id} ({share}%)" for model_id, share in split.items()))
    _undeploy(name, chosen, split, "as asked", clients, dry_run, say)
  if remaining:
    say(f"kept {name}: it still serves deployed model"
        f"{'s' * (len(remaining) > 1)} {', '.join(model.id for model in remaining)}")
  elif keep_endpoint:
    say(f"kept {name} (--keep_endpoint): with nothing deployed it costs nothing; deploy "
        f"--endpoint={name} serves from it again")
  elif dry_run:
    show_request("EndpointService.DeleteEndpoint", types.DeleteEndpointRequest(name=name))
  else:
    _wait_for(clients.endpoints.delete_endpoint(name=name), f"deleting {name}", say)
    say(f"deleted {name}: nothing was deployed on it any more")


def request_sizes(values: Sequence, endpoint: str, limit: int = ONLINE_REQUEST_BYTES) -> List[int]:
  """How many of `values` (protobuf Values, one an instance, in order) each PredictRequest to
  `endpoint` holds, each request's encoded size at most `limit` bytes."""
  from google.cloud.aiplatform_v1 import types
  base = types.PredictRequest.pb()(endpoint=endpoint).ByteSize()
  sizes, size = [0], base
  for value in values:
    length = value.ByteSize()
    cost = 1 + (length.bit_length() + 6) // 7 + length  # Field tag, varint length, the value.
    if base + cost > limit:
      raise LaunchError(f"one instance takes {cost} bytes, over the {limit}-byte request limit")
    if size + cost > limit:
      sizes.append(0)
      size = base
    sizes[-1] += 1
    size += cost
  return sizes if values else []


def predict_request_json(endpoint: str, lines: Sequence[str]) -> str:
  """A PredictRequest as the API's JSON, each instance (a compact JSON line, as
  `launch.batch_input` writes it) on one line: 28 rows of 28 ints, not 784 lines of numbers."""
  instances = ",\n    ".join(lines)
  return f'{{\n  "endpoint": {json.dumps(endpoint)},\n  "instances": [\n    {instances}\n  ]\n}}'


def _probabilities(response, count: int) -> list:
  """The `classifier` probabilities of each of the `count` answers in a PredictResponse;
  LaunchError where the answer is not the export's serving signature's."""
  from google.cloud.aiplatform_v1 import types
  from google.protobuf import json_format
  from trainer.data import sources
  answers = [json_format.MessageToDict(value)
             for value in types.PredictResponse.pb(response).predictions]
  expected = f"one {{'classifier': [{sources.NUM_CLASSES} probabilities], 'decoder': ...}} each"
  if len(answers) != count:
    raise LaunchError(f"the endpoint answered {len(answers)} predictions for {count} "
                      f"instances, not {expected}")
  for answer in answers:
    if not (isinstance(answer, dict) and isinstance(answer.get("classifier"), list)
            and len(answer["classifier"]) == sources.NUM_CLASSES):
      raise LaunchError(f"the endpoint's answer is not this trainer's model's ({expected}): "
                        f"{json.dumps(answer)[:200]}; does it serve a model of this trainer?")
  return [answer["classifier"] for answer in answers]


def prepared(items, background: str, invert: str) -> None:
  """Inverts the images of `items` (trainer.predict's Items) as trainer.predict does: by its
  rule (`needs_inversion`), each inverted by --invert=auto with its `note:` line."""
  from trainer import predict as trainer_predict
  from trainer.data import sources
  for item in items:
    if trainer_predict.needs_inversion(item.image, background, invert):
      if invert == "auto":
        print(f"note: {item.name} has a {sources.background(item.image)} background, unlike "
              "the images the model was trained on; inverted it (--invert=never to keep it)",
              file=sys.stderr)
      item.image = 255 - item.image


def predict(endpoint: str, paths: Sequence[str], options, clients: Clients,
            dry_run: bool = False, limit: int = ONLINE_REQUEST_BYTES) -> int:
  """Sends every image of `paths` to `endpoint` and prints one line per answer as
  trainer.predict does (`digit.png: 7 (probability 0.9812)`, the class's name where the run
  names them), in order; returns how many inputs could not be read, each said in its `error:`
  line, and then sends nothing.

  `options` is a trainer.predict.Options: its model_dir is the run's (metrics.json: class
  names, background), its invert, resize and key say how inputs are read and prepared.
  Images go `limit` bytes a request at most. LaunchError for a run without (or with a damaged)
  metrics.json, or an answer that is not the export's.
  """
  import numpy as np
  from google.cloud.aiplatform_v1 import types
  from google.protobuf import json_format, struct_pb2
  from launch import batch_input
  from trainer import predict as trainer_predict
  from trainer.errors import UserInputError
  vertex_api.check_finished(options.model_dir)  # Not finished: metrics.json's defaults would lie.
  try:
    trained = trainer_predict.trained_on(options.model_dir)
  except UserInputError as e:  # A damaged metrics.json.
    raise LaunchError(str(e)) from None
  # Nothing is written here, so no reconstruction file is in the way (overwrite).
  items, failed = trainer_predict.read_items(paths, dataclasses.replace(options, overwrite=True))
  if failed:
    return failed
  prepared(items, trained.background, options.invert)
  lines = list(batch_input.instance_lines(np.stack([item.image for item in items])))
  values = [json_format.Parse(line, struct_pb2.Value()) for line in lines]
  start = 0
  for count in request_sizes(values, endpoint, limit):
    batch = slice(start, start + count)
    start += count
    if dry_run:
      print("--- PredictionService.Predict", file=sys.stderr, flush=True)
      print(predict_request_json(endpoint, lines[batch]), flush=True)
      continue
    request = types.PredictRequest.wrap(
        types.PredictRequest.pb()(endpoint=endpoint, instances=values[batch]))
    response = _send_prediction(clients, request)
    for item, probabilities in zip(items[batch], _probabilities(response, count)):
      _print(trainer_predict.answer_line(item.name, probabilities, trained.class_names))
  return 0


def _send_prediction(clients: Clients, request):
  """The endpoint's answer to `request`; LaunchError where there is no such endpoint."""
  from google.api_core import exceptions
  try:
    return clients.predictions.predict(request=request)
  except exceptions.NotFound as e:
    raise _not_found("endpoint", request.endpoint, e) from None
