"""Tests of trainer.model: outputs, shapes, dtypes, and the mixed-precision split."""

import keras
import numpy as np

from trainer import model as model_lib


def test_outputs_are_named_and_shaped():
  model = model_lib.build_model(latent_dim=16)
  outputs = model(np.zeros((3, 28, 28, 1), np.uint8))
  assert set(outputs) == {"classifier", "decoder"}
  assert outputs["classifier"].shape == (3, 10)
  assert outputs["decoder"].shape == (3, 28, 28, 1)
  np.testing.assert_allclose(np.sum(outputs["classifier"], axis=-1), 1.0, rtol=1e-5)
  decoded = np.asarray(outputs["decoder"])
  assert decoded.min() >= 0.0 and decoded.max() <= 1.0


def test_mixed_bfloat16_computes_low_and_ends_in_float32():
  keras.mixed_precision.set_dtype_policy("mixed_bfloat16")
  model = model_lib.build_model(latent_dim=16)
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
