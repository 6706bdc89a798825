"""A stand-in for Vertex AI on a loopback gRPC port, for the launcher's tests.

It serves the methods the launcher calls (JobService's custom, batch prediction and
hyperparameter tuning jobs, ModelService's UploadModel and the long-running operations it
returns, and GetModel; EndpointService's endpoints, the models deployed on them and their
long-running operations; PredictionService's online predictions) with the SDK's own request and
response types, so the real `aiplatform_v1` clients talk to it as to Google's. It records every
request, plays each custom job it creates through scripted states to a scripted end (an error
code and message, as a preempted or failed job has), gives each tuning job it creates scripted
trials, keeps the registered models and the
endpoints with what they serve as Vertex AI does (refusing as it does), answers each online
prediction as a model of this trainer would, and answers a call with a gRPC error where a test
asks for one.
"""

import collections
from concurrent import futures
import datetime
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import grpc
from google.cloud.aiplatform_v1 import types
from google.longrunning import operations_pb2
from google.protobuf import empty_pb2
from google.protobuf import json_format
from google.protobuf import struct_pb2
from google.rpc import status_pb2

JOB_ID = "4321"  # The first custom job's; each one created after it is one more.
MODEL_ID = "987"
BATCH_JOB_ID = "555"
TUNING_JOB_ID = "777"  # The first tuning job's; each one created after it is one more.
ENDPOINT_ID = "3000"  # The first endpoint's; each one created after it is one more.
DEPLOYED_MODEL_ID = "800"  # The first deployed model's; likewise.
# Vertex AI's online prediction limit: a larger request is answered INVALID_ARGUMENT.
ONLINE_REQUEST_LIMIT = 1_572_864
State = types.JobState
ENDED = (State.JOB_STATE_SUCCEEDED, State.JOB_STATE_FAILED, State.JOB_STATE_CANCELLED,
         State.JOB_STATE_EXPIRED)


class Refusal(Exception):
  """A call answered with a gRPC error, as Vertex AI answers it: `code` (grpc.StatusCode) and
  `message`."""

  def __init__(self, code: grpc.StatusCode, message: str):
    super().__init__(message)
    self.code, self.message = code, message


def _now() -> datetime.datetime:
  """Now, in microseconds: a later resource's create_time is later."""
  time.sleep(1e-6)
  return datetime.datetime.now(datetime.timezone.utc)


class FakeVertex:
  """Vertex AI's JobService, ModelService, EndpointService and PredictionService on
  127.0.0.1; `endpoint` is its address.

  `states` are what successive GetCustomJob (or GetBatchPredictionJob, or
  GetHyperparameterTuningJob) calls answer (the last one repeats); `job_error` is the failed
  job's message (code INTERNAL). A tuning job it created is read back as created, in the next
  of `states`, with `trials` (types.Trial) as its trials. `runs` script the
  custom jobs it creates, in order, each its own: a (states, error) pair, the states its
  GetCustomJob calls answer (the last repeats) and the (status code, message) it ends with, or
  None; a job beyond them, or one it did not create, plays `states` and `job_error`.
  `errors[method]` holds what the next calls of `method` answer with, in order: a (status code,
  message) pair, or None for the usual answer; `delays[method]` is how long each call of
  `method` takes, in seconds; `upload_polls` is how many GetOperation calls find the upload
  still running, `operation_polls` the same for each endpoint operation (create, deploy,
  undeploy, delete). `models` are the registered models by name (an upload adds its model; with
  `models_exist`, any model name is taken as registered); `endpoints` are the endpoints by name,
  each with its deployed models and traffic split. A prediction's class is
  `classify(instance)`, the instance as nested lists of pixels.
  """

  def __init__(self, states: Sequence[int] = (State.JOB_STATE_PENDING,
                                              State.JOB_STATE_RUNNING,
                                              State.JOB_STATE_SUCCEEDED),
               job_error: str = "", upload_polls: int = 1):
    self.states = list(states)
    self.job_error = job_error
    self.upload_polls = upload_polls
    self.runs: List[Tuple[Sequence[int], Optional[Tuple[grpc.StatusCode, str]]]] = []
    self.errors: Dict[str, List[Optional[Tuple[grpc.StatusCode, str]]]] = (
        collections.defaultdict(list))
    self.delays: Dict[str, float] = {}
    self.trials: List[types.Trial] = []
    self.operation_polls = 0
    self.models: Dict[str, types.Model] = {}
    self.models_exist = False
    self.endpoints: Dict[str, types.Endpoint] = {}
    self.classify: Callable[[list], int] = lambda pixels: sum(map(sum, pixels)) % 10
    self._operations = {}  # An operation's name: [GetOperation calls left before done, result].
    self._created_endpoints = 0
    self._deployed_models = 0
    self.requests: List[Tuple[str, object]] = []
    self.metadata: List[dict] = []
    self._gets = 0
    self._jobs = {}
    self._tuning_jobs = {}
    self._runs_of = {}  # A created custom job's name: its script and how often it was read.
    self._server = None
    self.endpoint = ""

  def start(self) -> "FakeVertex":
    """Serves on a free loopback port, named by `endpoint`; returns self."""
    def unary(method, request_type, response_serializer):
      def handle(request, context):
        self.requests.append((method, request))
        self.metadata.append(dict(context.invocation_metadata()))
        time.sleep(self.delays.get(method, 0.0))
        error = self.errors[method].pop(0) if self.errors[method] else None
        if error:
          context.abort(*error)
        try:
          return getattr(self, "_" + method)(request)
        except Refusal as refusal:
          context.abort(refusal.code, refusal.message)
      return grpc.unary_unary_rpc_method_handler(
          handle, request_deserializer=request_type, response_serializer=response_serializer)

    handlers = [
        grpc.method_handlers_generic_handler("google.cloud.aiplatform.v1.JobService", {
            "CreateCustomJob": unary("CreateCustomJob", types.CreateCustomJobRequest.deserialize,
                                     types.CustomJob.serialize),
            "GetCustomJob": unary("GetCustomJob", types.GetCustomJobRequest.deserialize,
                                  types.CustomJob.serialize),
            "CancelCustomJob": unary("CancelCustomJob", types.CancelCustomJobRequest.deserialize,
                                     empty_pb2.Empty.SerializeToString),
            "CreateBatchPredictionJob": unary(
                "CreateBatchPredictionJob", types.CreateBatchPredictionJobRequest.deserialize,
                types.BatchPredictionJob.serialize),
            "CancelBatchPredictionJob": unary(
                "CancelBatchPredictionJob", types.CancelBatchPredictionJobRequest.deserialize,
                empty_pb2.Empty.SerializeToString),
            "GetBatchPredictionJob": unary(
                "GetBatchPredictionJob", types.GetBatchPredictionJobRequest.deserialize,
                types.BatchPredictionJob.serialize),
            "CreateHyperparameterTuningJob": unary(
                "CreateHyperparameterTuningJob",
                types.CreateHyperparameterTuningJobRequest.deserialize,
                types.HyperparameterTuningJob.serialize),
            "GetHyperparameterTuningJob": unary(
                "GetHyperparameterTuningJob", types.GetHyperparameterTuningJobRequest.deserialize,
                types.HyperparameterTuningJob.serialize),
            "CancelHyperparameterTuningJob": unary(
                "CancelHyperparameterTuningJob",
                types.CancelHyperparameterTuningJobRequest.deserialize,
                empty_pb2.Empty.SerializeToString),
        }),
        grpc.method_handlers_generic_handler("google.cloud.aiplatform.v1.ModelService", {
            "UploadModel": unary("UploadModel", types.UploadModelRequest.deserialize,
                                 operations_pb2.Operation.SerializeToString),
            "GetModel": unary("GetModel", types.GetModelRequest.deserialize,
                              types.Model.serialize),
        }),
        grpc.method_handlers_generic_handler("google.cloud.aiplatform.v1.EndpointService", {
            method: unary(method, request_type.deserialize, response_serializer)
            for method, request_type, response_serializer in (
                ("CreateEndpoint", types.CreateEndpointRequest,
                 operations_pb2.Operation.SerializeToString),
                ("GetEndpoint", types.GetEndpointRequest, types.Endpoint.serialize),
                ("DeployModel", types.DeployModelRequest,
                 operations_pb2.Operation.SerializeToString),
                ("UndeployModel", types.UndeployModelRequest,
                 operations_pb2.Operation.SerializeToString),
                ("DeleteEndpoint", types.DeleteEndpointRequest,
                 operations_pb2.Operation.SerializeToString))
        }),
        grpc.method_handlers_generic_handler("google.cloud.aiplatform.v1.PredictionService", {
            "Predict": unary("Predict", types.PredictRequest.deserialize,
                             types.PredictResponse.serialize),
        }),
        grpc.method_handlers_generic_handler("google.longrunning.Operations", {
            "GetOperation": unary("GetOperation", operations_pb2.GetOperationRequest.FromString,
                                  operations_pb2.Operation.SerializeToString),
        }),
    ]
    self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), handlers=handlers)
    port = self._server.add_insecure_port("127.0.0.1:0")  # Loopback only; the OS picks a port.
    self._server.start()
    self.endpoint = f"127.0.0.1:{port}"
    return self

  def stop(self) -> None:
    """Stops serving at once."""
    self._server.stop(0)

  def requests_of(self, method: str) -> list:
    """The requests `method` received, in order."""
    return [request for name, request in self.requests if name == method]

  def _CreateCustomJob(self, request):
    job = types.CustomJob(request.custom_job)
    job.name = f"{request.parent}/customJobs/{int(JOB_ID) + len(self._jobs)}"
    job.state = State.JOB_STATE_QUEUED
    if len(self._jobs) < len(self.runs):
      self._runs_of[job.name] = [*self.runs[len(self._jobs)], 0]
    self._jobs[job.name] = job
    return job

  def _GetCustomJob(self, request):
    job = types.CustomJob(self._jobs.get(request.name, types.CustomJob(name=request.name)))
    if request.name not in self._runs_of:
      job.state = self._next_state()
      if job.state == State.JOB_STATE_FAILED:
        job.error = status_pb2.Status(code=grpc.StatusCode.INTERNAL.value[0],
                                      message=self.job_error)
      return job
    run = self._runs_of[request.name]
    states, error, gets = run
    run[2] += 1
    job.state = states[min(gets, len(states) - 1)]
    if error and job.state in ENDED:
      job.error = status_pb2.Status(code=error[0].value[0], message=error[1])
    return job

  def _next_state(self):
    state = self.states[min(self._gets, len(self.states) - 1)]
    self._gets += 1
    return state

  def _CancelCustomJob(self, request):
    return empty_pb2.Empty()

  def _CreateBatchPredictionJob(self, request):
    job = types.BatchPredictionJob(request.batch_prediction_job)
    job.name = f"{request.parent}/batchPredictionJobs/{BATCH_JOB_ID}"
    job.state = State.JOB_STATE_PENDING
    return job

  def _CancelBatchPredictionJob(self, request):
    return empty_pb2.Empty()

  def _GetBatchPredictionJob(self, request):
    return types.BatchPredictionJob(name=request.name, state=self._next_state())

  def _CreateHyperparameterTuningJob(self, request):
    job = types.HyperparameterTuningJob(request.hyperparameter_tuning_job)
    job.name = (f"{request.parent}/hyperparameterTuningJobs/"
                f"{int(TUNING_JOB_ID) + len(self._tuning_jobs)}")
    job.state = State.JOB_STATE_PENDING
    self._tuning_jobs[job.name] = job
    return job

  def _GetHyperparameterTuningJob(self, request):
    job = types.HyperparameterTuningJob(self._tuning_jobs.get(
        request.name, types.HyperparameterTuningJob(name=request.name)))
    job.state = self._next_state()
    job.trials = self.trials
    if job.state == State.JOB_STATE_FAILED:
      job.error = status_pb2.Status(code=grpc.StatusCode.INTERNAL.value[0], message=self.job_error)
    return job

  def _CancelHyperparameterTuningJob(self, request):
    return empty_pb2.Empty()

  def _UploadModel(self, request):
    name = f"{request.parent}/models/{MODEL_ID}"
    self.models[name] = types.Model(request.model, name=name)
    return self._operation(f"{request.parent}/operations/77",
                           types.UploadModelResponse(model=name), self.upload_polls)

  def _operation(self, name: str, result, polls: int):
    """A new long-running operation `name`, done after `polls` GetOperation calls find it
    running, with `result` (a message) as its response."""
    self._operations[name] = [polls, result]
    return operations_pb2.Operation(name=name, done=False)

  def _GetOperation(self, request):
    if request.name not in self._operations:
      raise Refusal(grpc.StatusCode.NOT_FOUND, f"Operation {request.name} not found.")
    state = self._operations[request.name]
    if state[0] > 0:
      state[0] -= 1
      return operations_pb2.Operation(name=request.name, done=False)
    operation = operations_pb2.Operation(name=request.name, done=True)
    result = state[1]  # A proto-plus message, or a protobuf one (Empty).
    operation.response.Pack(result if isinstance(result, empty_pb2.Empty)
                            else type(result).pb(result))
    return operation

  def _GetModel(self, request):
    if request.name in self.models:
      return self.models[request.name]
    if self.models_exist:
      return types.Model(name=request.name)
    raise Refusal(grpc.StatusCode.NOT_FOUND, f"Model {request.name} is not found.")

  def _endpoint(self, name: str) -> types.Endpoint:
    if name not in self.endpoints:
      raise Refusal(grpc.StatusCode.NOT_FOUND, f"Endpoint {name} is not found.")
    return self.endpoints[name]

  def _endpoint_operation(self, endpoint: str, result):
    return self._operation(f"{endpoint}/operations/{100 + len(self._operations)}", result,
                           self.operation_polls)

  def _CreateEndpoint(self, request):
    name = f"{request.parent}/endpoints/{int(ENDPOINT_ID) + self._created_endpoints}"
    self._created_endpoints += 1
    self.endpoints[name] = types.Endpoint(request.endpoint, name=name, create_time=_now())
    return self._endpoint_operation(name, self.endpoints[name])

  def _GetEndpoint(self, request):
    return self._endpoint(request.name)

  def _DeployModel(self, request):
    endpoint = self._endpoint(request.endpoint)
    self._GetModel(types.GetModelRequest(name=request.deployed_model.model))
    deployed = types.DeployedModel(
        request.deployed_model, id=str(int(DEPLOYED_MODEL_ID) + self._deployed_models),
        create_time=_now())
    self._deployed_models += 1
    split = {(deployed.id if key == "0" else key): value
             for key, value in request.traffic_split.items()}
    if not split:  # The first model takes all traffic; a later one none.
      split = {**endpoint.traffic_split, deployed.id: 0 if endpoint.deployed_models else 100}
    endpoint.deployed_models.append(deployed)
    self._check_traffic(endpoint, split)
    endpoint.traffic_split = split
    return self._endpoint_operation(endpoint.name,
                                    types.DeployModelResponse(deployed_model=deployed))

  @staticmethod
  def _check_traffic(endpoint: types.Endpoint, split: Dict[str, int]) -> None:
    """Refuses, as Vertex AI does, a split that is not of the endpoint's deployed models or does
    not add up to 100."""
    deployed = {model.id for model in endpoint.deployed_models}
    if not set(split) <= deployed or sum(split.values()) != 100:
      raise Refusal(grpc.StatusCode.INVALID_ARGUMENT,
                    f"Invalid traffic split {dict(split)}: the deployed models are "
                    f"{sorted(deployed)}, and the percentages must add up to 100.")

  def _UndeployModel(self, request):
    endpoint = self._endpoint(request.endpoint)
    remaining = [model for model in endpoint.deployed_models
                 if model.id != request.deployed_model_id]
    if len(remaining) == len(endpoint.deployed_models):
      raise Refusal(grpc.StatusCode.NOT_FOUND, f"Deployed model {request.deployed_model_id} is "
                    f"not found on {endpoint.name}.")
    split = dict(request.traffic_split or endpoint.traffic_split)
    if remaining and split.get(request.deployed_model_id):
      raise Refusal(grpc.StatusCode.FAILED_PRECONDITION,
                    f"Deployed model {request.deployed_model_id} has traffic; give a traffic "
                    "split that assigns it none.")
    split.pop(request.deployed_model_id, None)
    del endpoint.deployed_models[:]
    endpoint.deployed_models.extend(remaining)
    if remaining:
      self._check_traffic(endpoint, split)
    endpoint.traffic_split = split if remaining else {}
    return self._endpoint_operation(endpoint.name, types.UndeployModelResponse())

  def _DeleteEndpoint(self, request):
    endpoint = self._endpoint(request.name)
    if endpoint.deployed_models:
      raise Refusal(grpc.StatusCode.FAILED_PRECONDITION,
                    f"Endpoint {request.name} has deployed models; undeploy them first.")
    del self.endpoints[request.name]
    return self._endpoint_operation(request.name, empty_pb2.Empty())

  def _Predict(self, request):
    """Answers each instance as this trainer's export does: `classify`'s class with
    probability 0.91 (0.01 for each other), and the image as its reconstruction."""
    endpoint = self._endpoint(request.endpoint)
    size = types.PredictRequest.pb(request).ByteSize()
    if size > ONLINE_REQUEST_LIMIT:
      raise Refusal(grpc.StatusCode.INVALID_ARGUMENT, f"Request payload size {size} exceeds "
                    f"the limit: {ONLINE_REQUEST_LIMIT} bytes.")
    if not endpoint.deployed_models:
      raise Refusal(grpc.StatusCode.FAILED_PRECONDITION,
                    f"Endpoint {endpoint.name} has no deployed model.")
    serving = max(endpoint.deployed_models,
                  key=lambda model: endpoint.traffic_split.get(model.id, 0))
    predictions = []
    for instance in types.PredictRequest.pb(request).instances:
      pixels = json_format.MessageToDict(instance)
      label = self.classify(pixels)
      predictions.append(json_format.ParseDict({
          "classifier": [0.91 if digit == label else 0.01 for digit in range(10)],
          "decoder": [[value / 255 for value in row] for row in pixels]}, struct_pb2.Value()))
    return types.PredictResponse.wrap(types.PredictResponse.pb()(
        predictions=predictions, deployed_model_id=serving.id, model=serving.model,
        model_display_name=serving.display_name))


def main(argv: Sequence[str]) -> None:
  """Serves until Ctrl-C, printing each request as the API's JSON: a way to watch what the
  launcher sends (`python -m tests.fake_vertex`, then --api_endpoint=THE_ADDRESS). Given a
  google.rpc code's name and a message (`python -m tests.fake_vertex RESOURCE_EXHAUSTED
  'Resources are insufficient in region'`), every custom job it creates has failed with them."""
  from launch import vertex_api
  if len(argv) not in (0, 2) or argv and argv[0] not in grpc.StatusCode.__members__:
    sys.exit("usage: python -m tests.fake_vertex [CODE MESSAGE], CODE a google.rpc.Code name")

  class Printing(FakeVertex):
    def __init__(self):
      super().__init__()
      self.requests = _PrintingList()
      self.models_exist = True  # So that deploy may be tried with no upload first.

    def _CreateCustomJob(self, request):
      if argv:  # This job's script: it has ended, with the error given.
        self.runs.append(([State.JOB_STATE_FAILED], (grpc.StatusCode[argv[0]], argv[1])))
      return super()._CreateCustomJob(request)

  class _PrintingList(list):
    def append(self, item):
      method, request = item
      body = (vertex_api.to_json(request) if hasattr(type(request), "to_json")
              else str(request).strip())
      print(f"--- {method}\n{body}", flush=True)
      super().append(item)

  fake = Printing().start()
  print(f"listening on {fake.endpoint}", flush=True)
  try:
    while True:
      time.sleep(3600)
  except KeyboardInterrupt:
    fake.stop()


if __name__ == "__main__":
  main(sys.argv[1:])
