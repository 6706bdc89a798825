"""Tests of benchmarks.torch_peer: the PyTorch peer is the package's default model, layer for
layer (shapes, strides, batch normalisation, parameter count as Keras counts it), and trains."""

import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")  # The `bench` extra: pip install -e '.[bench]'.

import keras  # noqa: E402

from benchmarks import torch_peer  # noqa: E402
from trainer.multitask import model as keras_model# noqa: E402
from trainer.multitask import problem# noqa: E402
from trainer.config import TrainConfig  # noqa: E402

# Keras kernels to PyTorch's layout: Conv2D (kh, kw, in, out) -> (out, in, kh, kw), and
# Conv2DTranspose (kh, kw, out, in) -> (in, out, kh, kw), the same permutation; Dense
# (in, out) -> (out, in).
_CONV_PERMUTATION = (3, 2, 0, 1)


def _keras_layout(model: keras.Model, head: str) -> list:
  """Each weight of `head`'s layers in order, described in PyTorch's terms."""
  rows = []
  for layer in model.get_layer(head).layers:
    for weight in layer.weights:
      shape = tuple(weight.shape)
      if isinstance(layer, (keras.layers.Conv2D, keras.layers.Conv2DTranspose)):
        # Conv2DTranspose subclasses Conv2D's base, not Conv2D: tell them apart by class.
        kind = "conv_transpose" if isinstance(layer, keras.layers.Conv2DTranspose) else "conv"
        if len(shape) == 4:
          shape = tuple(shape[i] for i in _CONV_PERMUTATION)
        rows.append((kind, shape, tuple(layer.strides), layer.padding))
      elif isinstance(layer, keras.layers.Dense):
        rows.append(("dense", shape[::-1]))
      elif isinstance(layer, keras.layers.BatchNormalization):
        rows.append(("batch_norm", shape, layer.epsilon, layer.momentum))
      else:
        raise AssertionError(f"unexpected weight in Keras layer {layer.name}")
  return rows


def _torch_layout(head: torch.nn.Module) -> list:
  """The same description of a PyTorch head; Keras's "same" padding as the padding that keeps
  the size (stride 1) or doubles it (transposed, stride 2)."""
  rows = []
  for module in head.children():
    tensors = list(module.parameters(recurse=False))
    if isinstance(module, torch.nn.BatchNorm2d):
      tensors += [module.running_mean, module.running_var]
    for tensor in tensors:
      shape = tuple(tensor.shape)
      if isinstance(module, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)):
        transpose = isinstance(module, torch.nn.ConvTranspose2d)
        same = (isinstance(module, torch_peer.SameConvTranspose2d) if transpose
                else module.padding == (1, 1) and module.stride == (1, 1))
        rows.append(("conv_transpose" if transpose else "conv", shape, module.stride,
                     "same" if same else module.padding))
      elif isinstance(module, torch.nn.Linear):
        rows.append(("dense", shape))
      elif isinstance(module, torch.nn.BatchNorm2d):
        rows.append(("batch_norm", shape, module.eps, round(1.0 - module.momentum, 9)))
  return rows


@pytest.fixture(scope="module")
def narrow_pair():
  """The narrow test model (latent 16, width 8) in Keras and in PyTorch."""
  torch.manual_seed(0)
  return keras_model.build_model(16, 8), torch_peer.build_model(16, 8)


def test_parameter_count_is_keras_count_params_at_the_default_and_narrow_shapes(narrow_pair):
  default = keras_model.build_model(256, 48)
  assert torch_peer.parameter_count(torch_peer.build_model()) == default.count_params()
  keras_narrow, torch_narrow = narrow_pair
  assert torch_peer.parameter_count(torch_narrow) == keras_narrow.count_params()
  trainable = sum(int(w.numpy().size) for w in keras_narrow.trainable_weights)
  assert sum(p.numel() for p in torch_narrow.parameters()) == trainable


@pytest.mark.parametrize("head", ["encoder", "classifier", "decoder"])
def test_layers_match_keras_in_order_shape_stride_padding_and_batch_norm(narrow_pair, head):
  keras_narrow, torch_narrow = narrow_pair
  expected = _keras_layout(keras_narrow, head)
  assert expected  # Not two empty lists agreeing.
  assert _torch_layout(getattr(torch_narrow, head)) == expected


def test_the_deep_decoder_matches_keras_too():
  keras_deep = keras_model.build_model(16, 8, deep_decoder=True)
  torch_deep = torch_peer.build_model(16, 8, deep_decoder=True)
  assert _torch_layout(torch_deep.decoder) == _keras_layout(keras_deep, "decoder")
  assert torch_peer.parameter_count(torch_deep) == keras_deep.count_params()


def _copy_keras_weights(keras_head: keras.Model, torch_head: torch.nn.Module) -> None:
  """Keras's weights into the PyTorch head, layer for layer; the dense layers next to a
  flatten or reshape permuted from NHWC order to NCHW."""
  keras_layers = [layer for layer in keras_head.layers if layer.weights]
  torch_modules = [module for module in torch_head.children()
                   if list(module.parameters(recurse=False))]
  assert len(keras_layers) == len(torch_modules)
  for layer, module in zip(keras_layers, torch_modules):
    weights = [np.asarray(w) for w in layer.get_weights()]
    if isinstance(layer, keras.layers.BatchNormalization):
      tensors = [module.weight, module.bias, module.running_mean, module.running_var]
    else:
      tensors = [module.weight] + ([module.bias] if module.bias is not None else [])
      if weights[0].ndim == 4:
        weights[0] = weights[0].transpose(_CONV_PERMUTATION)
      else:
        kernel = weights[0]  # (in, out)
        if layer.name == "latent":  # Inputs flattened from (7, 7, C) here, (C, 7, 7) there.
          channels = kernel.shape[0] // 49
          kernel = kernel.reshape(7, 7, channels, -1).transpose(2, 0, 1, 3).reshape(
              kernel.shape)
        elif layer.name == "decoder_dense":  # Outputs reshaped to (7, 7, C), there (C, 7, 7).
          channels = kernel.shape[1] // 49
          kernel = kernel.reshape(-1, 7, 7, channels).transpose(0, 3, 1, 2).reshape(
              kernel.shape)
        weights[0] = kernel.T
    assert len(weights) == len(tensors), layer.name
    with torch.no_grad():
      for tensor, value in zip(tensors, weights):
        assert tuple(tensor.shape) == value.shape, layer.name
        tensor.copy_(torch.from_numpy(np.ascontiguousarray(value)))


@pytest.mark.parametrize("deep_decoder", [True, False])
def test_with_kerass_weights_the_peer_computes_what_keras_computes(deep_decoder):
  keras.utils.set_random_seed(3)
  keras_net = keras_model.build_model(16, 8, deep_decoder=deep_decoder)
  # Batch normalisation's statistics and affine weights away from 0 and 1, so that a wrong
  # copy or a shifted pixel shows.
  rng = np.random.default_rng(3)
  for layer in keras_model_layers(keras_net):
    if isinstance(layer, keras.layers.BatchNormalization):
      layer.set_weights([rng.uniform(0.5, 1.5, w.shape).astype(np.float32) if i in (0, 3)
                         else rng.normal(0, 0.3, w.shape).astype(np.float32)
                         for i, w in enumerate(layer.get_weights())])
  peer = torch_peer.build_model(16, 8, deep_decoder=deep_decoder)
  for head in ("encoder", "classifier", "decoder"):
    _copy_keras_weights(keras_net.get_layer(head), getattr(peer, head))
  images = rng.integers(0, 256, (4, 28, 28, 1), dtype=np.uint8)
  expected = keras_net(images, training=False)
  peer.eval()
  with torch.no_grad():
    outputs = peer(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0)
  np.testing.assert_allclose(torch.softmax(outputs["classifier"], 1).numpy(),
                             np.asarray(expected["classifier"]), atol=1e-4)
  np.testing.assert_allclose(outputs["decoder"].permute(0, 2, 3, 1).numpy(),
                             np.asarray(expected["decoder"]), atol=1e-4)


def keras_model_layers(model: keras.Model):
  for layer in model.layers:
    yield from keras_model_layers(layer) if isinstance(layer, keras.Model) else [layer]


def test_outputs_are_logits_and_pixels_in_nchw(narrow_pair):
  _, model = narrow_pair
  model.eval()
  with torch.no_grad():
    outputs = model(torch.rand(3, 1, 28, 28))
  assert outputs["classifier"].shape == (3, 10)
  pixels = outputs["decoder"]
  assert pixels.shape == (3, 1, 28, 28)
  assert 0.0 <= pixels.min().item() and pixels.max().item() <= 1.0


def test_learning_rate_follows_the_packages_schedule():
  config = TrainConfig(model_dir="-")  # The defaults: 200 warm-up steps to 3e-3.
  for total_steps in (2000, 100):  # 100: the warm-up shrinks to a fifth of the run.
    keras_schedule = problem.learning_rate_schedule(config, total_steps)
    for step in (0, 1, 19, 20, 150, 199, 200, 201, 1000, 1999, 2000, 2500):
      ours = torch_peer.learning_rate(step, total_steps, config.learning_rate,
                                      config.warmup_steps)
      assert ours == pytest.approx(float(keras_schedule(step)), rel=1e-5, abs=1e-9), step


def test_optimizer_is_keras_adamw_at_the_package_defaults(narrow_pair):
  _, model = narrow_pair
  optimizer, _ = torch_peer.make_optimizer(model, total_steps=1000)
  (group,) = optimizer.param_groups  # Every parameter decays, as in the package.
  defaults = TrainConfig(model_dir="-")
  assert isinstance(optimizer, torch.optim.AdamW)
  assert group["eps"] == keras.optimizers.AdamW().epsilon == 1e-7
  assert group["weight_decay"] == defaults.weight_decay
  assert group["initial_lr"] == defaults.learning_rate and group["lr"] == 0.0  # Warming up.


def test_a_few_steps_on_one_batch_lower_the_loss():
  torch.manual_seed(1)
  model = torch_peer.build_model(16, 8)
  images, labels = torch.rand(8, 1, 28, 28), torch.arange(8) % 10
  optimizer, scheduler = torch_peer.make_optimizer(model, total_steps=100, warmup_steps=0)
  losses = torch_peer.train_steps(model, optimizer, scheduler, [(images, labels)] * 8)
  assert len(losses) == 8 and losses[-1] < 0.8 * losses[0]


def test_random_shift_moves_each_image_by_at_most_the_pixels_and_fills_with_background():
  images = torch.rand(200, 1, 28, 28) + 0.5  # No zero pixel: a filled edge is told apart.
  moved = torch_peer.random_shift(images, 1, torch.Generator().manual_seed(0))
  assert moved.shape == images.shape
  seen = set()
  for original, shifted in zip(images[:, 0], moved[:, 0]):
    padded = torch.nn.functional.pad(original, (1, 1, 1, 1))
    # The package's offsets: the window's corner in the padded image, 0 to 2 each way.
    (match,) = [(row, col) for row in range(3) for col in range(3)
                if torch.equal(padded[row:row + 28, col:col + 28], shifted)]
    seen.add(match)
  assert len(seen) == 9  # Every offset, none favoured away.


def test_shuffled_batches_shift_only_when_asked():
  images = np.random.default_rng(0).integers(1, 256, (64, 28, 28, 1), dtype=np.uint8)
  labels = np.arange(64) % 10
  plain, _ = next(torch_peer.shuffled_batches(images, labels, 32))
  shifted, _ = next(torch_peer.shuffled_batches(images, labels, 32, shift_pixels=2))
  assert plain.min() > 0  # Only a shift brings in background.
  assert (shifted == 0).any()


def test_evaluate_is_accuracy_and_pixel_mse_over_every_example(narrow_pair):
  _, model = narrow_pair
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (25, 28, 28, 1), dtype=np.uint8)
  labels = rng.integers(0, 10, 25)
  metrics = torch_peer.evaluate(model, images, labels, batch_size=10)  # A partial last batch.
  model.eval()
  with torch.no_grad():
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    outputs = model(pixels)
  assert metrics["accuracy"] == pytest.approx(
      float((outputs["classifier"].argmax(1).numpy() == labels).mean()))
  assert metrics["reconstruction_mse"] == pytest.approx(
      float(((outputs["decoder"] - pixels) ** 2).mean()), rel=1e-5)


# Runs `python -m benchmarks.measure ARGS` in a fresh interpreter, as benchmarks.run does, and
# fails it (exit 1, an AssertionError) where it imported TensorFlow or Keras: the peer's
# process must leave the cores to PyTorch's thread pool alone.
_MEASURE_WITHOUT_TENSORFLOW = """
import runpy, sys
sys.argv = ["benchmarks.measure", *sys.argv[1:]]
try:
  runpy.run_module("benchmarks.measure", run_name="__main__", alter_sys=True)
finally:
  assert "tensorflow" not in sys.modules and "keras" not in sys.modules, "imported TensorFlow"
"""


def _measure_without_tensorflow(*args, timeout: float) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-c", _MEASURE_WITHOUT_TENSORFLOW, *args],
                        capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow  # A process that imports PyTorch and trains the narrow peer: about 4 s.
def test_the_time_to_the_bar_evaluates_on_the_packages_cadence_and_says_where_it_ended(tmp_path):
  rng = np.random.default_rng(0)
  arrays = tmp_path / "splits.npz"
  np.savez(arrays, images=rng.integers(0, 256, (20, 28, 28, 1), dtype=np.uint8),
           labels=rng.integers(0, 10, 20), test_images=rng.integers(0, 256, (5, 28, 28, 1),
                                                                   dtype=np.uint8),
           test_labels=rng.integers(0, 10, 5))
  # 8 of 20: 2 steps an epoch (the remainder dropped), 4 in all; evaluated every 3 steps and
  # at each epoch's end. An accuracy above 1 is never reached.
  result = _measure_without_tensorflow(
      "pytorch_tta", f"--arrays={arrays}", "--width=8", "--latent_dim=16", "--batch_size=8",
      "--epochs=2", "--eval_every_steps=3", "--shift_pixels=1", "--target_accuracy=1.01",
      timeout=180)
  assert result.returncode == 0, result.stderr
  evaluated = [line.split()[1] for line in result.stderr.splitlines() if line.startswith("step ")]
  assert evaluated == ["2", "3", "4"]
  (line,) = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
  assert '"step": null' in line and '"accuracy": ' in line


# Issue 39: the peer's recipe options.

def test_the_default_recipe_is_eager_float32_nchw_and_each_option_has_its_flag():
  assert torch_peer.Recipe() == torch_peer.EAGER_FLOAT32
  assert torch_peer.EAGER_FLOAT32.name == "eager_float32_nchw"
  assert torch_peer.EAGER_FLOAT32.flags() == []
  best = torch_peer.Recipe(channels_last=True, autocast_bfloat16=True, compile=True)
  assert best.name == "autocast_bfloat16+channels_last+compile"
  assert best.flags() == ["--channels_last", "--autocast_bfloat16", "--compile"]
  from benchmarks import run
  for name, options in run.PEER_RECIPES.items():  # What benchmarks.run asks for, by name.
    recipe = torch_peer.Recipe(**{option[2:]: True for option in options})
    assert recipe.name == name and recipe.flags() == list(options)


def _step_observed(recipe: "torch_peer.Recipe"):
  """One training step of the narrow peer on a tiny batch under `recipe`: the memory format
  each convolution's input and weight had, the dtype its output had, and the loss."""
  torch.manual_seed(0)
  model = torch_peer.build_model(16, 8)
  optimizer, scheduler = torch_peer.make_optimizer(model, total_steps=10, warmup_steps=0)
  stepped = torch_peer.prepare(model, recipe)
  seen = []

  def hook(module, inputs, output):
    seen.append((inputs[0].is_contiguous(memory_format=torch.channels_last),
                 module.weight.is_contiguous(memory_format=torch.channels_last), output.dtype))

  # The encoder's second block: 8 channels in, 16 out (a channel of 1 is both formats).
  model.encoder.encoder1_0.register_forward_hook(hook)
  losses = torch_peer.train_steps(stepped, optimizer, scheduler,
                                  [(torch.rand(4, 1, 28, 28), torch.arange(4))], recipe=recipe)
  return seen, losses


def test_eager_float32_steps_in_nchw_and_float32():
  (seen,), losses = _step_observed(torch_peer.EAGER_FLOAT32)
  assert seen == (False, False, torch.float32) and np.isfinite(losses[0])


def test_channels_last_and_bfloat16_autocast_are_applied_in_a_step():
  recipe = torch_peer.Recipe(channels_last=True, autocast_bfloat16=True)
  (seen,), losses = _step_observed(recipe)
  assert seen == (True, True, torch.bfloat16) and np.isfinite(losses[0])


def test_each_option_alone_is_applied_alone():
  (seen,), _ = _step_observed(torch_peer.Recipe(channels_last=True))
  assert seen == (True, True, torch.float32)
  (seen,), _ = _step_observed(torch_peer.Recipe(autocast_bfloat16=True))
  assert seen == (False, False, torch.bfloat16)


def test_the_parameters_and_the_evaluation_stay_float32_under_autocast(narrow_pair):
  recipe = torch_peer.Recipe(channels_last=True, autocast_bfloat16=True)
  torch.manual_seed(0)
  model = torch_peer.build_model(16, 8)
  stepped = torch_peer.prepare(model, recipe)
  assert {parameter.dtype for parameter in model.parameters()} == {torch.float32}
  rng = np.random.default_rng(0)
  metrics = torch_peer.evaluate(stepped, rng.integers(0, 256, (6, 28, 28, 1), dtype=np.uint8),
                                rng.integers(0, 10, 6), batch_size=4, recipe=recipe)
  assert 0 <= metrics["accuracy"] <= 1 and 0 < metrics["reconstruction_mse"] < 1


@pytest.mark.slow  # torch.compile's imports, 2 s, shared with the next test's.
def test_compile_hands_back_the_compiled_model_sharing_the_parameters():
  # Compiling itself takes a minute here: the first call is in the slow test below.
  model = torch_peer.build_model(16, 8)
  compiled = torch_peer.prepare(model, torch_peer.Recipe(compile=True))
  assert compiled is not model and isinstance(compiled, torch._dynamo.eval_frame.OptimizedModule)
  assert compiled._orig_mod is model
  assert torch_peer.prepare(model, torch_peer.EAGER_FLOAT32) is model


@pytest.mark.slow  # torch.compile's first call: about a minute on this project's 2-CPU machine.
def test_a_compiled_step_with_the_best_recipe_trains():
  recipe = torch_peer.Recipe(channels_last=True, autocast_bfloat16=True, compile=True)
  (seen,), losses = _step_observed(recipe)
  assert np.isfinite(losses[0])


@pytest.mark.slow  # A process that imports PyTorch, 22 steps of the narrow peer: about 4 s.
def test_measure_pytorch_passes_the_recipe_through_and_imports_no_tensorflow(tmp_path):
  rng = np.random.default_rng(0)
  arrays = tmp_path / "splits.npz"
  np.savez(arrays, images=rng.integers(0, 256, (64, 28, 28, 1), dtype=np.uint8),
           labels=rng.integers(0, 10, 64))
  result = _measure_without_tensorflow(
      "pytorch", f"--arrays={arrays}", "--width=8", "--latent_dim=16", "--batch_size=8",
      "--measure_steps=2", "--channels_last", "--autocast_bfloat16", timeout=180)
  assert result.returncode == 0, result.stderr
  (line,) = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
  assert '"recipe": "autocast_bfloat16+channels_last"' in line
  assert '"channels_last": true' in line and '"compile": false' in line
