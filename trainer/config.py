"""The job's configuration: one validated dataclass of settings.

Each setting is one field, made by `setting()` with its help, `--help` group, check and rule on
restart; the flags (`trainer.task`), `RESUME_RULES` and the README's restart table come from
them. Below the entry point all takes a `TrainConfig`: tests and notebooks can build one.
"""

import dataclasses
import difflib
import json
import math
import os
from typing import Callable, Dict, Mapping, Optional, Sequence

from trainer.errors import unknown_choice, UserInputError
from trainer.multitask import CLASSIFIER, DECODER, OUTPUT_NAMES


STRATEGIES = ("auto", "default", "one_device", "mirrored", "multi_worker_mirrored", "tpu")
PRECISIONS = ("auto", "float32", "mixed_float16", "mixed_bfloat16")
LOSS_WEIGHTINGS = ("fixed", "uncertainty")
# What the classifier learns from the unlabelled images of a semi-supervised run (trainer.multitask.losses):
# none, the labels of its own confident answers (FixMatch), or agreement between two views.
UNLABELED_LOSSES = ("none", "pseudo_label", "consistency")
# Cross-entropy at 1.0, the reconstruction's MSE at 8.0: measured on Fashion-MNIST, the classic
# starting point's 0.2 leaves the reconstruction well behind a 32-component PCA, and a heavier
# reconstruction helps the classifier too (benchmarks/README.md).
DEFAULT_LOSS_WEIGHTS = {CLASSIFIER: 1.0, DECODER: 8.0}
# --decoder_weight's default: no weight of its own, --loss_weights' decoder weight stands.
DECODER_WEIGHT_FROM_LOSS_WEIGHTS = -1.0

# What a Vertex AI tuning job can optimise (the trial reports it, trainer.job.tuning), with its goal:
# the validation metrics of each evaluation.
TUNING_METRICS = {"validation_accuracy": "maximize", "validation_reconstruction_mse": "minimize"}

# --dataset is one of DATASETS, or KIND:ARGUMENT with KIND one of DATASET_KINDS
# (trainer.data.sources.load_splits reads each; this is only the name, checked without TensorFlow).
DATASETS = ("mnist", "mnist_sample")
DATASET_KINDS = ("tfds", "idx", "npz")

# The sections of --help, in the order it shows them; each setting names its own.
DATA, SEMI_SUPERVISED, DISTRIBUTION, TRAINING, OUTPUTS, FAULTS = (
    "data", "semi-supervised", "distribution", "training", "outputs",
    "faults (checkpoints, resuming, reproducing)")
HELP_GROUPS = (DATA, SEMI_SUPERVISED, DISTRIBUTION, TRAINING, OUTPUTS, FAULTS)

# What a restart may change: RESTART_ROWS is the README's table, a row per rule, what a change
# does and what the rule's settings share. Another number of input pipelines (workers) shuffles
# each one's shard differently: an epoch boundary resumes exactly, mid-epoch the rest of the
# epoch is drawn from another order (the README says so below the table).
REFUSED, ALLOWED, EXTENDING = "refused", "allowed", "extending"
RESTART_ROWS = {
    REFUSED: ("refused, one `error:` line naming each change, no file touched",
              "they change what the remaining steps compute or the order of the data"),
    ALLOWED: ("allowed, logged",
              "paths (a run may be copied), the peak learning rate (a divergence's message "
              "advises lowering it), how the steps run and what is saved or logged when"),
    EXTENDING: ("extending",
                "a larger value trains on, the cosine schedule stretched over the new total, so "
                "the rate rises again (20 to 30 epochs resumes at a quarter of the peak); the log "
                "says so, with the rate where it resumes. Fewer epochs than a finished job "
                "trained: it says the job is finished and where its results are; fewer than an "
                "unfinished job's checkpoint has trained: refused"),
}


def requirement(holds: Callable[[object], bool], wording: str) -> Callable[[object, str], None]:
  """A setting's check: `check(value, name)` raises UserInputError unless `holds(value)`,
  saying "--name=value WORDING"."""
  def check(value, name: str) -> None:
    if not holds(value):  # `not`: a NaN holds nothing.
      raise UserInputError(f"{_as_flag(name, value)} {wording}")
  return check


POSITIVE = requirement(lambda value: value > 0, "must be positive")
# A bool is an int to Python, not to a user.
POSITIVE_INTEGER = requirement(
    lambda value: isinstance(value, int) and not isinstance(value, bool) and value > 0,
    "must be a positive integer")
ZERO_OR_MORE = requirement(lambda value: value >= 0, "must be zero or more")


def finite(value) -> bool:
  """Whether a setting's value holds no infinity or NaN: a float, or each float of a dict (the
  weights of --loss_weights); values of other types are finite."""
  numbers = value.values() if isinstance(value, dict) else (value,)
  return all(math.isfinite(number) for number in numbers if isinstance(number, float))


def between(low, high, note: str = "") -> Callable[[object, str], None]:
  """A check accepting `low <= value <= high`; `note` follows the refusal, e.g. the unit."""
  return requirement(lambda value: low <= value <= high, f"must be between {low} and {high}{note}")


def check_dataset_name(dataset: str, name: str = "dataset") -> None:
  """Raises UserInputError unless `dataset` names a kind of source --dataset takes.

  Only the name: whether the files or the TFDS set exist is for `sources.load_splits` to find
  out.
  """
  kind, _, argument = dataset.partition(":")
  if dataset in DATASETS or (kind in DATASET_KINDS and argument):
    return
  close = difflib.get_close_matches(dataset, DATASETS, n=1)
  hint = f" (did you mean {close[0]}?)" if close else ""
  raise UserInputError(f"unknown --{name}={dataset!r}{hint}: use mnist, mnist_sample, "
                       "tfds:NAME, idx:DIR or npz:PATH")


def setting(default, group: str, restart: str, *, help: str,  # pylint: disable=redefined-builtin
            check: Optional[Callable] = None, choices: Sequence[str] = (), env: str = ""):
  """A field of TrainConfig that is one setting: a flag of its name, shown under `group`.

  `group` is one of HELP_GROUPS, `restart` one of REFUSED, ALLOWED, EXTENDING. Construction
  refuses a value outside `choices` (when given; the flag is then an enum) or one `check`
  refuses (`check(value, name)` raises UserInputError: see `requirement`). Where `env` names
  an environment variable that is set, its value is the flag's default. A dict default is
  copied for each configuration.
  """
  if group not in HELP_GROUPS or restart not in RESTART_ROWS:
    raise ValueError(f"setting: unknown group {group!r} or restart rule {restart!r}")
  metadata = {"help": help, "group": group, "restart": restart, "check": check,
              "choices": tuple(choices), "env": env}
  if isinstance(default, dict):
    return dataclasses.field(default_factory=lambda: dict(default), metadata=metadata)
  return dataclasses.field(default=default, metadata=metadata)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Everything one training job needs to know, validated on construction; a field per flag."""

  # The fields' order is the order of --help within a group and of a restart's list of changes.
  dataset: str = setting(
      "mnist", DATA, REFUSED, check=check_dataset_name,
      help="mnist (TFDS, downloaded into --data_dir), tfds:NAME (another 28x28 grey TFDS set), "
           "mnist_sample (5,000 real digits shipped with the package), idx:DIR (the four MNIST "
           "IDX files), npz:PATH (X (N, 784) uint8 and y (N,) labels).")
  data_dir: str = setting("", DATA, ALLOWED,
                          help="TFDS data directory (local or gs://); TFDS's default if empty.")
  model_dir: str = setting(
      "", OUTPUTS, ALLOWED, env="AIP_MODEL_DIR",
      help="Where checkpoints, logs, the export and metrics.json go (local or gs://); defaults "
           "to $AIP_MODEL_DIR.")
  checkpoint_dir: str = setting(
      "", FAULTS, ALLOWED, env="AIP_CHECKPOINT_DIR",
      help="Where checkpoints go (local or gs://); defaults to $AIP_CHECKPOINT_DIR, else "
           "--model_dir/checkpoints.")
  tensorboard_dir: str = setting(
      "", OUTPUTS, ALLOWED, env="AIP_TENSORBOARD_LOG_DIR",
      help="Where TensorBoard logs go (local or gs://); defaults to $AIP_TENSORBOARD_LOG_DIR, "
           "else --model_dir/logs.")
  tpu: str = setting("", DISTRIBUTION, ALLOWED,
                     help="TPU address or name; empty or 'local' on a Cloud TPU VM.")
  strategy: str = setting(
      "auto", DISTRIBUTION, ALLOWED, choices=STRATEGIES,
      help="Distribution strategy; auto picks TPU, multi-worker, mirrored or default.")
  precision: str = setting(
      "auto", DISTRIBUTION, ALLOWED, choices=PRECISIONS,
      help="auto: mixed_bfloat16 on TPU and on CPUs that compute bfloat16 natively "
      "(avx512_bf16 or amx_bf16, oneDNN on), mixed_float16 on GPU, else float32.")
  batch_size: int = setting(64, TRAINING, REFUSED, check=POSITIVE_INTEGER,
                            help="Global batch size, split evenly over the replicas.")
  epochs: int = setting(10, TRAINING, EXTENDING, check=POSITIVE_INTEGER,
                        help="Passes over the training split.")
  learning_rate: float = setting(
      3e-3, TRAINING, ALLOWED, check=POSITIVE,
      help="Peak learning rate of AdamW, reached after --warmup_steps, then cosine decay to "
           "zero at the run's end.")
  seed: int = setting(0, TRAINING, REFUSED, help="Seed for initialisation and shuffling.")
  shift_pixels: int = setting(
      1, DATA, REFUSED, check=between(0, 8),
      help="Augmentation: training images move by up to this many pixels each way (the decoder "
           "rebuilds the moved image); 0 turns it off.")
  labeled_examples: int = setting(
      0, DATA, REFUSED, check=ZERO_OR_MORE,
      help="Semi-supervised: the classifier learns from this many training labels (balanced by "
           "class, chosen by --seed), the decoder from every image; 0: every label.")
  loss_weighting: str = setting(
      "fixed", TRAINING, REFUSED, choices=LOSS_WEIGHTINGS,
      help="fixed: --loss_weights; uncertainty: learned per-task weights (Kendall, Gal and "
           "Cipolla, 2018), logged each epoch.")
  loss_weights: Dict[str, float] = setting(
      DEFAULT_LOSS_WEIGHTS, TRAINING, REFUSED,
      check=requirement(  # All zero would train at full cost on a loss of 0: nothing.
          lambda weights: set(weights) == set(OUTPUT_NAMES) and not any(
              weight < 0 for weight in weights.values()) and any(weights.values()),
          f"must give a non-negative weight to each of {', '.join(OUTPUT_NAMES)}, at least one "
          "of them above 0, e.g. --loss_weights=classifier=1.0,decoder=8.0"),
      help="Weight of each task's loss in the total, as NAME=WEIGHT pairs.")
  decoder_weight: float = setting(
      DECODER_WEIGHT_FROM_LOSS_WEIGHTS, TRAINING, REFUSED,
      check=requirement(lambda value: value >= 0 or value == DECODER_WEIGHT_FROM_LOSS_WEIGHTS,
                        "must be zero or more (or -1: the decoder weight of --loss_weights)"),
      help="The decoder's weight alone, one number a tuning job can search: it replaces the "
           "decoder weight of --loss_weights, which must then leave it at its default; -1: "
           "that of --loss_weights.")
  latent_dim: int = setting(256, TRAINING, REFUSED, check=POSITIVE_INTEGER,
                            help="Size of the shared encoder's output.")
  width: int = setting(
      48, TRAINING, REFUSED, check=POSITIVE_INTEGER,
      help="Channels of the first convolution, doubled at each coarser resolution (the decoder "
           "mirrors them); smaller is cheaper.")
  warmup_steps: int = setting(
      200, TRAINING, REFUSED, check=ZERO_OR_MORE,
      help="Steps of linear learning-rate warm-up from zero to --learning_rate (at most a fifth "
           "of the run's steps).")
  weight_decay: float = setting(  # The task weighting's own variables are exempt.
      0.05, TRAINING, REFUSED, check=ZERO_OR_MORE,
      help="AdamW's decoupled weight decay (per unit learning rate).")
  input_noise: float = setting(
      0.0, SEMI_SUPERVISED, REFUSED,
      check=between(0, 1, " (a standard deviation in pixels scaled to [0, 1])"),
      help="Denoising: Gaussian noise of this standard deviation (pixels scaled to [0, 1]) on "
           "the encoder's training input; the decoder rebuilds the clean image. 0: none.")
  unlabeled_loss: str = setting(
      "none", SEMI_SUPERVISED, REFUSED, choices=UNLABELED_LOSSES,
      help="Semi-supervised: what the classifier learns from unlabelled images. pseudo_label: "
           "its confident answers on each image become labels for a strongly augmented copy "
           "(FixMatch); consistency: its answers on two augmented copies must agree. Needs "
           "--labeled_examples.")
  unlabeled_weight: float = setting(1.0, SEMI_SUPERVISED, REFUSED, check=ZERO_OR_MORE,
                                    help="Weight of --unlabeled_loss in the total loss.")
  pseudo_label_threshold: float = setting(
      0.95, SEMI_SUPERVISED, REFUSED,
      check=requirement(lambda value: 0 <= value < 1, "must be at least 0 and below 1"),
      help="pseudo_label: the probability an answer needs to become a label.")
  steps_per_loop: int = setting(  # 0: distribution.default_steps_per_loop.
      0, DISTRIBUTION, ALLOWED, check=ZERO_OR_MORE,
      help="Training steps run per call into the device; 0: the platform's default (TPU 500, "
           "GPU 200, CPU 50).")
  checkpoint_every_steps: int = setting(
      500, FAULTS, ALLOWED, check=POSITIVE_INTEGER,
      help="Save a checkpoint every this many training steps, and at each epoch's end.")
  checkpoints_to_keep: int = setting(3, FAULTS, ALLOWED, check=POSITIVE_INTEGER,
                                     help="How many of the latest checkpoints to keep.")
  tuning_metric: str = setting(
      "validation_accuracy", OUTPUTS, ALLOWED, choices=tuple(TUNING_METRICS),
      help="In a Vertex AI tuning trial, the metric reported at every evaluation (python -m "
           "launch.vertex tune sets it from its --metric).")
  eval_every_steps: int = setting(
      0, TRAINING, ALLOWED, check=ZERO_OR_MORE,
      help="Also log validation metrics every this many steps; 0: at epoch ends only.")
  jit_compile: bool = setting(
      False, DISTRIBUTION, ALLOWED,
      help="XLA-compile each replica's forward and backward pass (measured 2.3x slower on CPU; "
           "try it on GPU).")
  deterministic: bool = setting(
      False, FAULTS, ALLOWED,
      help="Deterministic ops (slower): the same flags give the same metrics.")
  report: bool = setting(
      True, OUTPUTS, ALLOWED,
      help="Draw the report (images and report.md) under --model_dir/report at the end.")
  verbose: bool = setting(
      False, OUTPUTS, ALLOWED,
      help="Also log TensorFlow's own start-up and saving messages (its C++ INFO and WARNING "
           "lines, unless $TF_CPP_MIN_LOG_LEVEL says otherwise).")

  def __post_init__(self):
    for field in dataclasses.fields(self):
      value, choices, check = (getattr(self, field.name), field.metadata["choices"],
                               field.metadata["check"])
      if choices and value not in choices:
        raise UserInputError(unknown_choice(field.name, value, choices))
      if check:
        check(value, field.name)
      if not finite(value):  # inf passes "must be positive", then fails seconds into training.
        raise UserInputError(f"{_as_flag(field.name, value)} must be finite, e.g. "
                             f"{_as_flag(field.name, flag_default(field.name, {}))} (the default)")
      if field.type is int and not -2**31 < value < 2**31:  # TensorFlow's counters are int32/64.
        raise UserInputError(f"--{field.name}={value} is out of range: use a value below 2**31")
    self._take_decoder_weight()
    if self.jit_compile and self.deterministic:
      raise UserInputError("--jit_compile and --deterministic cannot go together: XLA has no "
                           "deterministic max-pool gradient; drop one of them")
    if self.loss_weighting != "fixed" and self.loss_weights != DEFAULT_LOSS_WEIGHTS:
      raise UserInputError(
          f"--loss_weights applies only to --loss_weighting=fixed (this run's weighting is "
          f"{self.loss_weighting}, which learns the weights): add --loss_weighting=fixed")
    if self.unlabeled_loss != "none" and not self.labeled_examples:
      raise UserInputError(f"--unlabeled_loss={self.unlabeled_loss} needs unlabelled images: "
                           "add --labeled_examples=N (the labels kept)")
    if not self.model_dir:
      raise UserInputError(no_model_dir(os.environ))

  def _take_decoder_weight(self) -> None:
    """Puts a given --decoder_weight into loss_weights, where every part of the job reads the
    weights, and checks them again; refuses it beside --loss_weights' own decoder weight or
    a learned weighting. Idempotent: `dataclasses.replace` makes the configuration again."""
    weight, given = float(self.decoder_weight), self.loss_weights[DECODER]
    if weight == DECODER_WEIGHT_FROM_LOSS_WEIGHTS:
      return
    if self.loss_weighting != "fixed":
      raise UserInputError(
          f"--decoder_weight applies only to --loss_weighting=fixed (this run's weighting is "
          f"{self.loss_weighting}, which learns the weights): add --loss_weighting=fixed")
    if given not in (weight, DEFAULT_LOSS_WEIGHTS[DECODER]):
      raise UserInputError(
          f"--decoder_weight={weight} and {_as_flag('loss_weights', self.loss_weights)} give "
          f"the decoder two weights: give one, with --decoder_weight (and {DECODER}="
          f"{DEFAULT_LOSS_WEIGHTS[DECODER]}, the default, in --loss_weights) or in --loss_weights")
    weights = {**self.loss_weights, DECODER: weight}
    _SETTINGS["loss_weights"].metadata["check"](weights, "loss_weights")
    object.__setattr__(self, "loss_weights", weights)  # Frozen: set once, here.


_SETTINGS = {field.name: field for field in dataclasses.fields(TrainConfig)}
RESUME_RULES = {name: field.metadata["restart"] for name, field in _SETTINGS.items()}


def settings_by_group() -> Dict[str, tuple]:
  """The names of the settings in each of HELP_GROUPS, in that order: the sections of --help."""
  return {group: tuple(name for name, field in _SETTINGS.items()
                       if field.metadata["group"] == group) for group in HELP_GROUPS}


def flag_default(name: str, environ: Optional[Mapping[str, str]] = None):
  """The default of setting `name`'s flag: the value of its environment variable where it has
  one that is set in `environ` (default os.environ; $AIP_MODEL_DIR on Vertex AI, say), else
  the field's default."""
  field = _SETTINGS[name]
  environ = os.environ if environ is None else environ
  default = field.default_factory() if field.default is dataclasses.MISSING else field.default
  return environ.get(field.metadata["env"], default) if field.metadata["env"] else default


def no_model_dir(environ: Mapping[str, str], wanted: str = "--model_dir") -> str:
  """The refusal of a command given no --model_dir in `environ`, where it defaults to
  $AIP_MODEL_DIR: the variable unset, or set but empty (which reads as unset otherwise);
  `wanted` is what to pass instead."""
  if environ.get(_SETTINGS["model_dir"].metadata["env"]) == "":
    state = "is set but empty"
    also = ", or set $AIP_MODEL_DIR to the job's directory (local or gs://)"
  else:
    state, also = "is not set", ""
  return f"no --model_dir given and $AIP_MODEL_DIR {state}: pass {wanted}{also}"


def default_model_dir() -> str:
  """Where outputs go when --model_dir is not given: Vertex AI's $AIP_MODEL_DIR, if set."""
  return flag_default("model_dir")


def restart_table_markdown() -> str:
  """The README's table of what a restart may change: a row per rule, its settings as flags."""
  lines = ["| on restart | settings |", "|---|---|"]
  for rule, (effect, common) in RESTART_ROWS.items():
    names = ", ".join(f"`--{name}`" for name, named in RESUME_RULES.items() if named == rule)
    lines.append(f"| {effect} | {names}: {common} |")
  return "\n".join(lines) + "\n"


def format_loss_weights(weights: Dict[str, float]) -> str:
  """`{"classifier": 1.0, "decoder": 0.2}` as --loss_weights writes it."""
  return ",".join(f"{name}={weight}" for name, weight in weights.items())


def _as_flag(name: str, value) -> str:
  return f"--{name}={format_loss_weights(value) if isinstance(value, dict) else value}"


def resume_changes(saved: Dict, config: "TrainConfig") -> list:
  """Compares `config` with the one a run saved (`saved`, as `dataclasses.asdict` gave it);
  returns the allowed changes, as `--name: old -> new` lines to log.

  Raises `UserInputError` naming every refused change with its old and new value. A setting
  the saved file lacks (added to the trainer later) counts as its default.
  """
  current = dataclasses.asdict(config)
  defaults = dataclasses.asdict(TrainConfig(model_dir="-"))
  refused, allowed = [], []
  for name, rule in RESUME_RULES.items():
    old = saved.get(name, defaults[name])
    new = current[name]
    if old == new or (rule == EXTENDING and new > old):
      continue
    (refused if rule == REFUSED else allowed).append((name, old, new))
  if refused:
    raise UserInputError(
        "this run was trained with " + " ".join(_as_flag(n, old) for n, old, _ in refused)
        + ", not " + " ".join(_as_flag(n, new) for n, _, new in refused)
        + "; run it with its own settings (see --model_dir/config.json), or use a new --model_dir")
  return [f"--{name}: {old} -> {new}" for name, old, new in allowed]


def parse_loss_weights(text: str) -> Dict[str, float]:
  """Parses `classifier=1.0,decoder=0.2` into a dict of output name to weight."""
  weights = {}
  for item in filter(None, (part.strip() for part in text.split(","))):
    name, sep, value = item.partition("=")
    try:
      if not sep:
        raise ValueError
      weights[name.strip()] = float(value)
    except ValueError:
      raise UserInputError(
          f"--loss_weights={text!r} is not NAME=NUMBER pairs: "
          "write it as classifier=1.0,decoder=8.0") from None
  return weights


# What a JSON value of each setting's type must be, and its name in an error line.
_JSON_TYPES = {str: ((str,), "a string"), int: ((int,), "an integer"),
               float: ((int, float), "a number"), bool: ((bool,), "true or false")}


def json_is(value, kinds) -> bool:
  """Whether `value` is one of `kinds`, a bool counting only where `kinds` has bool (to Python
  a bool is an int)."""
  return isinstance(value, kinds) and (bool in kinds or not isinstance(value, bool))


def json_numbers(value) -> bool:
  """Whether `value` is a JSON object of numbers."""
  return isinstance(value, dict) and all(json_is(v, (int, float)) for v in value.values())


def saved_config_problem(saved: Dict) -> Optional[str]:
  """What is wrong with the types of a saved configuration, or None: each setting it holds
  must be a JSON value of the setting's type (an older trainer's file may lack some)."""
  for field in dataclasses.fields(TrainConfig):
    if field.name not in saved:
      continue
    value = saved[field.name]
    if field.name == "loss_weights":
      value_ok, expected = json_numbers(value), "NAME: WEIGHT pairs"
    else:
      kinds, expected = _JSON_TYPES[field.type]
      value_ok = json_is(value, kinds)
    if not value_ok:
      return f"{field.name} is {json.dumps(value)}, not {expected}"
  return None
