"""Tests of trainer.multitask.model: outputs, shapes, dtypes, and the mixed-precision split."""

import keras
import numpy as np

from trainer.multitask import model as model_lib


def test_outputs_are_named_and_shaped():
  model = model_lib.build_model(latent_dim=16, width=8)
  outputs = model(np.zeros((3, 28, 28, 1), np.uint8))
  assert set(outputs) == {"classifier", "decoder"}
  assert outputs["classifier"].shape == (3, 10)
  assert outputs["decoder"].shape == (3, 28, 28, 1)
  np.testing.assert_allclose(np.sum(outputs["classifier"], axis=-1), 1.0, rtol=1e-5)
  decoded = np.asarray(outputs["decoder"])
  assert decoded.min() >= 0.0 and decoded.max() <= 1.0


def test_mixed_bfloat16_computes_low_and_ends_in_float32():
  keras.mixed_precision.set_dtype_policy("mixed_bfloat16")
  model = model_lib.build_model(latent_dim=16, width=8)
  outputs = model(np.zeros((2, 28, 28, 1), np.uint8))
  assert outputs["classifier"].dtype == "float32"
  assert outputs["decoder"].dtype == "float32"
  layers = [layer for sub in model.layers if isinstance(sub, keras.Model) for layer in sub.layers]
  compute = {layer.name: layer.compute_dtype for layer in layers
             if isinstance(layer, (keras.layers.Conv2D, keras.layers.Dense,
                                   keras.layers.Conv2DTranspose))}
  assert compute and set(compute.values()) == {"bfloat16"}, compute
  assert all(v.dtype == "float32" for v in model.trainable_variables)
  final = {layer.name: layer.compute_dtype for layer in layers
           if layer.name in ("probabilities", "pixels")}
  assert final == {"probabilities": "float32", "pixels": "float32"}


def _layers(model):
  for layer in model.layers:
    yield from _layers(layer) if isinstance(layer, keras.Model) else [layer]


def test_batch_normalisation_is_synchronised_across_replicas():
  norms = [layer for layer in _layers(model_lib.build_model(latent_dim=16, width=8))
           if isinstance(layer, keras.layers.BatchNormalization)]
  assert norms and all(layer.synchronized for layer in norms)


def test_batch_normalisation_statistics_do_not_overflow_in_float16():
  # Activations of +-300 have a variance of 90,000, beyond float16's 65,504: statistics
  # computed in float16 would be inf, and the normalised outputs NaN.
  keras.mixed_precision.set_dtype_policy("mixed_float16")
  norm = keras.layers.BatchNormalization(synchronized=True)
  inputs = keras.ops.cast(np.tile([[300.0], [-300.0]], (4, 8)), "float16")
  outputs = norm(inputs, training=True)
  assert outputs.dtype == "float16"
  assert np.all(np.isfinite(np.asarray(outputs, np.float32)))
  assert np.all(np.isfinite(norm.moving_variance.numpy()))
  assert norm.moving_variance.dtype == "float32"


def test_width_sets_the_channels_of_encoder_and_decoder():
  def channels(model):
    return [layer.filters for layer in _layers(model)
            if isinstance(layer, (keras.layers.Conv2D, keras.layers.Conv2DTranspose))]
  assert channels(model_lib.build_model(latent_dim=16, width=8)) == [8, 16, 16, 32, 32, 8, 1]
  assert channels(model_lib.build_model(latent_dim=16, width=8, deep_decoder=True)) == [
      8, 16, 16, 32, 32, 16, 8, 8, 8, 1]
  assert (model_lib.build_model(latent_dim=16, width=8).count_params()
          < model_lib.build_model(latent_dim=16, width=16).count_params())


def test_training_mode_normalises_with_the_batch_statistics():
  model = model_lib.build_model(latent_dim=16, width=8)
  images = np.random.default_rng(0).integers(0, 256, (8, 28, 28, 1), np.uint8)
  training = model(images, training=True)["decoder"]
  inference = model(images, training=False)["decoder"]
  assert not np.allclose(training, inference)
