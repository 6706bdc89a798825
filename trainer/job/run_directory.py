"""The run directory: the name of every file and folder a job keeps under --model_dir.

One module names them, so that the job, `trainer.evaluate`, `trainer.predict`, the launchers
and the benchmarks agree on where a run's pieces are. Names and paths only: it imports no
TensorFlow (the launchers import it), and joins paths as strings, so gs:// works as a local
path does. What the files hold is for their writers (`trainer.job.outputs` and the modules it
names).

    MODEL_DIR/
      checkpoints/              (or --checkpoint_dir)
      config.json               the settings, from the first checkpoint on
      history.json              each epoch's record
      tuning_evaluations.json   a tuning trial's evaluations between epoch ends
      lease.json                the job that holds the directory
      logs/train, validation, report   TensorBoard runs (or --tensorboard_dir)
      export/                   saved_model.pb, variables/, model.keras
      report/report.md          and its images
      metrics.json              written last: the outputs beside it are complete
"""

import dataclasses
import os

CHECKPOINTS = "checkpoints"
CONFIG = "config.json"
HISTORY = "history.json"
TUNING_RECORD = "tuning_evaluations.json"
LEASE = "lease.json"
LOGS = "logs"
EXPORT = "export"
KERAS_FILE = "model.keras"  # In the export, beside the SavedModel.
SAVED_MODEL = "saved_model.pb"  # The SavedModel's graph, in the export.
REPORT = "report"
REPORT_PAGE = "report.md"  # In the report folder, beside its images.
METRICS = "metrics.json"


@dataclasses.dataclass(frozen=True)
class RunDirectory:
  """The paths of one run. `checkpoint_dir` and `tensorboard_dir` stand in for the folders
  under `model_dir` where they are given (--checkpoint_dir, --tensorboard_dir)."""
  model_dir: str
  checkpoint_dir: str = ""
  tensorboard_dir: str = ""

  def _path(self, *names: str) -> str:
    return os.path.join(self.model_dir, *names)

  @property
  def checkpoints(self) -> str:
    return self.checkpoint_dir or self._path(CHECKPOINTS)

  @property
  def own_checkpoints(self) -> str:
    """Where checkpoints go without --checkpoint_dir: where an older run may have left them."""
    return self._path(CHECKPOINTS)

  @property
  def config(self) -> str:
    return self._path(CONFIG)

  @property
  def history(self) -> str:
    return self._path(HISTORY)

  @property
  def tuning_record(self) -> str:
    return self._path(TUNING_RECORD)

  @property
  def lease(self) -> str:
    return self._path(LEASE)

  @property
  def logs(self) -> str:
    return self.tensorboard_dir or self._path(LOGS)

  def tensorboard_run(self, name: str) -> str:
    """The folder of TensorBoard's run `name` (train, validation, report)."""
    return os.path.join(self.logs, name)

  @property
  def export(self) -> str:
    return self._path(EXPORT)

  @property
  def keras_file(self) -> str:
    return self._path(EXPORT, KERAS_FILE)

  @property
  def saved_model(self) -> str:
    return self._path(EXPORT, SAVED_MODEL)

  @property
  def export_variables_index(self) -> str:
    return self._path(EXPORT, "variables", "variables.index")

  @property
  def report(self) -> str:
    return self._path(REPORT)

  @property
  def report_page(self) -> str:
    return self._path(REPORT, REPORT_PAGE)

  @property
  def metrics(self) -> str:
    return self._path(METRICS)


def on_vertex(base_output_dir: str) -> RunDirectory:
  """Where a Vertex AI custom job's pieces go under its base output directory: the run
  directory in `model/`, checkpoints and TensorBoard logs beside it (Vertex AI sets
  $AIP_MODEL_DIR, $AIP_CHECKPOINT_DIR and $AIP_TENSORBOARD_LOG_DIR so)."""
  base = base_output_dir.rstrip("/")
  return RunDirectory(f"{base}/model", f"{base}/{CHECKPOINTS}", f"{base}/{LOGS}")


def of(model_dir: str) -> RunDirectory:
  """The run directory at `model_dir` (a trailing slash ignored), with its own folders."""
  return RunDirectory(model_dir.rstrip("/") or model_dir)
