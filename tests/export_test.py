"""Tests of trainer.multitask.export: the serving signature, that the reload predicts as the model does, and
the Keras file beside it (loaded, fine-tuned and saved as the README shows)."""

import importlib.util
import os
import re
import shutil
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from tests import helpers
from trainer.errors import UserInputError
from trainer.multitask import export as export_lib
from trainer.multitask import model as model_lib


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


def _writes_by_copying(monkeypatch, export: str) -> None:
  """Has each SavedModel write copy `export` (the same model's, written once by the `exported`
  fixture) in place of tracing and writing it again (2 s): the tests of what
  export_saved_model does around the write, the Keras file's write included."""
  archive_class = type(keras.export.ExportArchive())  # The backend's subclass.
  monkeypatch.setattr(archive_class, "write_out",
                      lambda archive, filepath, **kwargs: _copy_tree(export, filepath))


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
  # The Keras file is one more file of the SavedModel's directory: the loads above ignore it.
  assert sorted(tf.io.gfile.listdir(path)) == [
      "assets", "fingerprint.pb", export_lib.KERAS_FILE, "saved_model.pb", "variables"]
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


# On a local disk in the slow tier: the fast tier replaces a local export, clearing what a failed
# attempt left, in the next test, and here an object store's, which is replaced otherwise.
@pytest.mark.parametrize("root", [pytest.param("local", marks=pytest.mark.slow), "ram"])
def test_a_failed_write_keeps_the_old_export(exported, finished_run, tmp_path, monkeypatch,
                                             root):
  path = str(tmp_path / "export") if root == "local" else f"ram://{tmp_path.name}/export"
  # The old export: a copy of the finished run's (another model's, trained), as
  # export_saved_model leaves one; the new one is the module's model.
  _copy_tree(os.path.join(finished_run[0], "export"), path)
  new_model = exported[1]
  images = helpers.learnable_split(4).images
  old_answers = export_lib.predict_batches(export_lib.load(path), images)["classifier"]
  assert not np.allclose(old_answers, new_model(images)["classifier"], atol=1e-3)
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
  _writes_by_copying(monkeypatch, exported[0])
  export_lib.export_saved_model(new_model, path)
  np.testing.assert_allclose(export_lib.predict_batches(export_lib.load(path), images)[
      "classifier"], new_model(images)["classifier"], atol=1e-5)
  assert not tf.io.gfile.exists(path.replace("/export", "/.export.partial"))


def test_an_old_export_left_between_the_renames_comes_back(exported, tmp_path, monkeypatch):
  path = str(tmp_path / "export")
  # Killed between the two renames: the old export (a copy of the module's) at .export.previous.
  _copy_tree(exported[0], str(tmp_path / ".export.previous"))
  (tmp_path / ".export.partial").mkdir()
  _writes_by_copying(monkeypatch, exported[0])
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


# TensorFlow's own SavedModel client, as a serving user runs it (`saved_model_cli` runs this
# module's main), each run its own process forked from one that has imported TensorFlow
# (helpers.start_command_forked): TensorFlow's start-up (8 s a process) is not the test's.
SAVED_MODEL_CLI = "tensorflow.python.tools.saved_model_cli"


def _start_signature(path, inputs, outdir, log) -> helpers.ForkedCommand:
  return helpers.start_command_forked(
      log, SAVED_MODEL_CLI, "run", "--dir", path, "--tag_set", "serve", "--signature_def",
      "serving_default", "--inputs", f"images={inputs}", "--outdir", str(outdir))


def _finished(clients: dict, logs) -> dict:
  """Waits for the started clients, by name: (return code, output) by the same names, the
  output both streams as `logs`/NAME.log holds them. Any still running when one fails to end
  in time is killed."""
  try:
    return {name: (client.wait(timeout=120), (logs / f"{name}.log").read_text())
            for name, client in clients.items()}
  finally:
    for client in clients.values():
      if client.poll() is None:
        client.kill()
        client.wait()


@pytest.mark.slow  # Four runs of the client, side by side.
def test_saved_model_cli_gets_the_models_answers_and_refuses_another_shape(exported, tmp_path):
  path, model = exported
  images = np.random.default_rng(3).integers(0, 256, (2, 28, 28, 1)).astype(np.uint8)
  direct = model(images)
  batches = {"nhwc": images, "nhw": images[..., 0], "big": np.zeros((2, 32, 32), np.uint8)}
  for name, batch in batches.items():
    np.save(tmp_path / f"{name}.npy", batch)
  # Independent clients of one export: started together.
  clients = {name: _start_signature(path, tmp_path / f"{name}.npy", tmp_path / name,
                                    tmp_path / f"{name}.log")
             for name in batches}
  # What serving systems read from the export: a uint8 input of any rank (checked in the graph).
  clients["show"] = helpers.start_command_forked(
      tmp_path / "show.log", SAVED_MODEL_CLI, "show", "--dir", path, "--tag_set", "serve",
      "--signature_def", "serving_default")
  results = _finished(clients, tmp_path)
  for name in ["nhwc", "nhw"]:
    returncode, output = results[name]
    assert returncode == 0, output[-2000:]
    classifier = np.load(tmp_path / name / "classifier.npy")
    decoder = np.load(tmp_path / name / "decoder.npy")
    assert classifier.dtype == decoder.dtype == np.float32
    np.testing.assert_allclose(classifier, direct["classifier"], atol=1e-5)
    np.testing.assert_allclose(decoder, direct["decoder"][..., 0], atol=1e-5)
  for output in ["classifier", "decoder"]:
    np.testing.assert_array_equal(np.load(tmp_path / "nhwc" / f"{output}.npy"),
                                  np.load(tmp_path / "nhw" / f"{output}.npy"))
  returncode, output = results["big"]
  assert returncode != 0
  assert ("[images must be uint8 of shape (N, 28, 28) or (N, 28, 28, 1): 28x28 grey, 0-255; "
          "got shape] [2 32 32]") in output, output[-2000:]
  assert not (tmp_path / "big").exists()
  returncode, shown = results["show"]
  assert returncode == 0, shown[-2000:]
  assert re.search(r"inputs\['images'\] tensor_info:\s+dtype: DT_UINT8\s+shape: unknown_rank",
                   shown), shown


# The Keras file and TFSMLayer, as the README shows them to a user of a finished run's export.


def _layers(model: keras.Model):
  """Every layer of `model`, those of its nested models (encoder, heads) included."""
  for layer in model.layers:
    yield layer
    if isinstance(layer, keras.Model):
      yield from _layers(layer)


def test_the_keras_file_predicts_as_the_serving_signature(finished_run):
  export = os.path.join(finished_run[0], "export")
  assert export_lib.KERAS_FILE == "model.keras"  # The README's name for it.
  model = keras.models.load_model(f"{export}/model.keras")
  new = helpers.learnable_split(50, seed=7)
  images = new.images  # uint8, (N, 28, 28, 1).
  # Plain batch normalisation, which every backend has: the run trained with the synchronised
  # kind, which only TensorFlow's has (the slow tier loads the file on PyTorch's).
  norms = [layer for layer in _layers(model)
           if isinstance(layer, keras.layers.BatchNormalization)]
  assert norms and not any(layer.synchronized for layer in norms)
  predicted = model.predict(images, verbose=0)
  assert predicted["classifier"].shape == (50, 10)
  assert predicted["decoder"].shape == (50, 28, 28, 1)  # The signature drops the last axis.
  served = export_lib.predict_batches(export_lib.load(export), images)
  np.testing.assert_allclose(predicted["classifier"], served["classifier"], atol=1e-5)
  np.testing.assert_allclose(predicted["decoder"][..., 0], served["decoder"], atol=1e-5)
  # The trained run's answers, not an untrained model's: it learnt the patches.
  assert (predicted["classifier"].argmax(1) == new.labels).mean() > 0.9


# The slow tier (9 s: Keras traces its evaluation, training and prediction): the fast tier loads
# the Keras file and predicts with it, above.
@pytest.mark.slow
def test_the_readmes_fine_tuning_snippet_trains_the_exported_model(finished_run, tmp_path):
  export = os.path.join(finished_run[0], "export")
  new = helpers.learnable_split(256, seed=11)  # Data the run did not train on.
  images, labels = new.images, new.labels  # uint8 (N, 28, 28, 1), int (N,).
  # The README's snippet line for line, with checks between its lines.
  model = keras.models.load_model(f"{export}/model.keras")
  model.compile(optimizer=keras.optimizers.AdamW(1e-4),
                loss={"classifier": "sparse_categorical_crossentropy", "decoder": "mse"},
                loss_weights={"classifier": 1.0, "decoder": 8.0})
  targets = {"classifier": labels, "decoder": images / 255}
  loss_before = model.evaluate(images, targets, batch_size=256, verbose=0, return_dict=True)
  weights_before = model.get_weights()
  model.fit(images, {"classifier": labels, "decoder": images / 255}, epochs=1, batch_size=32)
  loss_after = model.evaluate(images, targets, batch_size=256, verbose=0, return_dict=True)
  assert any(not np.array_equal(before, after)
             for before, after in zip(weights_before, model.get_weights()))
  assert loss_after["loss"] < loss_before["loss"], (loss_before, loss_after)
  model.save(str(tmp_path / "fine_tuned.keras"))
  again = keras.models.load_model(str(tmp_path / "fine_tuned.keras"))
  for name, output in again.predict(images[:8], verbose=0).items():
    np.testing.assert_allclose(output, model.predict(images[:8], verbose=0)[name], atol=1e-6)


# Run as `KERAS_BACKEND=torch python -c _ON_TORCH model.keras directory`: predicts the images in
# directory/images.npy into directory/<output>.npy, then trains a step as the README's snippet does.
_ON_TORCH = """
import sys
import keras
import numpy as np
assert keras.backend.backend() == "torch", keras.backend.backend()
model_file, directory = sys.argv[1:]
model = keras.models.load_model(model_file)
images, labels = np.load(f"{directory}/images.npy"), np.load(f"{directory}/labels.npy")
for name, output in model.predict(images, verbose=0).items():
  np.save(f"{directory}/{name}.npy", output)
model.compile(optimizer=keras.optimizers.AdamW(1e-4),
              loss={"classifier": "sparse_categorical_crossentropy", "decoder": "mse"},
              loss_weights={"classifier": 1.0, "decoder": 8.0})
before = model.get_weights()
history = model.fit(images, {"classifier": labels, "decoder": images / 255}, epochs=1,
                    batch_size=len(images), verbose=0)
assert np.isfinite(history.history["loss"][0]), history.history
assert any(not np.array_equal(old, new) for old, new in zip(before, model.get_weights()))
"""


@pytest.mark.skipif(importlib.util.find_spec("torch") is None,
                    reason="PyTorch is not installed (the `bench` extra)")
@pytest.mark.slow  # Another process, loading PyTorch and Keras: 10-20 s.
def test_the_keras_file_predicts_and_trains_on_pytorch_as_on_tensorflow(finished_run, tmp_path):
  model_file = os.path.join(finished_run[0], "export", export_lib.KERAS_FILE)
  new = helpers.learnable_split(8, seed=7)
  np.save(tmp_path / "images.npy", new.images)  # uint8 (N, 28, 28, 1).
  np.save(tmp_path / "labels.npy", new.labels)
  on_torch = subprocess.run(
      [sys.executable, "-c", _ON_TORCH, model_file, str(tmp_path)],
      env={**os.environ, "KERAS_BACKEND": "torch", "TF_CPP_MIN_LOG_LEVEL": "2"},
      capture_output=True, text=True, timeout=300)
  assert on_torch.returncode == 0, on_torch.stderr[-2000:]
  on_tensorflow = keras.models.load_model(model_file).predict(new.images, verbose=0)
  for name, output in on_tensorflow.items():
    # The same float32 arithmetic in another order: round-off apart.
    np.testing.assert_allclose(np.load(tmp_path / f"{name}.npy"), output, rtol=1e-5, atol=1e-5)


def test_tfsm_layer_serves_the_export_in_keras(finished_run):
  export = os.path.join(finished_run[0], "export")
  images = helpers.learnable_split(6, seed=7).images
  served = export_lib.predict_batches(export_lib.load(export), images)
  layer = keras.layers.TFSMLayer(export, call_endpoint="serving_default")
  for batch in [images, images[..., 0]]:  # uint8 (N, 28, 28, 1) or (N, 28, 28).
    outputs = layer(batch)
    assert sorted(outputs) == ["classifier", "decoder"]
    assert outputs["classifier"].shape == (6, 10) and outputs["decoder"].shape == (6, 28, 28)
    np.testing.assert_array_equal(outputs["classifier"], served["classifier"])
    np.testing.assert_array_equal(outputs["decoder"], served["decoder"])


# The object-store case (ram:// stands in for gs://) of a GPU's or a TPU's run.
@pytest.mark.slow  # 6 s each; the fast tier's exports are float32.
@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_a_mixed_precision_export_holds_a_float32_keras_file(tmp_path, monkeypatch, policy):
  keras.mixed_precision.set_dtype_policy(policy)
  model = model_lib.build_model(latent_dim=8, width=8)
  path = f"ram://{tmp_path.name}/export"
  real_open = open

  def open_for_reading_only(file, mode="r", *args, **kwargs):
    assert not set(mode) & set("wax+"), f"plain open({file!r}, {mode!r})"
    return real_open(file, mode, *args, **kwargs)

  monkeypatch.setattr("builtins.open", open_for_reading_only)  # Writes go through tf.io.gfile.
  export_lib.export_saved_model(model, path)
  monkeypatch.undo()
  keras.mixed_precision.set_dtype_policy("float32")  # A CPU machine's default.
  loaded = keras.models.load_model(f"{path}/model.keras")
  assert {layer.dtype_policy.name for layer in _layers(loaded)} == {"float32"}
  for saved, trained in zip(loaded.get_weights(), model.get_weights(), strict=True):
    np.testing.assert_array_equal(saved, trained)  # Mixed precision's weights are float32.
  new = helpers.learnable_split(64, seed=3)
  images, labels = new.images, new.labels
  # The SavedModel computes in 16 bits, the Keras file in 32: the same weights.
  served = export_lib.predict_batches(export_lib.load(path), images)
  predicted = loaded.predict(images, verbose=0)
  np.testing.assert_allclose(predicted["classifier"], served["classifier"], atol=1e-2)
  np.testing.assert_allclose(predicted["decoder"][..., 0], served["decoder"], atol=1e-2)
  loaded.compile(optimizer=keras.optimizers.AdamW(1e-4),
                 loss={"classifier": "sparse_categorical_crossentropy", "decoder": "mse"},
                 loss_weights={"classifier": 1.0, "decoder": 8.0})
  weights_before = loaded.get_weights()
  history = loaded.fit(images, {"classifier": labels, "decoder": images / 255}, epochs=1,
                       batch_size=32, verbose=0)
  assert np.isfinite(history.history["loss"][0])
  assert any(not np.array_equal(before, after)
             for before, after in zip(weights_before, loaded.get_weights()))


@pytest.mark.parametrize("damage, problem", [
    (None, None),
    ("export/model.keras", r".*/export/model.keras is missing"),
    ("export/variables", r".*/export/variables/variables.index is missing"),
    ("cut export/model.keras", r"the export is damaged \(File is not a zip file\)"),
    ("flip export/model.keras", r"the export is damaged \(\S+ in .*/export/model.keras is corrupt\)"),
    ("cut export/saved_model.pb", r"the export is damaged \(.*\)"),
])
def test_the_export_problem_names_what_is_missing_or_damaged(finished_run, tmp_path, damage,
                                                             problem):
  run = tmp_path / "run"
  shutil.copytree(finished_run[0], run)
  if damage and damage.startswith("cut "):
    path = run / damage[4:]
    path.write_bytes(path.read_bytes()[:30])
  elif damage and damage.startswith("flip "):  # A byte of a member's data: the zip still opens.
    path = run / damage[5:]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
  elif damage:
    target = run / damage
    shutil.rmtree(target) if target.is_dir() else target.unlink()
  found = export_lib.export_problem(str(run / "export"))
  assert found is None if problem is None else re.fullmatch(problem, found), found
