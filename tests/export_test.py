"""Tests of trainer.export: the serving signature, and that the reload predicts as the model does."""

import numpy as np
import pytest
import tensorflow as tf

from tests import helpers
from trainer import export as export_lib
from trainer import model as model_lib
from trainer.config import UserInputError


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
  # The latent signature gives the encoder's output, for embeddings and the report.
  exported = export_lib.load(path)
  latent = export_lib.predict_batches(exported, images, "latent", batch_size=2)["latent"]
  np.testing.assert_allclose(latent, model.get_layer("encoder")(images), atol=1e-5)
  outputs = export_lib.predict_batches(exported, images, batch_size=2)  # Batches of 2, 2 and 1.
  np.testing.assert_allclose(outputs["classifier"], direct["classifier"], atol=1e-5)


def test_loading_where_there_is_no_export_names_the_fix(tmp_path):
  with pytest.raises(UserInputError, match=f"no exported model at {tmp_path}; train one first"):
    export_lib.load(str(tmp_path))


def test_an_unreadable_export_names_the_fix(tmp_path):
  (tmp_path / "saved_model.pb").write_bytes(b"not a saved model")
  with pytest.raises(UserInputError, match=f"the export at {tmp_path} cannot be read .*; train "
                                           "again or point --model_dir at another finished job"):
    export_lib.load(str(tmp_path))
