"""Export: the trained model as a SavedModel that serving systems can load without this package,
and reading it back (for `trainer.evaluate`, `trainer.predict` and the report).

The `serving_default` signature takes `images`, a batch of 28x28 grey images as uint8 0-255 of
shape (N, 28, 28) or (N, 28, 28, 1) (same answers), and returns `classifier` (N x 10 class
probabilities) and `decoder` (N x 28 x 28 reconstructions in [0, 1]), both float32. The
`latent` signature takes the same images and returns `latent`, the shared encoder's output
(N x latent_dim, float32), for embeddings. Any other shape fails with an InvalidArgumentError
naming the expected one; another dtype is refused by the signature itself.
"""

import os
from typing import Dict

import keras
import numpy as np
import tensorflow as tf

from trainer.config import CLASSIFIER, DECODER, UserInputError, first_line
from trainer.data import IMAGE_SHAPE

# Unknown rank, so that both shapes MNIST code holds get in; `_checked_images` does the check the
# spec cannot (without it a wrong shape reaches the pooling kernel and fails deep in oneDNN).
SERVING_INPUT = tf.TensorSpec(None, tf.uint8, name="images")
EXPECTED_INPUT = "images must be uint8 of shape (N, 28, 28) or (N, 28, 28, 1): 28x28 grey, 0-255"


def _checked_images(images: tf.Tensor) -> tf.Tensor:
  """`images` as (N, 28, 28, 1), after checking in the graph that it is (N, 28, 28[, 1])."""
  height, width = IMAGE_SHAPE[:2]
  rank = tf.rank(images)
  # Padded so that the indexing below is valid for inputs of rank 0 to 2 as well.
  shape = tf.concat([tf.shape(images), tf.zeros([4], tf.int32)], 0)
  fits = tf.logical_and(
      tf.logical_and(tf.equal(shape[1], height), tf.equal(shape[2], width)),
      tf.logical_or(tf.equal(rank, 3), tf.logical_and(tf.equal(rank, 4), tf.equal(shape[3], 1))))
  check = tf.debugging.Assert(fits, [EXPECTED_INPUT + "; got shape", tf.shape(images)],
                              summarize=8)
  with tf.control_dependencies([check]):
    return tf.reshape(images, [-1, *IMAGE_SHAPE])


def export_saved_model(model: keras.Model, path: str) -> None:
  """Writes `model` to `path` (local or gs://), replacing what was there.

  On a local file system the export goes to a temporary name and is renamed into place:
  readers see the old export or the new one, never half of one. Object stores (gs://) have
  no atomic directory rename (it is a copy, object by object), so there it is written in
  place; `train.run` writes metrics.json after it, which marks it complete.
  """

  def serve(images):
    outputs = model(_checked_images(images), training=False)
    return {CLASSIFIER: tf.cast(outputs[CLASSIFIER], tf.float32),
            DECODER: tf.cast(outputs[DECODER][..., 0], tf.float32)}

  encoder = model.get_layer("encoder")

  def latent(images):
    return {"latent": tf.cast(encoder(_checked_images(images), training=False), tf.float32)}

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
  parts = {}
  for start in range(0, len(images), batch_size):
    batch = tf.constant(images[start:start + batch_size])
    for key, value in exported.signatures[signature](images=batch).items():
      parts.setdefault(key, []).append(value.numpy())
  return {key: np.concatenate(values) for key, values in parts.items()}
