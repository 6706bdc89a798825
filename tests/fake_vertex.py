"""A stand-in for Vertex AI on a loopback gRPC port, for the launcher's tests.

It serves the methods the launcher calls (JobService's custom, batch prediction and
hyperparameter tuning jobs, ModelService's UploadModel and the long-running operations it
returns) with the SDK's own request and response types, so the real `aiplatform_v1` clients talk
to it as to Google's. It records every request, plays each custom job it creates through
scripted states to a scripted end (an error code and message, as a preempted or failed job
has), gives each tuning job it creates scripted trials, and answers a call with a gRPC error
where a test asks for one.
"""

import collections
from concurrent import futures
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

import grpc
from google.cloud.aiplatform_v1 import types
from google.longrunning import operations_pb2
from google.protobuf import empty_pb2
from google.rpc import status_pb2

JOB_ID = "4321"  # The first custom job's; each one created after it is one more.
MODEL_ID = "987"
BATCH_JOB_ID = "555"
TUNING_JOB_ID = "777"  # The first tuning job's; each one created after it is one more.
State = types.JobState
ENDED = (State.JOB_STATE_SUCCEEDED, State.JOB_STATE_FAILED, State.JOB_STATE_CANCELLED,
         State.JOB_STATE_EXPIRED)


class FakeVertex:
  """Vertex AI's JobService and ModelService on 127.0.0.1; `endpoint` is its address.

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
  still running.
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
        return getattr(self, "_" + method)(request)
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
    return operations_pb2.Operation(name=f"{request.parent}/operations/77", done=False)

  def _GetOperation(self, request):
    if self.upload_polls > 0:
      self.upload_polls -= 1
      return operations_pb2.Operation(name=request.name, done=False)
    parent = request.name.split("/operations/")[0]
    operation = operations_pb2.Operation(name=request.name, done=True)
    operation.response.Pack(types.UploadModelResponse.pb(
        types.UploadModelResponse(model=f"{parent}/models/{MODEL_ID}")))
    return operation


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
