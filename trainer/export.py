"""Export: the trained model as a SavedModel that serving systems can load without this package,
and reading it back (for `trainer.evaluate`, `trainer.predict` and the report).

The `serving_default` signature takes `images`, a batch of 28x28 grey images as uint8 0-255,
and returns `classifier` (batch x 10 class probabilities) and `decoder` (batch x 28 x 28
reconstructions in [0, 1]), both float32. The `latent` signature takes the same images and
returns `latent`, the shared encoder's output (batch x latent_dim, float32), for embeddings.
"""

import os
from typing import Dict

import keras
import numpy as np
import tensorflow as tf

from trainer.config import CLASSIFIER, DECODER, UserInputError, first_line
from trainer.data import IMAGE_SHAPE

SERVING_INPUT = tf.TensorSpec([None, *IMAGE_SHAPE[:2]], tf.uint8, name="images")


def export_saved_model(model: keras.Model, path: str) -> None:
  """Writes `model` to `path` (local or gs://), replacing what was there.

  On a local file system the export goes to a temporary name and is renamed into place:
  readers see the old export or the new one, never half of one. Object stores (gs://) have
  no atomic directory rename (it is a copy, object by object), so there it is written in
  place; `train.run` writes metrics.json after it, which marks it complete.
  """

  def serve(images):
    outputs = model(images[..., tf.newaxis], training=False)
    return {CLASSIFIER: tf.cast(outputs[CLASSIFIER], tf.float32),
            DECODER: tf.cast(outputs[DECODER][..., 0], tf.float32)}

  encoder = model.get_layer("encoder")

  def latent(images):
    return {"latent": tf.cast(encoder(images[..., tf.newaxis], training=False), tf.float32)}

  archive = keras.export.ExportArchive()
  archive.track(model)
  archive.add_endpoint(name="serving_default", fn=serve, input_signature=[SERVING_INPUT])
  archive.add_endpoint(name="latent", fn=latent, input_signature=[SERVING_INPUT])
  local = "://" not in path
  target = path.rstrip("/") + ".partial" if local else path
  for stale in {target, path}:
    if tf.io.gfile.exists(stale):
      tf.io.gfile.rmtree(stale)
  archive.write_out(target, verbose=False)
  if local:
    tf.io.gfile.rename(target, path)


def load(path: str):
  """The export at `path` (a SavedModel directory) for `predict_batches`; raises
  `UserInputError` when there is none."""
  if not tf.io.gfile.exists(os.path.join(path, "saved_model.pb")):
    raise UserInputError(
        f"no exported model at {path}; train one first with python -m trainer.task "
        "--model_dir=... or point --model_dir at a finished job's directory")
  try:
    return tf.saved_model.load(path)
  except (tf.errors.OpError, ValueError, OSError) as e:
    raise UserInputError(f"the export at {path} cannot be read ({first_line(e)[:200]}); train "
                         "again or point --model_dir at another finished job") from None


def predict_batches(exported, images: np.ndarray, signature: str = "serving_default",
                    batch_size: int = 1000) -> Dict[str, np.ndarray]:
  """Runs one of an export's signatures over uint8 images (N, 28, 28[, 1]) in batches; returns
  its outputs (`classifier` and `decoder`, or `latent`) as NumPy arrays."""
  images = images.reshape((-1,) + IMAGE_SHAPE[:2])
  parts = {}
  for start in range(0, len(images), batch_size):
    batch = tf.constant(images[start:start + batch_size])
    for key, value in exported.signatures[signature](images=batch).items():
      parts.setdefault(key, []).append(value.numpy())
  return {key: np.concatenate(values) for key, values in parts.items()}
