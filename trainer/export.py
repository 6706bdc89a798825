"""Export: the trained model as a SavedModel that serving systems can load without this package.

The `serving_default` signature takes `images`, a batch of 28x28 grey images as uint8 0-255,
and returns `classifier` (batch x 10 class probabilities) and `decoder` (batch x 28 x 28
reconstructions in [0, 1]), both float32.
"""

import keras
import tensorflow as tf

from trainer.config import CLASSIFIER, DECODER
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

  archive = keras.export.ExportArchive()
  archive.track(model)
  archive.add_endpoint(name="serving_default", fn=serve, input_signature=[SERVING_INPUT])
  local = "://" not in path
  target = path.rstrip("/") + ".partial" if local else path
  for stale in {target, path}:
    if tf.io.gfile.exists(stale):
      tf.io.gfile.rmtree(stale)
  archive.write_out(target, verbose=False)
  if local:
    tf.io.gfile.rename(target, path)
