"""The job's configuration: one validated dataclass, and the error type for bad input.

Flags live in `trainer.task`; everything below it takes a `TrainConfig` (or
explicit arguments), so tests and notebooks can build one directly.
"""

import dataclasses
import difflib
import os
from typing import Dict

CLASSIFIER = "classifier"
DECODER = "decoder"
OUTPUT_NAMES = (CLASSIFIER, DECODER)

STRATEGIES = ("auto", "default", "one_device", "mirrored", "multi_worker_mirrored", "tpu")
PRECISIONS = ("auto", "float32", "mixed_float16", "mixed_bfloat16")
LOSS_WEIGHTINGS = ("fixed", "uncertainty")
# What the classifier learns from the unlabelled images of a semi-supervised run (trainer.losses):
# none, the labels of its own confident answers (FixMatch), or agreement between two views.
UNLABELED_LOSSES = ("none", "pseudo_label", "consistency")
# Cross-entropy at 1.0, the reconstruction's MSE at 8.0: measured on Fashion-MNIST, the classic
# starting point's 0.2 leaves the reconstruction well behind a 32-component PCA, and a heavier
# reconstruction helps the classifier too (benchmarks/README.md).
DEFAULT_LOSS_WEIGHTS = {CLASSIFIER: 1.0, DECODER: 8.0}

# --dataset is one of DATASETS, or KIND:ARGUMENT with KIND one of DATASET_KINDS
# (trainer.data.load_splits reads each; this is only the name, checked without TensorFlow).
DATASETS = ("mnist", "mnist_sample")
DATASET_KINDS = ("tfds", "idx", "npz")


class UserInputError(ValueError):
  """Bad input the user can fix: the message names the problem and the fix."""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Everything one training job needs to know, validated on construction."""

  dataset: str = "mnist"
  data_dir: str = ""
  model_dir: str = ""
  checkpoint_dir: str = ""  # Empty: model_dir/checkpoints.
  tensorboard_dir: str = ""  # Empty: model_dir/logs.
  strategy: str = "auto"
  tpu: str = ""
  precision: str = "auto"
  batch_size: int = 64
  epochs: int = 10
  learning_rate: float = 3e-3  # The peak, reached after warmup_steps; cosine decay to zero.
  warmup_steps: int = 200
  weight_decay: float = 0.05  # AdamW's decoupled decay; the task weighting's own are exempt.
  loss_weights: Dict[str, float] = dataclasses.field(
      default_factory=lambda: dict(DEFAULT_LOSS_WEIGHTS))
  loss_weighting: str = "fixed"  # Or "uncertainty": learned (trainer.losses).
  labeled_examples: int = 0  # 0: every training label; else the classifier learns from these.
  input_noise: float = 0.0  # Denoising: noise on the encoder's training input; 0: none.
  unlabeled_loss: str = "none"  # One of UNLABELED_LOSSES; needs labeled_examples.
  unlabeled_weight: float = 1.0  # The unlabelled term's weight in the total loss.
  pseudo_label_threshold: float = 0.95  # pseudo_label: the confidence an answer needs to count.
  steps_per_loop: int = 0  # 0: the platform's default (distribution.default_steps_per_loop).
  checkpoint_every_steps: int = 500
  checkpoints_to_keep: int = 3
  eval_every_steps: int = 0  # 0: evaluate at epoch ends only.
  jit_compile: bool = False
  latent_dim: int = 256
  width: int = 48  # Channels of the first convolution; each coarser resolution doubles them.
  shift_pixels: int = 1
  seed: int = 0
  deterministic: bool = False
  report: bool = True  # Draw the report under model_dir/report at the end.

  def __post_init__(self):
    check_dataset_name(self.dataset)
    if self.strategy not in STRATEGIES:
      raise UserInputError(unknown_choice("strategy", self.strategy, STRATEGIES))
    if self.precision not in PRECISIONS:
      raise UserInputError(unknown_choice("precision", self.precision, PRECISIONS))
    for name in ("batch_size", "epochs", "latent_dim", "width", "checkpoint_every_steps",
                 "checkpoints_to_keep"):
      if getattr(self, name) <= 0:
        raise UserInputError(f"--{name}={getattr(self, name)} must be a positive integer")
    if self.loss_weighting not in LOSS_WEIGHTINGS:
      raise UserInputError(unknown_choice("loss_weighting", self.loss_weighting, LOSS_WEIGHTINGS))
    for name in ("steps_per_loop", "eval_every_steps", "labeled_examples", "warmup_steps"):
      if getattr(self, name) < 0:
        raise UserInputError(f"--{name}={getattr(self, name)} must be zero or more")
    if not 0 <= self.shift_pixels <= 8:
      raise UserInputError(f"--shift_pixels={self.shift_pixels} must be between 0 and 8")
    if self.jit_compile and self.deterministic:
      raise UserInputError("--jit_compile and --deterministic cannot go together: XLA has no "
                           "deterministic max-pool gradient; drop one of them")
    if not self.learning_rate > 0:
      raise UserInputError(f"--learning_rate={self.learning_rate} must be positive")
    if not self.weight_decay >= 0:
      raise UserInputError(f"--weight_decay={self.weight_decay} must be zero or more")
    if set(self.loss_weights) != set(OUTPUT_NAMES) or any(
        w < 0 for w in self.loss_weights.values()):
      raise UserInputError(
          f"--loss_weights={self.loss_weights} must give a non-negative weight to each of "
          f"{', '.join(OUTPUT_NAMES)}, e.g. --loss_weights=classifier=1.0,decoder=8.0")
    if self.loss_weighting != "fixed" and self.loss_weights != DEFAULT_LOSS_WEIGHTS:
      raise UserInputError(
          f"--loss_weights applies only to --loss_weighting=fixed (this run's weighting is "
          f"{self.loss_weighting}, which learns the weights): add --loss_weighting=fixed")
    if not 0 <= self.input_noise <= 1:
      raise UserInputError(f"--input_noise={self.input_noise} must be between 0 and 1 (a "
                           "standard deviation in pixels scaled to [0, 1])")
    if self.unlabeled_loss not in UNLABELED_LOSSES:
      raise UserInputError(unknown_choice("unlabeled_loss", self.unlabeled_loss, UNLABELED_LOSSES))
    if self.unlabeled_loss != "none" and not self.labeled_examples:
      raise UserInputError(f"--unlabeled_loss={self.unlabeled_loss} needs unlabelled images: "
                           "add --labeled_examples=N (the labels kept)")
    if not self.unlabeled_weight >= 0:
      raise UserInputError(f"--unlabeled_weight={self.unlabeled_weight} must be zero or more")
    if not 0 <= self.pseudo_label_threshold < 1:
      raise UserInputError(f"--pseudo_label_threshold={self.pseudo_label_threshold} must be "
                           "at least 0 and below 1")
    if not self.model_dir:
      raise UserInputError("no --model_dir given and $AIP_MODEL_DIR is not set: pass --model_dir")


def check_dataset_name(dataset: str) -> None:
  """Raises UserInputError unless `dataset` names a kind of source --dataset takes.

  Only the name: whether the files or the TFDS set exist is for trainer.data to find out.
  """
  kind, _, argument = dataset.partition(":")
  if dataset in DATASETS or (kind in DATASET_KINDS and argument):
    return
  close = difflib.get_close_matches(dataset, DATASETS, n=1)
  hint = f" (did you mean {close[0]}?)" if close else ""
  raise UserInputError(f"unknown --dataset={dataset!r}{hint}: use mnist, mnist_sample, "
                       "tfds:NAME, idx:DIR or npz:PATH")


# What a restart may change, setting by setting (the README's table is this one):
#   refused    changes what the remaining steps compute or the data order: the job stops with
#              one line naming each change;
#   allowed    logged and used: paths (a run may be copied), the peak learning rate (lowering it
#              is what a divergence's message advises), how the steps run (strategy, precision,
#              XLA, steps per call) and what is saved or logged when. A strategy with another
#              number of input pipelines (workers) shuffles each pipeline's shard differently:
#              an epoch boundary resumes exactly, mid-epoch the rest of the epoch is drawn from
#              another order;
#   extending  a larger --epochs trains on, its cosine schedule stretched over the new total.
REFUSED, ALLOWED, EXTENDING = "refused", "allowed", "extending"
RESUME_RULES = {
    "dataset": REFUSED, "batch_size": REFUSED, "seed": REFUSED, "shift_pixels": REFUSED,
    "labeled_examples": REFUSED, "loss_weighting": REFUSED, "loss_weights": REFUSED,
    "latent_dim": REFUSED, "width": REFUSED, "warmup_steps": REFUSED, "weight_decay": REFUSED,
    "input_noise": REFUSED, "unlabeled_loss": REFUSED, "unlabeled_weight": REFUSED,
    "pseudo_label_threshold": REFUSED,
    "data_dir": ALLOWED, "model_dir": ALLOWED, "checkpoint_dir": ALLOWED,
    "tensorboard_dir": ALLOWED, "tpu": ALLOWED,
    "strategy": ALLOWED, "precision": ALLOWED, "learning_rate": ALLOWED,
    "steps_per_loop": ALLOWED, "checkpoint_every_steps": ALLOWED, "checkpoints_to_keep": ALLOWED,
    "eval_every_steps": ALLOWED, "jit_compile": ALLOWED, "deterministic": ALLOWED,
    "report": ALLOWED,
    "epochs": EXTENDING,
}


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


def first_line(error: BaseException) -> str:
  """The first line of an exception's message (its type name if it has none), for error lines."""
  text = str(error).strip()
  return text.splitlines()[0] if text else type(error).__name__


def unknown_choice(flag: str, value: str, choices) -> str:
  """The error message for a --flag value that is not one of `choices`."""
  return f"unknown --{flag}={value!r}: choose one of {', '.join(choices)}"


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


def default_model_dir() -> str:
  """Where outputs go when --model_dir is not given: Vertex AI's $AIP_MODEL_DIR, if set."""
  return os.environ.get("AIP_MODEL_DIR", "")


def default_checkpoint_dir() -> str:
  """Where checkpoints go when --checkpoint_dir is not given: Vertex AI's $AIP_CHECKPOINT_DIR.

  Empty when unset, which means model_dir/checkpoints.
  """
  return os.environ.get("AIP_CHECKPOINT_DIR", "")


def default_tensorboard_dir() -> str:
  """Where TensorBoard logs go when --tensorboard_dir is not given: Vertex AI's
  $AIP_TENSORBOARD_LOG_DIR. Empty when unset, which means model_dir/logs."""
  return os.environ.get("AIP_TENSORBOARD_LOG_DIR", "")
