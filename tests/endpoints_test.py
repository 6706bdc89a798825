"""Tests of launch.endpoints (deploy, predict, undeploy): the SDK's own clients against the
stand-in Vertex AI on loopback (tests/fake_vertex.py), every request checked field by field."""

import json

import numpy as np
import pytest
import tensorflow as tf
from google.cloud.aiplatform_v1 import types
from google.protobuf import json_format

from launch import endpoints, vertex_api
from launch.custom_job import LaunchError
from tests import fake_vertex
from trainer import predict as trainer_predict
from trainer.data import sources

PARENT = "projects/p/locations/europe-west4"
MODEL = f"{PARENT}/models/42"
OLD_MODEL = f"{PARENT}/models/41"
RUN = "gs://b/run/model"
ENDPOINT = f"{PARENT}/endpoints/77"  # One the tests put in the stand-in, serving OLD_MODEL.
NEW_ENDPOINT = f"{PARENT}/endpoints/{fake_vertex.ENDPOINT_ID}"
NEW_ID = fake_vertex.DEPLOYED_MODEL_ID


@pytest.fixture
def server():
  fake = fake_vertex.FakeVertex().start()
  fake.models[MODEL] = types.Model(name=MODEL, artifact_uri=f"{RUN}/export")
  fake.models[OLD_MODEL] = types.Model(name=OLD_MODEL, artifact_uri="gs://b/old/model/export")
  yield fake
  fake.stop()


def serving_endpoint(server, *deployed):
  """ENDPOINT in the stand-in, serving `deployed`: (deployed model ID, model, traffic %), the
  first deployed first."""
  server.endpoints[ENDPOINT] = types.Endpoint(
      name=ENDPOINT, traffic_split={model_id: share for model_id, _, share in deployed},
      deployed_models=[types.DeployedModel(id=model_id, model=model, create_time=fake_vertex._now())
                       for model_id, model, _ in deployed])


def _sent(server) -> list:
  """The methods the stand-in was asked, in order, without the operations' polls."""
  return [method for method, _ in server.requests if method != "GetOperation"]


def _served(server, name=ENDPOINT) -> tuple:
  """What the endpoint `name` serves: its deployed models' IDs, and its traffic split."""
  endpoint = server.endpoints[name]
  return [model.id for model in endpoint.deployed_models], dict(endpoint.traffic_split)


def test_deploy_creates_an_endpoint_and_gives_the_model_all_of_its_traffic(server):
  serving = endpoints.Serving(machine_type="n1-standard-2", accelerator_type="NVIDIA_TESLA_T4",
                              accelerator_count=1, min_replicas=1, max_replicas=3, spot=True)
  said = []
  done = endpoints.deploy(endpoints.Deployment(PARENT, serving, model=MODEL, display_name="digits"),
                          endpoints.Clients(server.endpoint), say=said.append)

  assert done == endpoints.Deployed(NEW_ENDPOINT, NEW_ID, RUN)
  assert _sent(server) == ["GetModel", "CreateEndpoint", "DeployModel"]
  assert server.requests_of("GetModel")[0].name == MODEL
  (create,) = server.requests_of("CreateEndpoint")
  assert create.parent == PARENT
  assert create.endpoint == types.Endpoint(display_name="digits")
  (request,) = server.requests_of("DeployModel")
  assert request.endpoint == NEW_ENDPOINT
  assert request.deployed_model.model == MODEL
  assert request.deployed_model.display_name == "digits"
  resources = request.deployed_model.dedicated_resources
  assert resources.machine_spec == types.MachineSpec(
      machine_type="n1-standard-2", accelerator_type=types.AcceleratorType.NVIDIA_TESLA_T4,
      accelerator_count=1)
  assert (resources.min_replica_count, resources.max_replica_count) == (1, 3)
  assert resources.spot
  assert dict(request.traffic_split) == {"0": 100}  # "0": the model being deployed.
  assert said == [
      f"creating an endpoint: operation {NEW_ENDPOINT}/operations/100",
      f"created endpoint {NEW_ENDPOINT}",
      f"deploying {MODEL} on {NEW_ENDPOINT} (n1-standard-2 with 1 NVIDIA_TESLA_T4, 1 to 3 "
      f"replicas, Spot VMs): operation {NEW_ENDPOINT}/operations/101",
      f"deployed {MODEL} on {NEW_ENDPOINT} as deployed model {NEW_ID}; it takes all of the "
      "endpoint's traffic"]
  assert _served(server, NEW_ENDPOINT) == ([NEW_ID], {NEW_ID: 100})


@pytest.mark.parametrize("replace", [False, True])
def test_deploy_onto_an_endpoint_serving_another_model(server, replace):
  serving_endpoint(server, ("5", OLD_MODEL, 100))
  said = []
  endpoints.deploy(endpoints.Deployment(PARENT, endpoints.Serving(), model=MODEL,
                                        endpoint=ENDPOINT, replace=replace),
                   endpoints.Clients(server.endpoint), say=said.append)

  (request,) = server.requests_of("DeployModel")
  assert request.endpoint == ENDPOINT
  assert request.deployed_model.model == MODEL
  assert dict(request.traffic_split) == {"0": 100}
  assert said[1] == (f"deployed {MODEL} on {ENDPOINT} as deployed model {NEW_ID}; it takes "
                     "all of the endpoint's traffic")
  if not replace:  # The old model stays, with no traffic, and the log says so.
    assert _sent(server) == ["GetEndpoint", "GetModel", "DeployModel"]
    assert _served(server) == (["5", NEW_ID], {NEW_ID: 100})  # Overwritten: none for 5.
    assert said[-1] == (f"{ENDPOINT} also serves deployed model 5 ({OLD_MODEL}): it stays "
                        "deployed, with no traffic, and billed; undeploy --deployed_model=5 "
                        "takes it off (deploy --replace would have)")
    return
  assert _sent(server) == ["GetEndpoint", "GetModel", "DeployModel", "UndeployModel"]
  (undeploy,) = server.requests_of("UndeployModel")
  assert undeploy.endpoint == ENDPOINT
  assert undeploy.deployed_model_id == "5"
  assert not undeploy.traffic_split  # It has none since the deployment.
  assert _served(server) == ([NEW_ID], {NEW_ID: 100})
  assert said[-2:] == [
      f"undeploying deployed model 5 ({OLD_MODEL}), replaced (--replace): operation "
      f"{ENDPOINT}/operations/101", f"undeployed deployed model 5 from {ENDPOINT}"]


def test_deploy_from_a_run_directory_uploads_its_export_first(server, monkeypatch):
  server.upload_polls = 0
  monkeypatch.setattr(vertex_api, "check_finished", lambda model_dir: {
      "test_accuracy": 0.98, "test_reconstruction_mse": 0.0102} if model_dir == RUN else None)
  done = endpoints.deploy(endpoints.Deployment(PARENT, endpoints.Serving(), model_dir=RUN),
                          endpoints.Clients(server.endpoint), say=[].append)

  assert _sent(server) == ["UploadModel", "CreateEndpoint", "DeployModel"]
  (upload,) = server.requests_of("UploadModel")
  assert upload.parent == PARENT
  assert upload.model.artifact_uri == f"{RUN}/export"
  assert upload.model.container_spec.image_uri == vertex_api.SERVING_IMAGE
  assert upload.model.description == "test accuracy 0.9800, reconstruction MSE 0.0102"
  uploaded = f"{PARENT}/models/{fake_vertex.MODEL_ID}"
  assert server.requests_of("DeployModel")[0].deployed_model.model == uploaded
  assert done == endpoints.Deployed(NEW_ENDPOINT, NEW_ID, RUN)


def json_documents(text: str) -> list:
  """The JSON documents printed one after another in `text`."""
  decoder, documents, at = json.JSONDecoder(), [], 0
  while text[at:].strip():
    at += len(text[at:]) - len(text[at:].lstrip())
    document, at = decoder.raw_decode(text, at)
    documents.append(json.dumps(document))
  return documents


def test_a_dry_run_prints_each_request_as_the_apis_json_and_sends_nothing(server, capsys):
  serving = endpoints.Serving(min_replicas=2, max_replicas=4, spot=True)
  endpoints.deploy(endpoints.Deployment(PARENT, serving, model_dir=RUN, display_name="digits"),
                   endpoints.Clients(server.endpoint), dry_run=True)
  out, err = capsys.readouterr()

  assert err.splitlines() == ["--- ModelService.UploadModel", "--- EndpointService.CreateEndpoint",
                              "--- EndpointService.DeployModel"]
  upload, create, deploy = json_documents(out)
  assert types.UploadModelRequest.from_json(upload) == types.UploadModelRequest(
      parent=PARENT, model=vertex_api.model_for(RUN, "digits", vertex_api.SERVING_IMAGE, {}))
  assert types.CreateEndpointRequest.from_json(create) == types.CreateEndpointRequest(
      parent=PARENT, endpoint=types.Endpoint(display_name="digits"))
  request = types.DeployModelRequest.from_json(deploy)
  assert request.endpoint == f"{PARENT}/endpoints/{endpoints.NEW_ENDPOINT_ID}"
  assert request.deployed_model.model == f"{PARENT}/models/{endpoints.UPLOADED_MODEL_ID}"
  resources = request.deployed_model.dedicated_resources
  assert resources.machine_spec == types.MachineSpec(machine_type="n1-standard-4")
  assert (resources.min_replica_count, resources.max_replica_count, resources.spot) == (2, 4, True)
  assert dict(request.traffic_split) == {"0": 100}
  assert server.requests == []


@pytest.mark.parametrize("keep_endpoint", [False, True])
def test_undeploy_deletes_the_endpoint_once_nothing_is_deployed_on_it(server, keep_endpoint):
  serving_endpoint(server, ("5", OLD_MODEL, 100))
  said = []
  endpoints.undeploy(ENDPOINT, "", keep_endpoint, endpoints.Clients(server.endpoint),
                     say=said.append)

  (request,) = server.requests_of("UndeployModel")
  assert request.endpoint == ENDPOINT
  assert request.deployed_model_id == "5"
  assert not request.traffic_split
  assert said[:2] == [f"undeploying deployed model 5 ({OLD_MODEL}), as asked: operation "
                      f"{ENDPOINT}/operations/100", f"undeployed deployed model 5 from {ENDPOINT}"]
  if keep_endpoint:
    assert _sent(server) == ["GetEndpoint", "UndeployModel"]
    assert _served(server) == ([], {})
    assert said[2:] == [f"kept {ENDPOINT} (--keep_endpoint): with nothing deployed it costs "
                        f"nothing; deploy --endpoint={ENDPOINT} serves from it again"]
    return
  assert _sent(server) == ["GetEndpoint", "UndeployModel", "DeleteEndpoint"]
  assert server.requests_of("DeleteEndpoint")[0].name == ENDPOINT
  assert ENDPOINT not in server.endpoints
  assert said[2:] == [f"deleting {ENDPOINT}: operation {ENDPOINT}/operations/101",
                      f"deleted {ENDPOINT}: nothing was deployed on it any more"]


def test_undeploying_the_model_with_the_traffic_gives_it_to_those_left(server):
  # A rollback: the new model (6) took all traffic from the old one (5), which stayed.
  serving_endpoint(server, ("5", OLD_MODEL, 0), ("6", MODEL, 100))
  said = []
  endpoints.undeploy(ENDPOINT, "6", False, endpoints.Clients(server.endpoint), say=said.append)

  assert _sent(server) == ["GetEndpoint", "UndeployModel"]  # Model 5 is left: no deletion.
  (request,) = server.requests_of("UndeployModel")
  assert (request.endpoint, request.deployed_model_id) == (ENDPOINT, "6")
  assert dict(request.traffic_split) == {"5": 100}
  assert _served(server) == (["5"], {"5": 100})
  assert said[0] == "its 100% of the traffic goes to 5 (100%)"
  assert said[-1] == f"kept {ENDPOINT}: it still serves deployed model 5"


def test_a_removed_models_traffic_goes_to_the_others_in_proportion_adding_up_to_100():
  models = [types.DeployedModel(id=model_id) for model_id in "bcd"]
  assert endpoints.traffic_without({"a": 50, "b": 25, "c": 25, "d": 0}, "a", models) == {
      "b": 50, "c": 50, "d": 0}
  assert endpoints.traffic_without({"a": 1, "b": 33, "c": 33, "d": 33}, "a", models) == {
      "b": 34, "c": 33, "d": 33}
  assert endpoints.traffic_without({"a": 0, "b": 100}, "a", models) == {}  # Left as it is.


def test_undeploy_names_the_deployed_models_where_it_cannot_tell_which(server):
  serving_endpoint(server, ("5", OLD_MODEL, 0), ("6", MODEL, 100))
  clients = endpoints.Clients(server.endpoint)
  with pytest.raises(LaunchError) as raised:
    endpoints.undeploy(ENDPOINT, "", False, clients)
  assert str(raised.value) == (
      f"{ENDPOINT} serves several deployed models: 5 ({OLD_MODEL}, 0% of the traffic), 6 "
      f"({MODEL}, 100% of the traffic); give --deployed_model=ID to say which to take off")
  with pytest.raises(LaunchError, match=f"--deployed_model=7 is not deployed on {ENDPOINT}; it "
                                        "serves 5 "):
    endpoints.undeploy(ENDPOINT, "7", False, clients)
  assert _sent(server) == ["GetEndpoint"] * 2


@pytest.mark.parametrize("plan, sent, message", [
    (dict(model=f"{PARENT}/models/404"), ["GetModel"],
     f"no model {PARENT}/models/404 (Model {PARENT}/models/404 is not found.): gcloud ai "
     "models list --project=p --region=europe-west4 lists them"),
    (dict(model=MODEL, endpoint=f"{PARENT}/endpoints/404"), ["GetEndpoint"],
     f"no endpoint {PARENT}/endpoints/404 (Endpoint {PARENT}/endpoints/404 is not found.): "
     "gcloud ai endpoints list --project=p --region=europe-west4 lists them"),
])
def test_deploy_refuses_a_model_or_endpoint_that_does_not_exist_before_sending(
    server, plan, sent, message):
  with pytest.raises(LaunchError) as raised:
    endpoints.deploy(endpoints.Deployment(PARENT, endpoints.Serving(), **plan),
                     endpoints.Clients(server.endpoint), say=[].append)
  assert str(raised.value) == message
  assert _sent(server) == sent


@pytest.mark.parametrize("make, message", [
    (lambda: endpoints.Serving(min_replicas=3, max_replicas=2), "--max_replicas=2 is below "
     "--min_replicas=3: give a --max_replicas of 3 or more, or leave it out to serve from "
     "--min_replicas machines"),
    (lambda: endpoints.Serving(min_replicas=0), "--min_replicas=0 must be 1 or more: a deployed "
     "model serves from at least one machine"),
    (lambda: endpoints.Serving(accelerator_type="NVIDIA_L4"), "give --accelerator_type and a "
     "positive --accelerator_count together, or neither"),
    (lambda: endpoints.Serving(accelerator_type="T4", accelerator_count=1),
     "unknown --accelerator_type=T4: use Vertex AI's name, e.g. NVIDIA_TESLA_T4 or NVIDIA_L4"),
    (lambda: endpoints.Deployment(PARENT, endpoints.Serving(), model=MODEL, model_dir=RUN),
     "give --model (a registered model's resource name) or --model_dir (a finished run's, "
     "registered first as upload does), not both or neither"),
    (lambda: endpoints.Deployment(PARENT, endpoints.Serving(), model="42"),
     "--model='42' is not a model's resource name (projects/P/locations/R/models/ID, as upload "
     "prints it)"),
    (lambda: endpoints.Deployment(PARENT, endpoints.Serving(), model_dir="runs/model"),
     "--model_dir='runs/model' must be a gs:// path: Vertex AI reads the export from Cloud "
     "Storage (copy it there with gcloud storage cp -r)"),
    (lambda: endpoints.Deployment(PARENT, endpoints.Serving(), model=MODEL, replace=True),
     "--replace needs --endpoint: a new endpoint serves nothing to replace"),
    (lambda: endpoints.Deployment(PARENT, endpoints.Serving(), model=MODEL,
                                  endpoint="projects/p/locations/us-east1/endpoints/1"),
     f"--model={MODEL} and --endpoint=projects/p/locations/us-east1/endpoints/1 are in "
     "different projects or regions: a model is deployed only in its own region"),
    (lambda: endpoints.endpoint_name("1", "", "r"), "--endpoint=1 is an ID: give --project "
     "too, or the full resource name"),
    (lambda: endpoints.endpoint_name(f"{PARENT}/models/1", "p", "r"),
     f"--endpoint='{PARENT}/models/1' is not an endpoint's resource name: "
     "projects/P/locations/R/endpoints/ID"),
])
def test_bad_deployments_are_refused_on_construction(make, message):
  with pytest.raises(LaunchError) as raised:
    make()
  assert str(raised.value) == message


def test_endpoint_names_from_ids_or_resource_names():
  assert endpoints.endpoint_name("12", "p", "r") == "projects/p/locations/r/endpoints/12"
  assert endpoints.endpoint_name(ENDPOINT, "", "r") == ENDPOINT


FASHION = list(sources.FASHION_MNIST_CLASSES)


def run_directory(path, class_names=FASHION, background="dark") -> str:
  """A finished run's directory, as predict reads it: metrics.json and its export."""
  (path / "export").mkdir(parents=True)
  (path / "export" / "saved_model.pb").write_bytes(b"")
  (path / "metrics.json").write_text(json.dumps(
      {"test_accuracy": 0.9, "class_names": class_names, "input_background": background}))
  return str(path)


def images_of(count: int, seed: int, background: int = 0) -> np.ndarray:
  """`count` uint8 28x28 images: a bright square on a dark background, or the reverse."""
  images = np.random.default_rng(seed).integers(0, 30, (count, 28, 28)).astype(np.uint8)
  images[:, 8:20, 8:20] = 220
  return 255 - images if background else images


def label_of(image: np.ndarray) -> int:
  return int(fake_vertex.FakeVertex().classify(image.tolist()))


def test_predict_sends_prepared_instances_and_prints_each_answer_with_its_class_name(
    server, tmp_path, capsys):
  serving_endpoint(server, ("6", MODEL, 100))
  run = run_directory(tmp_path / "run")
  drawing = images_of(1, seed=1, background=255)[0]  # Dark on light: inverted for this run.
  (tmp_path / "coat.png").write_bytes(tf.io.encode_png(drawing[..., np.newaxis]).numpy())
  rows = images_of(2, seed=2)
  np.savez(tmp_path / "items.npz", images=rows)
  paths = [str(tmp_path / "coat.png"), str(tmp_path / "items.npz")]
  options = trainer_predict.Options(model_dir=run)
  clients = endpoints.Clients(server.endpoint)

  assert endpoints.predict(ENDPOINT, paths, options, clients, dry_run=True) == 0
  dry_run = capsys.readouterr()
  assert server.requests == []
  assert endpoints.predict(ENDPOINT, paths, options, clients) == 0
  out, err = capsys.readouterr()

  (request,) = server.requests_of("Predict")
  sent = [255 - drawing, *rows]
  assert request.endpoint == ENDPOINT
  assert [json_format.MessageToDict(value) for value in types.PredictRequest.pb(request).instances
          ] == [image.tolist() for image in sent]
  assert "parameters" not in request and not request.labels
  assert dry_run.err == err + "--- PredictionService.Predict\n"
  assert types.PredictRequest.from_json(dry_run.out) == request
  assert err.splitlines() == [f"note: {paths[0]} has a light background, unlike the images the "
                              "model was trained on; inverted it (--invert=never to keep it)"]
  names = [paths[0], f"{paths[1]}[0]", f"{paths[1]}[1]"]
  assert out.splitlines() == [f"{name}: {label_of(image)} {FASHION[label_of(image)]} (probability "
                              "0.9100)" for name, image in zip(names, sent)]


def test_predict_batches_requests_under_the_online_size_limit(server, tmp_path, capsys):
  serving_endpoint(server, ("6", MODEL, 100))
  run = run_directory(tmp_path / "run", class_names=list(sources.DIGITS))
  images = images_of(7, seed=3)
  np.savez(tmp_path / "digits.npz", images=images)
  one = types.PredictRequest(endpoint=ENDPOINT)
  one.instances.extend([images[0].tolist()])
  # Three instances a request (the cost of one is the same for any pixels: every number is a
  # double).
  base = types.PredictRequest.pb(types.PredictRequest(endpoint=ENDPOINT)).ByteSize()
  limit = base + 3 * (types.PredictRequest.pb(one).ByteSize() - base)

  endpoints.predict(ENDPOINT, [str(tmp_path / "digits.npz")],
                    trainer_predict.Options(model_dir=run), endpoints.Clients(server.endpoint),
                    limit=limit)

  requests = server.requests_of("Predict")
  assert [len(request.instances) for request in requests] == [3, 3, 1]
  assert all(types.PredictRequest.pb(request).ByteSize() <= limit for request in requests)
  assert capsys.readouterr().out.splitlines() == [
      f"{tmp_path / 'digits.npz'}[{index}]: {label_of(image)} (probability 0.9100)"
      for index, image in enumerate(images)]
  # At Vertex AI's limit: 170 images a request, under the stand-in's (Vertex AI's) 1.5 MiB.
  value = types.PredictRequest.pb(one).instances[0]
  assert endpoints.request_sizes([value] * 400, ENDPOINT) == [170, 170, 60]
  assert base + 170 * (types.PredictRequest.pb(one).ByteSize() - base) <= (
      fake_vertex.ONLINE_REQUEST_LIMIT)


def test_predict_refuses_a_file_that_is_not_an_image_before_sending(server, tmp_path, capsys):
  serving_endpoint(server, ("6", MODEL, 100))
  run = run_directory(tmp_path / "run")
  np.savez(tmp_path / "items.npz", images=images_of(2, seed=2))
  (tmp_path / "notes.txt").write_text("not an image")
  paths = [str(tmp_path / "items.npz"), str(tmp_path / "notes.txt")]

  failed = endpoints.predict(ENDPOINT, paths, trainer_predict.Options(model_dir=run),
                             endpoints.Clients(server.endpoint))
  assert failed == 1
  out, err = capsys.readouterr()
  assert err.splitlines() == [f"error: {paths[1]}: not an image; give a PNG, JPEG, GIF or BMP "
                              "image, or .npy/.npz arrays"]
  assert out == ""
  assert server.requests == []


def test_predict_refuses_a_run_that_has_not_finished(server, tmp_path):
  (tmp_path / "run").mkdir()
  with pytest.raises(LaunchError, match="metrics.json: the job has not finished"):
    endpoints.predict(ENDPOINT, ["x.png"], trainer_predict.Options(model_dir=str(tmp_path / "run")),
                      endpoints.Clients(server.endpoint))
  assert server.requests == []
