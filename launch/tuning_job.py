"""The Vertex AI HyperparameterTuningJob that tunes the trainer: the settings it searches, checked
with the trainer's own flags and validation before anything is sent, and the study around them.

Each trial is a custom job of the trial spec (what `build_custom_job` makes for `train`) whose
trainer arguments Vertex AI extends with one `--NAME=VALUE` per searched setting; it writes
under BASE_OUTPUT_DIR/<trial id>/, which Vertex AI passes as $AIP_MODEL_DIR (`model/`) and the
like. The trial reports `--metric` at every evaluation (trainer.job.tuning), which early stopping
compares across trials.
"""

import dataclasses
import difflib
import math
from typing import Mapping, Sequence, Tuple

from launch.custom_job import LaunchError
from trainer import cli, errors
from trainer import config as config_lib

PARAMETER_KINDS = ("double", "integer", "discrete", "categorical")
SEARCH_SYNTAX = ("NAME:double:MIN:MAX[:SCALE], NAME:integer:MIN:MAX[:SCALE], "
                 "NAME:discrete:V1,V2,...[:SCALE] or NAME:categorical:V1,V2,...")
# --search's scales, as Vertex AI's ScaleType names them.
SCALES = {"linear": "UNIT_LINEAR_SCALE", "log": "UNIT_LOG_SCALE",
          "reverse_log": "UNIT_REVERSE_LOG_SCALE"}
# --algorithm's choices: Vertex AI's default (Bayesian optimisation) is ALGORITHM_UNSPECIFIED.
ALGORITHMS = {"bayesian": "ALGORITHM_UNSPECIFIED", "grid": "GRID_SEARCH",
              "random": "RANDOM_SEARCH"}
EARLY_STOPPING = ("none", "decay_curve", "median")
# The setting types each kind of parameter may set. Vertex AI writes a discrete value as a
# number an integer flag may not read ("32.0"): integers are searched as integer or categorical.
KIND_SETTING_TYPES = {"double": (float,), "integer": (int, float), "discrete": (float,),
                      "categorical": (str, bool, int, float)}
# Each trial has its own directories, under BASE_OUTPUT_DIR/<trial id>/: one given to all would
# make the run directory's lease refuse every trial but one.
TRIAL_DIRECTORY_FLAGS = ("model_dir", "checkpoint_dir", "tensorboard_dir")
TUNING_METRIC_FLAG = "tuning_metric"  # The trainer's; tune sets it from --metric.
_SETTING_TYPES = {field.name: field.type for field in dataclasses.fields(config_lib.TrainConfig)}
_TYPE_WORDS = {str: "text", bool: "true or false", int: "integers", float: "numbers"}


@dataclasses.dataclass(frozen=True)
class SearchParameter:
  """One trainer setting a tuning job searches, as `--search` gave it (`text`): a `kind` of
  PARAMETER_KINDS over `low` to `high` (double, integer) or over `values` (discrete,
  categorical), on `scale`, a key of SCALES ("" for categorical)."""

  text: str
  name: str
  kind: str
  low: float = 0.0
  high: float = 0.0
  values: Tuple[str, ...] = ()
  scale: str = ""

  @property
  def tried_values(self) -> Tuple[str, ...]:
    """What the trainer is checked with: the bounds of a range, else every value."""
    if self.kind in ("double", "integer"):
      return tuple(_number_text(bound, self.kind) for bound in (self.low, self.high))
    return self.values


def parse_search(text: str) -> SearchParameter:
  """`text`, a --search value (SEARCH_SYNTAX), as a SearchParameter; LaunchError for one that
  does not follow the syntax, or that Vertex AI would refuse (a range whose MIN is not below
  its MAX, a log scale from 0 or below, repeated values). The setting is `check_search`'s."""
  name, _, rest = text.partition(":")
  kind, _, rest = rest.partition(":")
  if not name or kind not in PARAMETER_KINDS or not rest:
    raise _refused(text, f"write it as {SEARCH_SYNTAX}")
  if kind == "categorical":  # A value may hold a colon (npz:PATH), never a scale.
    return SearchParameter(text, name, kind, values=_values(text, rest))
  parts = rest.split(":")
  ranged = kind in ("double", "integer")
  if len(parts) not in ((2, 3) if ranged else (1, 2)):
    raise _refused(text, f"write it as {SEARCH_SYNTAX}")
  scale = parts[2 if ranged else 1] if len(parts) == (3 if ranged else 2) else "linear"
  if scale not in SCALES:
    raise _refused(text, f"unknown scale {scale!r}: choose one of {', '.join(SCALES)}")
  if not ranged:
    values = _values(text, parts[0])
    numbers = sorted(_number(text, value, kind) for value in values)
    return _checked_scale(SearchParameter(text, name, kind, low=numbers[0], high=numbers[-1],
                                          values=tuple(map(str, numbers)), scale=scale))
  low, high = (_number(text, bound, kind) for bound in parts[:2])
  if not low < high:
    raise _refused(text, f"its MIN {parts[0]} must be below its MAX {parts[1]} (a fixed value "
                   "goes after --)")
  return _checked_scale(SearchParameter(text, name, kind, low=low, high=high, scale=scale))


def _refused(text: str, why: str) -> LaunchError:
  return LaunchError(f"--search={text}: {why}")


def _values(text: str, listed: str) -> Tuple[str, ...]:
  """The comma-separated values of a discrete or categorical parameter: distinct, none empty."""
  values = tuple(value.strip() for value in listed.split(","))
  if not all(values):
    raise _refused(text, "a value is empty: list them as V1,V2,...")
  if len(set(values)) < len(values):
    raise _refused(text, "a value is listed twice")
  return values


def _number(text: str, value: str, kind: str) -> float:
  """A bound or value of a numeric parameter: finite, and whole for an integer one."""
  try:
    number = int(value) if kind == "integer" else float(value)
  except ValueError:
    number = None
  if number is None or not math.isfinite(number):
    raise _refused(text, f"{value!r} is not {'an integer' if kind == 'integer' else 'a number'}")
  return number


def _number_text(number: float, kind: str) -> str:
  return str(int(number)) if kind == "integer" else repr(float(number))


def _checked_scale(parameter: SearchParameter) -> SearchParameter:
  """Refuses a log scale over numbers that are not all above 0, as Vertex AI would."""
  if parameter.scale != "linear" and parameter.low <= 0:
    raise _refused(parameter.text, f"a {parameter.scale} scale needs every value above 0")
  return parameter


def check_search(parameters: Sequence[SearchParameter], trainer_args: Sequence[str],
                 environ: Mapping[str, str]) -> None:
  """Raises LaunchError unless each parameter is a setting of the trainer, of a type its kind
  can set, searched once, not among `trainer_args` (the trial's fixed arguments: Vertex AI
  appends --NAME=VALUE, and the trainer refuses a flag given twice), and its bounds or values
  each accepted by the trainer's own flags and validation beside `trainer_args`, on a trial
  whose environment is `environ`. A trial's directories and its metric are not searched."""
  fixed = cli.trainer_flags_given(trainer_args)
  searched = set()
  for parameter in parameters:
    _check_setting(parameter)
    if parameter.name in searched:
      raise _refused(parameter.text, f"--{parameter.name} is searched twice: give it one --search")
    searched.add(parameter.name)
    if parameter.name in fixed:
      raise _refused(parameter.text, f"--{parameter.name} is also fixed after --: Vertex AI "
                     "appends the searched value to the trial's arguments, and the trainer "
                     "refuses a flag given twice; drop one of them")
    for value in parameter.tried_values:
      try:
        cli.check_trainer_arguments([*trainer_args, f"--{parameter.name}={value}"], environ)
      except errors.UserInputError as e:
        raise _refused(parameter.text, f"the trainer refuses {value}: {e}") from None


def _check_setting(parameter: SearchParameter) -> None:
  """Refuses a parameter that is no setting of the trainer, or one its kind cannot set."""
  name, kind = parameter.name, parameter.kind
  if name not in _SETTING_TYPES:
    close = difflib.get_close_matches(name, _SETTING_TYPES, n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    raise _refused(parameter.text, f"{name} is not a setting of the trainer{hint}: "
                   f"{cli.TRAINER_HELP} lists them")
  if name in TRIAL_DIRECTORY_FLAGS or name == TUNING_METRIC_FLAG:
    why = "--metric sets it" if name == TUNING_METRIC_FLAG else "each trial has its own"
    raise _refused(parameter.text, f"--{name} is not searched: {why}")
  if name == "loss_weights":
    raise _refused(parameter.text, "--loss_weights is NAME=WEIGHT pairs, which Vertex AI cannot "
                   "search: search the decoder's weight, --search=decoder_weight:double:1:32:log")
  if _SETTING_TYPES[name] not in KIND_SETTING_TYPES[kind]:
    fits = [other for other, types in KIND_SETTING_TYPES.items()
            if _SETTING_TYPES[name] in types]
    raise _refused(parameter.text, f"--{name} takes {_TYPE_WORDS[_SETTING_TYPES[name]]}, which a "
                   f"{kind} parameter cannot set: make it {' or '.join(fits)}")


def check_trial_arguments(trainer_args: Sequence[str]) -> None:
  """Raises LaunchError for fixed trainer arguments a tuning job cannot take: a trial's
  directories, its metric (tune's --metric) and a --flagfile (its flags could not be checked
  against the searched ones)."""
  given = cli.trainer_flags_given(trainer_args)
  for name in TRIAL_DIRECTORY_FLAGS:
    if name in given:
      raise LaunchError(
          f"trainer argument --{name}: each trial writes under its own directory, "
          "BASE_OUTPUT_DIR/<trial id>/ ($AIP_MODEL_DIR is its model/), and one directory for "
          "all would make its lease refuse every trial but one; drop it")
  if TUNING_METRIC_FLAG in given:
    raise LaunchError(f"trainer argument --{TUNING_METRIC_FLAG}: tune sets it from --metric; "
                      "drop it")
  if any(arg.lstrip("-").split("=")[0] == "flagfile" for arg in trainer_args):
    raise LaunchError("trainer argument --flagfile: a tuning job's trainer arguments are checked "
                      "against its --search, so give them on the command line")


@dataclasses.dataclass(frozen=True)
class Study:
  """What a tuning job searches and how: the parameters, the metric (a key of
  config.TUNING_METRICS) and its goal ("" for the metric's own, the only one accepted), the
  algorithm (a key of ALGORITHMS), early stopping (one of EARLY_STOPPING) and the trial
  counts; validated on construction."""

  parameters: Tuple[SearchParameter, ...]
  metric: str = "validation_accuracy"
  goal: str = ""
  algorithm: str = "bayesian"
  early_stopping: str = "none"
  max_trials: int = 10
  parallel_trials: int = 2
  max_failed_trials: int = 0  # 0: Vertex AI decides.

  def __post_init__(self):
    if not self.parameters:
      raise LaunchError(f"no --search: give a trainer setting to search, as {SEARCH_SYNTAX}")
    if self.metric not in config_lib.TUNING_METRICS:
      raise LaunchError(errors.unknown_choice("metric", self.metric,
                                                  config_lib.TUNING_METRICS))
    own = config_lib.TUNING_METRICS[self.metric]
    if self.goal not in ("", own):
      raise LaunchError(f"--goal={self.goal}: {self.metric} is to {own}; drop --goal (its "
                        f"default is the metric's goal) or choose another --metric")
    if self.algorithm not in ALGORITHMS or self.early_stopping not in EARLY_STOPPING:
      raise LaunchError(f"--algorithm must be one of {', '.join(ALGORITHMS)}, --early_stopping "
                        f"one of {', '.join(EARLY_STOPPING)}")
    self._check_counts()
    doubles = [p.text for p in self.parameters if p.kind == "double"]
    if self.algorithm == "grid" and doubles:
      raise LaunchError(f"--algorithm=grid cannot search a double range (--search={doubles[0]}): "
                        "list its values as NAME:discrete:V1,V2,... or choose another --algorithm")

  def _check_counts(self) -> None:
    if self.max_trials < 1:
      raise LaunchError(f"--max_trials={self.max_trials} must be 1 or more")
    if not 1 <= self.parallel_trials <= self.max_trials:
      raise LaunchError(f"--parallel_trials={self.parallel_trials} must be between 1 and "
                        f"--max_trials ({self.max_trials})")
    if self.max_failed_trials < 0:
      raise LaunchError(f"--max_failed_trials={self.max_failed_trials} must be 0 (Vertex AI "
                        "decides) or more")


def _parameter_spec(parameter: SearchParameter):
  """The study's `ParameterSpec` of `parameter`."""
  from google.cloud.aiplatform_v1 import types
  spec = types.StudySpec.ParameterSpec
  made = spec(parameter_id=parameter.name)
  if parameter.kind == "double":
    made.double_value_spec = spec.DoubleValueSpec(min_value=parameter.low,
                                                  max_value=parameter.high)
  elif parameter.kind == "integer":
    made.integer_value_spec = spec.IntegerValueSpec(min_value=int(parameter.low),
                                                    max_value=int(parameter.high))
  elif parameter.kind == "discrete":
    made.discrete_value_spec = spec.DiscreteValueSpec(values=[float(v) for v in parameter.values])
  else:
    made.categorical_value_spec = spec.CategoricalValueSpec(values=list(parameter.values))
  if parameter.scale:
    made.scale_type = spec.ScaleType[SCALES[parameter.scale]]
  return made


def study_spec(study: Study):
  """The job's `StudySpec`: its parameters, metric and goal, algorithm and stopping rule. Early
  stopping goes by the trials' global steps, not their running time, which queueing and a
  machine's speed would skew."""
  from google.cloud.aiplatform_v1 import types
  spec = types.StudySpec
  goal = config_lib.TUNING_METRICS[study.metric].upper()
  made = spec(metrics=[spec.MetricSpec(metric_id=study.metric,
                                       goal=spec.MetricSpec.GoalType[goal])],
              parameters=[_parameter_spec(parameter) for parameter in study.parameters],
              algorithm=spec.Algorithm[ALGORITHMS[study.algorithm]])
  if study.early_stopping == "decay_curve":
    made.decay_curve_stopping_spec = spec.DecayCurveAutomatedStoppingSpec(
        use_elapsed_duration=False)
  elif study.early_stopping == "median":
    made.median_automated_stopping_spec = spec.MedianAutomatedStoppingSpec(
        use_elapsed_duration=False)
  return made


def build_tuning_job(study: Study, trial_job, display_name: str):
  """The `HyperparameterTuningJob` of `study` whose trials run `trial_job` (a CustomJob, as
  `build_custom_job` makes it, its trainer arguments ending with --tuning_metric)."""
  from google.cloud.aiplatform_v1 import types
  return types.HyperparameterTuningJob(
      display_name=display_name, study_spec=study_spec(study),
      max_trial_count=study.max_trials, parallel_trial_count=study.parallel_trials,
      max_failed_trial_count=study.max_failed_trials, trial_job_spec=trial_job.job_spec)
