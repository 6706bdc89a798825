"""Export: the trained model as a SavedModel that serving systems can load without this package,
and reading it back (for `trainer.evaluate`, `trainer.predict` and the report).

The `serving_default` signature takes `images`, a batch of 28x28 grey images as uint8 0-255 of
shape (N, 28, 28) or (N, 28, 28, 1) (same answers), and returns `classifier` (N x 10 class
probabilities) and `decoder` (N x 28 x 28 reconstructions in [0, 1]), both float32. The
`latent` signature takes the same images and returns `latent`, the shared encoder's output
(N x latent_dim, float32), for embeddings. Any other shape fails with an InvalidArgumentError
naming the expected one; another dtype is refused by the signature itself.

Beside the SavedModel, `KERAS_FILE` (`model.keras`) holds the trained model as a Keras file,
for users to fine-tune: `keras.models.load_model(f"{export}/model.keras")` gives the model as
trained (uint8 (N, 28, 28, 1) images in; `classifier` (N, 10) and `decoder` (N, 28, 28, 1) out),
not compiled, every layer in float32 whatever the run's precision (mixed precision keeps its
weights in float32, so nothing is lost), so it loads and trains the same on any machine; and
with plain batch normalisation in place of the synchronised kind (which only the TensorFlow
backend has), so it loads, predicts and trains on JAX and PyTorch too.
"""

import os
import zipfile
from typing import Dict, Optional

import keras
import numpy as np
import tensorflow as tf

from google.protobuf import message
from tensorflow.core.protobuf import saved_model_pb2

from trainer.data.sources import IMAGE_SHAPE
from trainer.errors import first_line, UserInputError
from trainer.job.run_directory import KERAS_FILE, SAVED_MODEL
from trainer.multitask import CLASSIFIER, DECODER

# Unknown rank, so that both shapes MNIST code holds get in; `_checked_images` does the check the
# spec cannot (without it a wrong shape reaches the pooling kernel and fails deep in oneDNN).
SERVING_INPUT = tf.TensorSpec(None, tf.uint8, name="images")
EXPECTED_INPUT = "images must be uint8 of shape (N, 28, 28) or (N, 28, 28, 1): 28x28 grey, 0-255"
# Policies that compute in 16 bits on float32 weights: the Keras file holds float32 in their place.
_MIXED_POLICIES = ("mixed_float16", "mixed_bfloat16")


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
  """Writes `model` to `path` (local or gs://), replacing what was there: the SavedModel and,
  beside it, `KERAS_FILE` (see the module's docstring).

  The new export is written whole beside the old one (`.export.partial`) first: a write that
  fails leaves the old export as it was. On a local disk it then takes the old one's place
  by two directory renames, so a reader finds the old export, the new one, or, for the
  instant between the renames, none, but never half of one; a process killed in that
  instant leaves the old one at `.export.previous`, put back by the next call. Object stores
  (gs://) cannot rename a directory (it is a copy, object by object): there the old export is
  replaced by a copy of the finished new one, which a reader may see half done; the training
  job writes metrics.json after the export, which marks it complete.
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
  path = path.rstrip("/")
  # Siblings whose names do not start with the export's: ram:// mixes up such paths.
  parent, name = path.rsplit("/", 1)
  partial, previous = f"{parent}/.{name}.partial", f"{parent}/.{name}.previous"
  if tf.io.gfile.exists(previous):  # Killed between the renames: the old export comes back.
    if tf.io.gfile.exists(path):
      tf.io.gfile.rmtree(previous)
    else:
      tf.io.gfile.rename(previous, path)
  if tf.io.gfile.exists(partial):  # Leftovers of an attempt that did not finish.
    tf.io.gfile.rmtree(partial)
  archive.write_out(partial, verbose=False)
  _write_keras_file(model, partial)
  if "://" in path:
    _replace_by_copy(partial, path)
    return
  if tf.io.gfile.exists(path):
    tf.io.gfile.rename(path, previous)
  tf.io.gfile.rename(partial, path)
  if tf.io.gfile.exists(previous):
    tf.io.gfile.rmtree(previous)


def _portable_layer(config: dict) -> dict:
  """One serialized Keras object (a dict) as the Keras file holds it: a mixed dtype policy
  becomes float32, a synchronised batch normalisation a plain one; anything else unchanged."""
  if (config.get("class_name") == "DTypePolicy"
      and config.get("config", {}).get("name") in _MIXED_POLICIES):
    return {**config, "config": {**config["config"], "name": "float32"}}
  if (config.get("class_name") == "BatchNormalization"
      and config.get("config", {}).get("synchronized")):
    # Only the TensorFlow backend accepts synchronized=True, and only multi-replica training
    # needs it: inference is the same without it, and a fit on one device too.
    return {**config, "config": {**config["config"], "synchronized": False}}
  return config


def _portable_config(config):
  """`config` (a serialized Keras object) with `_portable_layer` applied to each object in it."""
  if isinstance(config, dict):
    return {key: _portable_config(value) for key, value in _portable_layer(config).items()}
  if isinstance(config, list):
    return [_portable_config(value) for value in config]
  return config


def _portable_copy(model: keras.Model) -> keras.Model:
  """A new model of `model`'s architecture and weights that every Keras 3 backend (TensorFlow,
  JAX, PyTorch) loads: every layer computing in float32, batch normalisation unsynchronised.

  Keras saves each layer's dtype policy with it: a model trained under mixed_float16 would
  load as float16 layers on any machine, and a plain `fit` would train them without loss
  scaling. (A nested model's policy is not saved: the loader's global policy sets it.)
  Synchronised batch normalisation is saved as such too, and refused by the other backends.
  """
  copy = keras.saving.deserialize_keras_object(
      _portable_config(keras.saving.serialize_keras_object(model)))
  copy.set_weights(model.get_weights())
  return copy


def _write_keras_file(model: keras.Model, directory: str) -> None:
  """Writes `model` as `directory`/`KERAS_FILE`, backend-portable (see `_portable_copy`);
  Keras writes a gs:// (any `://`) path through tf.io.gfile, from a zip built in memory."""
  _portable_copy(model).save(f"{directory}/{KERAS_FILE}")


def _replace_by_copy(source: str, target: str) -> None:
  """Replaces the export at `target` by a copy of the one at `source`, then deletes `source`.

  Asks for `target`'s saved_model.pb, not `target` itself: some object-store file systems
  (TensorFlow's ram://) answer that a path exists when another path merely starts with it.
  """
  if tf.io.gfile.exists(f"{target}/{SAVED_MODEL}"):
    tf.io.gfile.rmtree(target)
  for directory, _, files in tf.io.gfile.walk(source):
    destination = target + directory[len(source):]
    tf.io.gfile.makedirs(destination)
    for name in files:
      tf.io.gfile.copy(f"{directory}/{name}", f"{destination}/{name}", overwrite=True)
  tf.io.gfile.rmtree(source)


def export_problem(path: str) -> Optional[str]:
  """What is missing or unreadable in the export at `path`, or None where it is whole: the
  SavedModel's graph and variables, and the Keras file."""
  graph, keras_path = os.path.join(path, SAVED_MODEL), os.path.join(path, KERAS_FILE)
  needed = [graph, os.path.join(path, "variables", "variables.index"), keras_path]
  missing = [file for file in needed if not tf.io.gfile.exists(file)]
  if missing:
    return f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} missing"
  try:
    with tf.io.gfile.GFile(graph, "rb") as f:
      saved_model_pb2.SavedModel.FromString(f.read())
    with tf.io.gfile.GFile(keras_path, "rb") as f, zipfile.ZipFile(f) as keras_file:
      corrupt = keras_file.testzip()
  except (message.DecodeError, zipfile.BadZipFile) as e:
    return f"the export is damaged ({first_line(e)})"
  return f"the export is damaged ({corrupt} in {keras_path} is corrupt)" if corrupt else None


def load(path: str):
  """The export at `path` (a SavedModel directory) for `predict_batches`; raises
  `UserInputError` when there is none."""
  if not tf.io.gfile.exists(os.path.join(path, SAVED_MODEL)):
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
