"""Tests of trainer.export: the serving signature, and that the reload predicts as the model does."""

import numpy as np
import tensorflow as tf

from tests import helpers
from trainer import export as export_lib
from trainer import model as model_lib


def test_export_reloads_with_a_uint8_serving_signature(tmp_path):
  model = model_lib.build_model(latent_dim=8)
  path = str(tmp_path / "export")
  export_lib.export_saved_model(model, path)
  export_lib.export_saved_model(model, path)  # Replacing an existing export works too.
  serve = tf.saved_model.load(path).signatures["serving_default"]
  assert serve.structured_input_signature[1]["images"].dtype == tf.uint8
  images = helpers.learnable_split(5).images
  served = serve(images=tf.constant(images[..., 0]))
  assert served["classifier"].shape == (5, 10) and served["classifier"].dtype == tf.float32
  assert served["decoder"].shape == (5, 28, 28) and served["decoder"].dtype == tf.float32
  direct = model(images)
  np.testing.assert_allclose(served["classifier"], direct["classifier"], atol=1e-5)
  np.testing.assert_allclose(served["decoder"], direct["decoder"][..., 0], atol=1e-5)
  assert not tf.io.gfile.exists(path + ".partial")
