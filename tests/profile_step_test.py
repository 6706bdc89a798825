"""Tests of benchmarks.profile_step: what each op counts as, and one real profile on the
narrow model (that one needs xprof, the `bench` extra: pip install -e '.[bench]')."""

import re

import pytest

from benchmarks import profile_step
from tests import helpers
from trainer import config

# Op names and types as the profile of the package's loop shows them.
_LOOP = "while/body/_1/while/"
_TAPE = "while/body/_1/gradient_tape/while/multitask_autoencoder_1/"
OPS = [
    (_TAPE + "encoder_1/encoder2_1_1/convolution/Conv2DBackpropFilter",
     "_MklNativeConv2DBackpropFilter", "convolution"),
    (_LOOP + "multitask_autoencoder_1/decoder_1/decoder14_up_1/conv_transpose",
     "Conv2DBackpropInput", "convolution"),
    (_LOOP + "multitask_autoencoder_1/encoder_1/encoder1_1_bn_1/Square", "Square",
     "batch normalisation"),
    (_TAPE + "decoder_1/decoder28_up_bn_1/Tile", "Tile", "batch normalisation"),
    (_LOOP + "adam_w/mul_61", "Mul", "optimizer update"),
    (_LOOP + "adam_w_3/AssignSubVariableOp_30", "AssignSubVariableOp", "optimizer update"),
    (_TAPE + "encoder_1/latent_1/MatMul/MatMul_1", "_MklMatMul", "dense (MatMul)"),
    ("Iterator::Root::Prefetch::ParallelMapV2", "Dataset", "input pipeline"),
    ("stateless_random_uniform", "StatelessRandomUniformFullIntV2", "input pipeline"),
    (_LOOP + "IsFinite_53", "IsFinite", "other"),
    (_TAPE + "encoder_1/encoder1_1_relu_1/ReluGrad", "ReluGrad", "other"),
]


@pytest.mark.parametrize("name, op_type, expected", OPS)
def test_each_op_counts_in_its_category(name, op_type, expected):
  assert profile_step.category(name, op_type, profile_step.optimizer_scope("adam_w")) == expected


def test_summary_sums_by_category_and_type_and_reports_per_step():
  ops = [(name, op_type, 0.01) for name, op_type, _ in OPS] + [(OPS[0][0], OPS[0][1], 0.09)]
  result = profile_step.summarise(ops, "adam_w_7", steps=10, batch_size=32, wall_seconds=0.1,
                                  unprofiled_seconds=0.09)
  assert result.by_category["convolution"] == pytest.approx(0.11)
  assert result.by_type["_MklNativeConv2DBackpropFilter"] == pytest.approx(0.1)
  assert sum(result.shares().values()) == pytest.approx(1.0)
  text = profile_step.report(result, load_average=1.5)
  assert re.search(r"^convolution +11\.00 +55\.0%$", text, re.MULTILINE)
  assert "op self-time / wall time: 2.00" in text
  assert "A loaded machine" in text
  assert "A loaded machine" not in profile_step.report(result, load_average=0.5)


@pytest.mark.slow  # A real profile: 5 s.
def test_a_profile_of_the_narrow_model_finds_every_category(tmp_path):
  pytest.importorskip("xprof")
  settings = config.TrainConfig(dataset="mnist_sample", model_dir=str(tmp_path / "run"),
                                batch_size=32, latent_dim=16, width=8, steps_per_loop=3)
  result = profile_step.profile(settings, helpers.learnable_splits(train=256),
                                str(tmp_path / "trace"))
  shares = result.shares()
  assert sum(shares.values()) == pytest.approx(1.0)
  for name in ("convolution", "batch normalisation", "optimizer update", "dense (MatMul)"):
    assert shares[name] > 0, (name, shares)
  assert result.steps == 3 and result.wall_seconds > 0 and result.unprofiled_seconds > 0


def test_the_loop_is_built_under_the_precision_and_the_summary_names_it(tmp_path):
  settings = config.TrainConfig(dataset="mnist_sample", model_dir=str(tmp_path / "run"),
                                batch_size=32, latent_dim=16, width=8, steps_per_loop=3,
                                precision="mixed_bfloat16")
  task, _, _, resolved = profile_step.package_loop(settings, helpers.learnable_splits(train=128))
  assert resolved.policy == "mixed_bfloat16" and task.model.compute_dtype == "bfloat16"
  result = profile_step.summarise([(OPS[0][0], OPS[0][1], 0.01)], "adam_w", steps=3,
                                  batch_size=32, wall_seconds=0.01, unprofiled_seconds=0.01,
                                  precision=resolved.policy, precision_reason=resolved.reason)
  text = profile_step.report(result)
  assert text.startswith("One call of the package's training loop: 3 steps of batch 32, "
                         "mixed_bfloat16, ")
  assert f"Precision: mixed_bfloat16 ({resolved.reason})." in text
