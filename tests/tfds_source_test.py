"""TensorFlow Datasets as users get it, offline: a real `fashion_mnist` download through a proxy
on loopback that serves Debian's copy, the job trained on what it prepared, the fast clear
failure with no network, and which TFDS failures become `error:` lines.

Needs only the package's own requirements, pytest and portpicker (CI runs it in an environment
with nothing else), and Debian's Fashion-MNIST (`apt-get install -y dataset-fashion-mnist`).
"""

import hashlib
import http.server
import os
import threading
import time
import urllib.parse

import numpy as np
import portpicker
import pytest
import requests
import tensorflow as tf
import tensorflow_datasets as tfds
from tensorflow_datasets.core import utils as tfds_utils
from tensorflow_datasets.core.download import checksums

from tests import helpers
from trainer.data import sources
from trainer.errors import UserInputError

FASHION_MNIST_HOST = "fashion-mnist.s3-website.eu-central-1.amazonaws.com"
FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
         "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
PROXY_VARIABLES = ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy",
                   "ALL_PROXY")

# Skipped on a laptop without Debian's copy; in CI (which installs it) a missing copy fails.
needs_fashion_mnist = pytest.mark.skipif(
    not os.environ.get("CI")
    and not all(os.path.exists(os.path.join(helpers.FASHION_MNIST_DIR, f)) for f in FILES),
    reason="needs Debian's Fashion-MNIST: apt-get install -y dataset-fashion-mnist")


class _MirrorProxy(http.server.BaseHTTPRequestHandler):
  """An HTTP proxy that answers requests for the Fashion-MNIST host from Debian's files, and
  404 for anything else: nothing leaves the machine."""

  def do_GET(self):
    self._answer(send_body=True)

  def do_HEAD(self):
    self._answer(send_body=False)

  def _answer(self, send_body: bool):
    url = urllib.parse.urlsplit(self.path)  # A proxy is sent absolute URIs.
    path = os.path.join(helpers.FASHION_MNIST_DIR, os.path.basename(url.path))
    self.server.seen.append((self.command, self.path))
    if url.netloc != FASHION_MNIST_HOST or os.path.basename(path) not in FILES:
      self.send_error(404)
      return
    with open(path, "rb") as f:
      body = f.read()
    self.send_response(200)
    self.send_header("Content-Length", str(len(body)))
    self.end_headers()
    if send_body:
      self.wfile.write(body)

  def log_message(self, *args):  # Keep the test log to the test's own output.
    pass


class _Proxy:
  """`_MirrorProxy` served on 127.0.0.1 from a thread while in the `with` block."""

  def __enter__(self):
    self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _MirrorProxy)
    self.server.seen = []
    self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
    self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
    self.thread.start()
    return self

  def __exit__(self, *exc):
    self.server.shutdown()
    self.server.server_close()
    self.thread.join()


def _use_proxy(monkeypatch, proxy_url: str) -> None:
  """Sends every download through `proxy_url`, as `requests` (TFDS's downloader) reads it."""
  for name in PROXY_VARIABLES:
    monkeypatch.setenv(name, proxy_url)
  monkeypatch.setenv("NO_PROXY", "")
  monkeypatch.setenv("no_proxy", "")


def _debian_checksums() -> dict:
  """TFDS's checksum registry entries for Debian's files, which Debian recompressed (so
  TFDS's own sha256 and sizes do not match them)."""
  infos = {}
  for name in FILES:
    with open(os.path.join(helpers.FASHION_MNIST_DIR, name), "rb") as f:
      body = f.read()
    infos[f"http://{FASHION_MNIST_HOST}/{name}"] = checksums.UrlInfo(
        size=tfds_utils.Size(len(body)), checksum=hashlib.sha256(body).hexdigest(),
        filename=name)
  return infos


def _rows(split: sources.Split) -> np.ndarray:
  """A split's (label, image bytes) rows, sorted: equal arrays mean equal multisets."""
  rows = np.concatenate([split.labels.astype(np.uint8)[:, None],
                         split.images.reshape(len(split), -1)], axis=1)
  return np.sort(np.ascontiguousarray(rows).view(np.dtype((np.void, rows.shape[1]))).ravel())


@pytest.fixture(scope="module")
def fashion_mnist_dir(tmp_path_factory):
  """A --data_dir where TFDS downloaded and prepared fashion_mnist through the package's own
  loading call, from Debian's files: (data_dir, the loaded splits, the proxy's requests)."""
  if not os.environ.get("CI") and not all(
      os.path.exists(os.path.join(helpers.FASHION_MNIST_DIR, f)) for f in FILES):
    pytest.skip("needs Debian's Fashion-MNIST: apt-get install -y dataset-fashion-mnist")
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  with _Proxy() as proxy, pytest.MonkeyPatch.context() as monkeypatch:
    _use_proxy(monkeypatch, proxy.url)
    # For this test only, and the installed package's registry untouched: the registry file is
    # still found the way users' TFDS finds it (`_checksums_path`, through `code_path`, where
    # TFDS 4.9.10 imports its undeclared importlib_resources); only what it reads is replaced.
    registries_read, load_url_infos = [], checksums.load_url_infos

    def debian_checksums_for_fashion_mnist(path):
      registries_read.append(os.path.basename(str(path)))
      return _debian_checksums() if "fashion_mnist" in str(path) else load_url_infos(path)

    monkeypatch.setattr(checksums, "load_url_infos", debian_checksums_for_fashion_mnist)
    _forget_url_infos()
    try:
      start = time.monotonic()
      splits = sources.load_splits("tfds:fashion_mnist", data_dir)
      print(f"downloaded and prepared fashion_mnist in {time.monotonic() - start:.0f} s")
    finally:
      _forget_url_infos()  # The class caches what it read: later tests get the real registry.
    # TFDS keeps the registry of this legacy set apart, in url_checksums/fashion_mnist.txt.
    assert "fashion_mnist.txt" in registries_read
    seen = list(proxy.server.seen)
  return data_dir, splits, seen


def _forget_url_infos() -> None:
  """Empties TFDS's per-class cache of checksum registries (`DatasetBuilder.url_infos`)."""
  tfds.core.DatasetBuilder.__dict__["url_infos"].fget.__func__.cache_clear()


@pytest.mark.slow
def test_tfds_download_agrees_with_the_idx_files(fashion_mnist_dir):
  data_dir, splits, seen = fashion_mnist_dir
  assert sorted(path for command, path in seen if command == "GET") == sorted(
      f"http://{FASHION_MNIST_HOST}/{name}" for name in FILES)
  assert (len(splits.train), len(splits.validation), len(splits.test)) == (50_000, 10_000, 10_000)
  idx = sources.load_splits(f"idx:{helpers.FASHION_MNIST_DIR}")
  # Named by TFDS's metadata and, for the IDX files, recognised by their labels: alike.
  assert splits.class_names == idx.class_names == sources.FASHION_MNIST_CLASSES
  # TFDS shuffles when it writes: compare as multisets of (label, image).
  tfds_train = sources.Split(np.concatenate([splits.train.images, splits.validation.images]),
                          np.concatenate([splits.train.labels, splits.validation.labels]))
  idx_train = sources.Split(np.concatenate([idx.train.images, idx.validation.images]),
                         np.concatenate([idx.train.labels, idx.validation.labels]))
  np.testing.assert_array_equal(_rows(tfds_train), _rows(idx_train))
  np.testing.assert_array_equal(_rows(splits.test), _rows(idx.test))
  assert not [path for path in helpers.directory_state(data_dir)
              if ".tmp." in path or "incomplete." in path]


@pytest.mark.slow
def test_job_trains_on_the_prepared_data_dir_with_no_network(fashion_mnist_dir, tmp_path):
  data_dir, _, _ = fashion_mnist_dir
  closed = f"http://127.0.0.1:{portpicker.pick_unused_port()}"  # Any download would fail.
  # The narrow model: an epoch of all 50,000 images is still what this test pays for.
  result = helpers.run_command_forked(
      "trainer.task", "--dataset=tfds:fashion_mnist", f"--data_dir={data_dir}",
      f"--model_dir={tmp_path / 'm'}", "--epochs=1", "--width=8", "--latent_dim=16",
      "--batch_size=256", "--shift_pixels=0", "--noreport",
      env={**{name: closed for name in PROXY_VARIABLES}, "NO_PROXY": "", "no_proxy": ""},
      timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  metrics = helpers.read_metrics(str(tmp_path / "m"))
  assert metrics["train_examples"] == 50_000
  assert metrics["test_accuracy"] >= 0.8
  # What predict reads: the names of its classes, and garments on a dark ground.
  assert metrics["class_names"] == list(sources.FASHION_MNIST_CLASSES)
  assert metrics["input_background"] == "dark"


@pytest.mark.slow  # A real download attempt from a job's own process: 2 s.
def test_offline_download_fails_fast_naming_the_host(tmp_path):
  data_dir = tmp_path / "data"
  data_dir.mkdir()
  closed = f"http://127.0.0.1:{portpicker.pick_unused_port()}"  # Nothing listens there.
  start = time.monotonic()
  result = helpers.run_command_forked(
      "trainer.task", "--dataset=mnist", f"--data_dir={data_dir}",
      f"--model_dir={tmp_path / 'm'}",
      env={**{name: closed for name in PROXY_VARIABLES}, "NO_PROXY": "", "no_proxy": ""},
      timeout=120)
  elapsed = time.monotonic() - start
  line = helpers.assert_one_error_line(result, "could not reach storage.googleapis.com")
  assert closed in line  # The proxy it went through.
  assert "--dataset=mnist_sample" in line and "--data_dir" in line
  assert elapsed < 60
  assert os.listdir(data_dir) == []


@needs_fashion_mnist
def test_failed_download_is_an_error_and_leaves_no_partial_files(tmp_path, monkeypatch):
  # TFDS's real registry: Debian's recompressed files fail its checksums after downloading.
  data_dir = tmp_path / "data"
  (data_dir / "downloads").mkdir(parents=True)
  (data_dir / "downloads" / "notes.txt.tmp.keep").write_text("the user's")
  before = helpers.directory_state(data_dir)
  assert sorted(before) == ["downloads/", "downloads/notes.txt.tmp.keep"]
  with _Proxy() as proxy:
    _use_proxy(monkeypatch, proxy.url)
    with pytest.raises(UserInputError, match="has wrong checksum.*delete that file"):
      sources.load_splits("tfds:fashion_mnist", str(data_dir))
  assert helpers.directory_state(data_dir) == before


def test_class_names_come_from_the_tfds_metadata():
  with tfds.testing.mock_data(num_examples=120):
    named = {name: sources.load_splits(f"tfds:{name}", data_dir="/nonexistent").class_names
             for name in ("fashion_mnist", "kmnist", "mnist")}
  assert named["fashion_mnist"] == sources.FASHION_MNIST_CLASSES
  assert named["kmnist"][:3] == ("o", "ki", "su")  # Its own names, not recognised labels.
  assert named["mnist"] == sources.DIGITS


def test_unknown_dataset_is_an_error():
  with pytest.raises(UserInputError, match="no dataset 'no_such_set'"):
    sources.load_splits("tfds:no_such_set")


def test_running_out_of_memory_is_not_blamed_on_the_data_dir(monkeypatch, tmp_path):
  def out_of_memory(*args, **kwargs):
    raise tf.errors.ResourceExhaustedError(None, None, "OOM when allocating tensor")
  monkeypatch.setattr(tfds, "load", out_of_memory)
  with pytest.raises(tf.errors.ResourceExhaustedError):
    sources.load_splits("tfds:mnist", str(tmp_path))


def test_a_bug_inside_tfds_keeps_its_traceback(monkeypatch, tmp_path):
  def broken_load(*args, **kwargs):
    raise ImportError("No module named 'some_undeclared_dependency'")
  monkeypatch.setattr(tfds, "load", broken_load)
  with pytest.raises(ImportError, match="some_undeclared_dependency"):
    sources.load_splits("tfds:mnist", str(tmp_path))


@pytest.mark.parametrize("error, message", [
    (requests.exceptions.ConnectionError(
        "Max retries exceeded", request=requests.Request("GET", "https://example.test/x")),
     "could not download from example.test .*--dataset=mnist_sample"),
    (tfds.download.DownloadError("Failed to get url https://example.test/x. HTTP code: 404."),
     "HTTP code: 404"),
    (PermissionError(13, "Permission denied", "/data/downloads"), "writable --data_dir"),
    (OSError(28, "No space left on device"), "writable --data_dir with room"),
    (tf.errors.ResourceExhaustedError(None, None, "No space left on device"),
     "writable --data_dir with room"),
])
def test_user_fixable_tfds_failures_are_errors(monkeypatch, tmp_path, error, message):
  def failing_load(*args, **kwargs):
    raise error
  monkeypatch.setattr(tfds, "load", failing_load)
  with pytest.raises(UserInputError, match=message):
    sources.load_splits("tfds:mnist", str(tmp_path))
