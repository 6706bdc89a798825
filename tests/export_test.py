"""Tests of trainer.export: the serving signature, and that the reload predicts as the model does."""

import os
import re
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from tests import helpers
from trainer import export as export_lib
from trainer import model as model_lib
from trainer.config import UserInputError


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  """An export of an untrained model (path), and that model: each export costs about 2 s."""
  model = model_lib.build_model(latent_dim=8, width=8)
  path = str(tmp_path_factory.mktemp("export") / "export")
  export_lib.export_saved_model(model, path)
  return path, model


@pytest.fixture(scope="module")
def reloaded(exported):
  """The module's export loaded once, for the tests of what its signatures refuse."""
  return tf.saved_model.load(exported[0])


def _copy_tree(source: str, target: str) -> None:
  """Copies the directory `source` into `target` (local or ram://) through tf.io.gfile."""
  for directory, _, files in tf.io.gfile.walk(source):
    destination = target + directory[len(source):]
    tf.io.gfile.makedirs(destination)
    for name in files:
      tf.io.gfile.copy(f"{directory}/{name}", f"{destination}/{name}", overwrite=True)


def test_export_reloads_with_a_uint8_serving_signature(exported):
  # Replacing an existing export is tested below, where the old one is replaced.
  path, model = exported
  serve = tf.saved_model.load(path).signatures["serving_default"]
  assert serve.structured_input_signature[1]["images"].dtype == tf.uint8
  images = helpers.learnable_split(5).images
  served = serve(images=tf.constant(images[..., 0]))
  assert served["classifier"].shape == (5, 10) and served["classifier"].dtype == tf.float32
  assert served["decoder"].shape == (5, 28, 28) and served["decoder"].dtype == tf.float32
  direct = model(images)
  np.testing.assert_allclose(served["classifier"], direct["classifier"], atol=1e-5)
  np.testing.assert_allclose(served["decoder"], direct["decoder"][..., 0], atol=1e-5)
  assert not tf.io.gfile.exists(path.replace("/export", "/.export.partial"))
  # The (N, 28, 28, 1) batches most MNIST code holds get the same answers.
  served4 = serve(images=tf.constant(images))
  np.testing.assert_array_equal(served4["classifier"], served["classifier"])
  np.testing.assert_array_equal(served4["decoder"], served["decoder"])
  # The latent signature gives the encoder's output, for embeddings and the report.
  reloaded = export_lib.load(path)
  latent = export_lib.predict_batches(reloaded, images, "latent", batch_size=2)["latent"]
  np.testing.assert_allclose(latent, model.get_layer("encoder")(images), atol=1e-5)
  outputs = export_lib.predict_batches(reloaded, images, batch_size=2)  # Batches of 2, 2 and 1.
  np.testing.assert_allclose(outputs["classifier"], direct["classifier"], atol=1e-5)


# On a local disk in the slow tier (4 s): the fast tier replaces a local export, clearing what a
# failed attempt left, in the next test, and here an object store's, which is replaced otherwise.
@pytest.mark.parametrize("root", [pytest.param("local", marks=pytest.mark.slow), "ram"])
def test_a_failed_write_keeps_the_old_export(exported, tmp_path, monkeypatch, root):
  path = str(tmp_path / "export") if root == "local" else f"ram://{tmp_path.name}/export"
  # The old export: a copy of the module's, as export_saved_model leaves one (not written again).
  _copy_tree(exported[0], path)
  old_model, new_model = exported[1], model_lib.build_model(latent_dim=8, width=8)
  images = helpers.learnable_split(4).images
  old_answers = export_lib.predict_batches(export_lib.load(path), images)["classifier"]
  np.testing.assert_allclose(old_answers, old_model(images)["classifier"], atol=1e-5)
  archive_class = type(keras.export.ExportArchive())  # The backend's subclass.

  def write_half_then_fail(archive, filepath, **kwargs):
    # An export written (copied: writing one takes 2 s), then its saved_model.pb lost.
    _copy_tree(exported[0], filepath)
    tf.io.gfile.remove(f"{filepath}/saved_model.pb")
    raise OSError("disk full")

  monkeypatch.setattr(archive_class, "write_out", write_half_then_fail)
  with pytest.raises(OSError):
    export_lib.export_saved_model(new_model, path)
  assert tf.io.gfile.exists(path.replace("/export", "/.export.partial"))  # The half write.
  np.testing.assert_array_equal(
      export_lib.predict_batches(export_lib.load(path), images)["classifier"], old_answers)
  # The next export clears what the failed one left, and replaces the old one.
  monkeypatch.undo()
  export_lib.export_saved_model(new_model, path)
  np.testing.assert_allclose(export_lib.predict_batches(export_lib.load(path), images)[
      "classifier"], new_model(images)["classifier"], atol=1e-5)
  assert not tf.io.gfile.exists(path.replace("/export", "/.export.partial"))


def test_an_old_export_left_between_the_renames_comes_back(exported, tmp_path):
  path = str(tmp_path / "export")
  # Killed between the two renames: the old export (a copy of the module's) at .export.previous.
  _copy_tree(exported[0], str(tmp_path / ".export.previous"))
  (tmp_path / ".export.partial").mkdir()
  export_lib.export_saved_model(exported[1], path)
  assert sorted(os.listdir(tmp_path)) == ["export"]


def test_loading_where_there_is_no_export_names_the_fix(tmp_path):
  with pytest.raises(UserInputError, match=f"no exported model at {tmp_path}; train one first"):
    export_lib.load(str(tmp_path))


def test_an_unreadable_export_names_the_fix(tmp_path):
  (tmp_path / "saved_model.pb").write_bytes(b"not a saved model")
  with pytest.raises(UserInputError, match=f"the export at {tmp_path} cannot be read .*; train "
                                           "again or point --model_dir at another finished job"):
    export_lib.load(str(tmp_path))


@pytest.mark.parametrize("signature", ["serving_default", "latent"])
@pytest.mark.parametrize("shape", [(2, 32, 32), (2, 28, 28, 3), (784,), (28, 28, 1, 1, 1), ()])
def test_a_batch_of_another_shape_is_refused_naming_28x28(reloaded, signature, shape):
  serve = reloaded.signatures[signature]
  with pytest.raises(tf.errors.InvalidArgumentError,
                     match=re.escape(export_lib.EXPECTED_INPUT) + r"; got shape\] \[" +
                           " ".join(map(str, shape)) + r"\]"):
    serve(images=tf.zeros(shape, tf.uint8))


def test_a_batch_of_another_dtype_is_refused(reloaded):
  # Only a tensor's dtype can be refused: NumPy arrays are cast to uint8 before the graph runs,
  # by this signature wrapper and by Session clients such as saved_model_cli alike.
  serve = reloaded.signatures["serving_default"]
  with pytest.raises(tf.errors.InvalidArgumentError, match="expected to be a uint8 tensor"):
    serve(images=tf.zeros((2, 28, 28), tf.float32))


def _saved_model_cli(*args):
  """Runs TensorFlow's own SavedModel client, as a serving user might; the CompletedProcess."""
  cli = os.path.join(os.path.dirname(sys.executable), "saved_model_cli")
  return subprocess.run([cli, *args], env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
                        capture_output=True, text=True, timeout=300)


def _run_signature(path, inputs, outdir):
  return _saved_model_cli("run", "--dir", path, "--tag_set", "serve", "--signature_def",
                          "serving_default", "--inputs", f"images={inputs}", "--outdir", outdir)


@pytest.mark.slow  # About 20 s: four runs of the client, each loading TensorFlow.
def test_saved_model_cli_gets_the_models_answers_and_refuses_another_shape(exported, tmp_path):
  path, model = exported
  images = np.random.default_rng(3).integers(0, 256, (2, 28, 28, 1)).astype(np.uint8)
  direct = model(images)
  for name, batch in [("nhwc", images), ("nhw", images[..., 0])]:
    np.save(tmp_path / f"{name}.npy", batch)
    result = _run_signature(path, tmp_path / f"{name}.npy", tmp_path / name)
    assert result.returncode == 0, result.stderr[-2000:]
    classifier = np.load(tmp_path / name / "classifier.npy")
    decoder = np.load(tmp_path / name / "decoder.npy")
    assert classifier.dtype == decoder.dtype == np.float32
    np.testing.assert_allclose(classifier, direct["classifier"], atol=1e-5)
    np.testing.assert_allclose(decoder, direct["decoder"][..., 0], atol=1e-5)
  for output in ["classifier", "decoder"]:
    np.testing.assert_array_equal(np.load(tmp_path / "nhwc" / f"{output}.npy"),
                                  np.load(tmp_path / "nhw" / f"{output}.npy"))
  np.save(tmp_path / "big.npy", np.zeros((2, 32, 32), np.uint8))
  result = _run_signature(path, tmp_path / "big.npy", tmp_path / "big")
  assert result.returncode != 0
  assert ("[images must be uint8 of shape (N, 28, 28) or (N, 28, 28, 1): 28x28 grey, 0-255; "
          "got shape] [2 32 32]") in result.stderr, result.stderr[-2000:]
  assert not (tmp_path / "big").exists()
  # What serving systems read from the export: a uint8 input of any rank (checked in the graph).
  shown = _saved_model_cli("show", "--dir", path, "--tag_set", "serve", "--signature_def",
                           "serving_default")
  assert re.search(r"inputs\['images'\] tensor_info:\s+dtype: DT_UINT8\s+shape: unknown_rank",
                   shown.stdout), shown.stdout
