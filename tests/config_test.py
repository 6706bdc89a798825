"""Tests of trainer.config: validation of every setting, the restart rules and the README's
table of them, and --loss_weights parsing."""

import dataclasses
import difflib
import os
import re

import pytest

from trainer import config, errors

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")

def test_defaults_are_valid_and_weight_the_reconstruction_eight_times_the_classifier():
  cfg = config.TrainConfig(model_dir="/tmp/x")
  assert cfg.loss_weighting == "fixed"
  assert cfg.loss_weights == {"classifier": 1.0, "decoder": 8.0}


@pytest.mark.parametrize("changes, message", [
    ({"strategy": "horovod"}, "unknown --strategy='horovod'"),
    ({"precision": "float8"}, "unknown --precision='float8'"),
    ({"batch_size": 0}, "--batch_size=0 must be a positive integer"),
    ({"batch_size": -8}, "--batch_size=-8 must be a positive integer"),
    ({"epochs": -1}, "--epochs=-1 must be a positive integer"),
    ({"epochs": 0}, "--epochs=0 must be a positive integer"),
    ({"batch_size": 32.5}, "--batch_size=32.5 must be a positive integer"),  # From a notebook.
    ({"epochs": True}, "--epochs=True must be a positive integer"),
    ({"dataset": "mnist_smaple"}, "unknown --dataset='mnist_smaple' (did you mean mnist_sample?): "
                                  "use mnist, mnist_sample, tfds:NAME, idx:DIR or npz:PATH"),
    ({"dataset": "cifar10"}, "unknown --dataset='cifar10': use mnist"),
    ({"dataset": "tfds:"}, "unknown --dataset='tfds:'"),
    ({"dataset": "csv:/data/x.csv"}, "unknown --dataset='csv:/data/x.csv'"),
    ({"learning_rate": -0.1}, "--learning_rate=-0.1 must be positive"),
    ({"learning_rate": float("nan")}, "must be positive"),
    ({"loss_weights": {"classifier": 1.0}}, "must give a non-negative weight to each"),
    ({"loss_weights": {"classifier": 0.0, "decoder": 0.0}}, "at least one of them above 0"),
    ({"loss_weights": {"classifier": 1.0, "decoder": 1.0}, "loss_weighting": "uncertainty"},
     "--loss_weights applies only to --loss_weighting=fixed (this run's weighting is "
     "uncertainty, which learns the weights): add --loss_weighting=fixed"),
    ({"width": 0}, "--width=0 must be a positive integer"),
    ({"warmup_steps": -1}, "--warmup_steps=-1 must be zero or more"),
    ({"weight_decay": -0.01}, "--weight_decay=-0.01 must be zero or more"),
    ({"model_dir": ""}, "pass --model_dir"),
    ({"steps_per_loop": -1}, "--steps_per_loop=-1 must be zero or more"),
    ({"eval_every_steps": -5}, "--eval_every_steps=-5 must be zero or more"),
    ({"labeled_examples": -100}, "--labeled_examples=-100 must be zero or more"),
    ({"loss_weighting": "gradnorm"}, "unknown --loss_weighting='gradnorm': choose one of fixed, "
                                     "uncertainty"),
    ({"checkpoint_every_steps": 0}, "--checkpoint_every_steps=0 must be a positive integer"),
    ({"checkpoints_to_keep": 0}, "--checkpoints_to_keep=0 must be a positive integer"),
    ({"input_noise": 1.5}, "--input_noise=1.5 must be between 0 and 1"),
    ({"unlabeled_loss": "mixmatch"}, "unknown --unlabeled_loss='mixmatch': choose one of none, "
                                     "pseudo_label, consistency"),
    ({"unlabeled_loss": "pseudo_label"}, "--unlabeled_loss=pseudo_label needs unlabelled "
                                         "images: add --labeled_examples=N"),
    ({"unlabeled_weight": -1.0}, "--unlabeled_weight=-1.0 must be zero or more"),
    ({"pseudo_label_threshold": 1.0}, "--pseudo_label_threshold=1.0 must be at least 0 and "
                                      "below 1"),
])
def test_bad_settings_are_refused_with_the_fix(changes, message):
  with pytest.raises(errors.UserInputError, match=re.escape(message)):
    config.TrainConfig(**{"model_dir": "/tmp/x", **changes})


@pytest.mark.parametrize("changes, message", [
    ({"shift_pixels": 9}, "--shift_pixels=9 must be between 0 and 8"),
    ({"weight_decay": float("nan")}, "--weight_decay=nan must be zero or more"),
    ({"jit_compile": True, "deterministic": True},
     "--jit_compile and --deterministic cannot go together"),
])
def test_each_kind_of_check_refuses_with_its_message(changes, message):
  with pytest.raises(errors.UserInputError, match=re.escape(message)):
    config.TrainConfig(**{"model_dir": "/tmp/x", **changes})


@pytest.mark.parametrize("changes, message", [
    ({"learning_rate": float("inf")},
     "--learning_rate=inf must be finite, e.g. --learning_rate=0.003 (the default)"),
    ({"weight_decay": float("inf")}, "--weight_decay=inf must be finite"),
    ({"input_noise": float("-inf")}, "--input_noise=-inf must be between 0 and 1"),
    ({"unlabeled_weight": float("inf")}, "--unlabeled_weight=inf must be finite"),
    ({"loss_weights": {"classifier": float("inf"), "decoder": 8.0}},
     "--loss_weights=classifier=inf,decoder=8.0 must be finite, e.g. "
     "--loss_weights=classifier=1.0,decoder=8.0 (the default)"),
    ({"loss_weights": {"classifier": 1.0, "decoder": float("nan")}},
     "--loss_weights=classifier=1.0,decoder=nan must be finite"),
])
def test_an_infinite_or_nan_number_is_refused_in_every_float_setting(changes, message):
  """A check such as "must be positive" lets inf through, and a NaN weight through "at least
  one of them above 0": the job would fail seconds into training instead."""
  with pytest.raises(errors.UserInputError, match=re.escape(message)):
    config.TrainConfig(**{"model_dir": "/tmp/x", **changes})


@pytest.mark.parametrize("dataset", ["mnist", "mnist_sample", "tfds:fashion_mnist",
                                     "idx:/data/fashion", "npz:gs://bucket/mnist.npz"])
def test_every_kind_of_dataset_name_is_accepted(dataset):
  config.check_dataset_name(dataset)
  assert config.TrainConfig(dataset=dataset, model_dir="/tmp/x").dataset == dataset


def test_parse_loss_weights():
  assert config.parse_loss_weights("classifier=1,decoder=0.5") == {
      "classifier": 1.0, "decoder": 0.5}
  with pytest.raises(errors.UserInputError, match="classifier=1.0,decoder=8.0"):
    config.parse_loss_weights("classifier:1")


def test_model_dir_defaults_to_vertex_ai_model_dir(monkeypatch):
  monkeypatch.setenv("AIP_MODEL_DIR", "gs://bucket/model")
  assert config.default_model_dir() == "gs://bucket/model"


def test_no_model_dir_says_whether_vertex_ais_variable_is_unset_or_empty(monkeypatch):
  """An empty $AIP_MODEL_DIR is a default of "": the refusal must not call it unset."""
  monkeypatch.setenv("AIP_MODEL_DIR", "")
  with pytest.raises(errors.UserInputError, match=re.escape(
      "no --model_dir given and $AIP_MODEL_DIR is set but empty: pass --model_dir, or set "
      "$AIP_MODEL_DIR to the job's directory (local or gs://)")):
    config.TrainConfig(model_dir=config.default_model_dir())
  monkeypatch.delenv("AIP_MODEL_DIR")
  with pytest.raises(errors.UserInputError, match=re.escape(
      "no --model_dir given and $AIP_MODEL_DIR is not set: pass --model_dir")):
    config.TrainConfig(model_dir=config.default_model_dir())


@pytest.mark.parametrize("name, variable", [("model_dir", "AIP_MODEL_DIR"),
                                            ("checkpoint_dir", "AIP_CHECKPOINT_DIR"),
                                            ("tensorboard_dir", "AIP_TENSORBOARD_LOG_DIR")])
def test_a_flag_default_comes_from_vertex_ais_variable_where_it_is_set(monkeypatch, name,
                                                                        variable):
  monkeypatch.delenv(variable, raising=False)
  assert config.flag_default(name) == ""
  monkeypatch.setenv(variable, "gs://bucket/run")
  assert config.flag_default(name) == "gs://bucket/run"
  assert config.flag_default("batch_size") == 64


def test_first_line_of_an_error_message():
  assert errors.first_line(ValueError("bad thing\n  details")) == "bad thing"
  assert errors.first_line(AssertionError()) == "AssertionError"


def test_every_setting_has_a_rule_for_restarts_and_a_help_group():
  names = [f.name for f in dataclasses.fields(config.TrainConfig)]
  assert list(config.RESUME_RULES) == names
  assert set(config.RESUME_RULES.values()) == {config.REFUSED, config.ALLOWED, config.EXTENDING}
  groups = config.settings_by_group()
  assert list(groups) == list(config.HELP_GROUPS)
  assert sorted(name for group in groups.values() for name in group) == sorted(names)


def test_a_setting_with_an_unknown_group_or_restart_rule_is_refused_where_it_is_written():
  with pytest.raises(ValueError, match="unknown group 'train'"):
    config.setting(1, "train", config.REFUSED, help="A typo in its group.")
  with pytest.raises(ValueError, match="restart rule 'refuse'"):
    config.setting(1, config.TRAINING, "refuse", help="A typo in its rule.")


def test_the_readmes_restart_table_is_the_one_the_settings_give():
  with open(README) as readme:
    lines = readme.read().splitlines(keepends=True)
  header = "| on restart | settings |\n"
  assert header in lines, f"README.md has no restart table starting {header!r}"
  start = lines.index(header)
  end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
  in_readme, generated = "".join(lines[start:end]), config.restart_table_markdown()
  diff = "".join(difflib.unified_diff(in_readme.splitlines(keepends=True),
                                      generated.splitlines(keepends=True),
                                      "README.md", "config.restart_table_markdown()"))
  assert in_readme == generated, (
      "README.md's restart table is not the one the settings give: replace it with the output "
      "of\n  python -c 'from trainer import config; print(config.restart_table_markdown(), "
      "end=\"\")'\n" + diff)


def test_a_restart_names_every_refused_change_and_returns_the_allowed_ones():
  saved = dataclasses.asdict(config.TrainConfig(model_dir="/runs/a", epochs=5))
  same = config.TrainConfig(model_dir="/runs/a", epochs=5)
  assert config.resume_changes(saved, same) == []
  moved = config.TrainConfig(model_dir="/copies/a", epochs=8, learning_rate=1e-3)
  assert config.resume_changes(saved, moved) == [
      "--model_dir: /runs/a -> /copies/a", "--learning_rate: 0.003 -> 0.001"]
  changed = config.TrainConfig(model_dir="/runs/a", epochs=5, latent_dim=8,
                               loss_weights={"classifier": 1.0, "decoder": 0.5})
  with pytest.raises(errors.UserInputError, match=re.escape(
      "this run was trained with --loss_weights=classifier=1.0,decoder=8.0 --latent_dim=256, "
      "not --loss_weights=classifier=1.0,decoder=0.5 --latent_dim=8; ")):
    config.resume_changes(saved, changed)


def test_a_setting_an_older_config_json_lacks_counts_as_its_default():
  saved = dataclasses.asdict(config.TrainConfig(model_dir="/runs/a"))
  del saved["shift_pixels"]
  assert config.resume_changes(saved, config.TrainConfig(model_dir="/runs/a")) == []
  with pytest.raises(errors.UserInputError, match="--shift_pixels=1, not --shift_pixels=2"):
    config.resume_changes(saved, config.TrainConfig(model_dir="/runs/a", shift_pixels=2))
