"""TensorFlow Datasets as a source: `load` downloads a set into `--data_dir` when absent and
reads its train and test splits, and the names its metadata gives the labels.

TFDS's downloader retries each file ten times with backoff and has no setting to retry less,
so offline it would take minutes to fail: `load` first sends one request to each download
host, and stops with one clear error naming the host that cannot be reached. Failures the
user can fix become `UserInputError`; a failed download's temporary files are removed.
"""

import dataclasses
import errno
import os
import shutil
import urllib.parse
from typing import Dict, Optional, Tuple

import numpy as np
import requests  # TFDS's own download library: the host check goes the way its downloads go.
import tensorflow as tf
import tensorflow_datasets as tfds
from tensorflow_datasets.core import constants
from tensorflow_datasets.core.download import download_manager

from trainer.errors import first_line, UserInputError

# Split name to (images, labels), as TFDS holds them.
Arrays = Dict[str, Tuple[np.ndarray, np.ndarray]]


@dataclasses.dataclass(frozen=True)
class Loaded:
  """A TFDS set as `load` reads it."""
  arrays: Arrays  # "train" and "test"
  class_names: Tuple[str, ...]  # By label, from TFDS's metadata; empty where it has none.


def load(name: str, data_dir: str) -> Loaded:
  """The (images, labels) of TFDS `name`'s train and test splits, downloaded into `data_dir`
  (TFDS's default where empty) when absent, and its label names.

  Failures the user can fix (an unknown name, a dataset without (image, label) pairs, a host
  that cannot be reached, a failed or corrupted download, an unwritable or full `data_dir`)
  raise `UserInputError`; anything else is a bug and propagates with its traceback. Either
  way, the temporary files this attempt left in `data_dir` are removed.
  """
  try:
    builder = tfds.builder(name, data_dir=data_dir or None)
  except tfds.core.registered.DatasetNotFoundError:
    raise UserInputError(
        f"--dataset=tfds:{name}: TensorFlow Datasets has no dataset {name!r}; "
        "try fashion_mnist or kmnist") from None
  if not builder.info.supervised_keys:
    raise UserInputError(
        f"--dataset=tfds:{name}: TFDS {name} has no (image, label) pairs; choose an image "
        "classification set such as fashion_mnist or kmnist")
  root, class_names = os.fspath(builder.data_dir_root), _label_names(builder)
  try:
    # What is already prepared is read without touching the network (nor the probe below).
    return Loaded(_read_tfds(name, data_dir, download=False), class_names)
  except AssertionError:  # TFDS's "could not find data": it has to be downloaded.
    pass
  except BaseException as e:
    _raise_if_user_fixable(e, name, root)
    raise
  _check_hosts_reachable(builder, root)
  before = _listing(root)
  try:
    return Loaded(_read_tfds(name, data_dir, download=True), class_names)
  except BaseException as e:
    if before is not None:
      _remove_partial_files(root, before)
    _raise_if_user_fixable(e, name, root)
    raise


def _label_names(builder) -> Tuple[str, ...]:
  """The names TFDS's metadata gives the labels (`info.features["label"].names` for most
  sets), by label; empty where the label is not a named class."""
  label_key = builder.info.supervised_keys[1]
  feature = builder.info.features[label_key] if isinstance(label_key, str) else None
  return tuple(str(name) for name in getattr(feature, "names", None) or ())


def _read_tfds(name: str, data_dir: str, download: bool) -> Arrays:
  """TFDS's train and test splits of `name` as arrays."""
  train, test = tfds.load(name, split=["train", "test"], data_dir=data_dir or None,
                          as_supervised=True, download=download)
  return {"train": _to_numpy(train), "test": _to_numpy(test)}


def _raise_if_user_fixable(error: BaseException, name: str, root: str) -> None:
  """Raises `UserInputError` for a TFDS failure the user can fix; returns for a bug."""
  problem = _tfds_user_problem(error)
  if problem is not None:
    raise UserInputError(f"cannot load TFDS {name} into --data_dir={root}: {problem}") from None


# Why the job cannot go on without a network, and what works without one.
_OFFLINE_FIX = ("with no network, use --dataset=mnist_sample, or a --data_dir where the dataset "
                "is already prepared")
# The proxy answers these for a host it cannot reach; TFDS would retry them for minutes.
_GATEWAY_STATUSES = (502, 503, 504)
# Seconds to wait for a host (or the proxy) to accept a connection and to answer.
_PROBE_TIMEOUT = 10


def _check_hosts_reachable(builder, root: str) -> None:
  """Raises `UserInputError` naming the first host of the builder's downloads that cannot be
  reached, before TFDS tries: offline, its downloader retries each file ten times with
  backoff (minutes), and it has no setting to retry less.

  One request per host, through the same proxy settings (`*_proxy`, `NO_PROXY`) as TFDS's own
  `requests` downloads, and none for files already in the download cache. Datasets that
  register no URLs are left to TFDS.
  """
  first_url_by_host = {}
  for url, info in sorted((builder.url_infos or {}).items()):
    parts = urllib.parse.urlsplit(url)
    if parts.scheme in ("http", "https") and not _is_downloaded(builder, root, url, info):
      first_url_by_host.setdefault(parts.netloc, url)
  with requests.Session() as session:
    for host, url in first_url_by_host.items():
      try:
        # HEAD: any answer from the host proves it reachable, and costs no download.
        response = session.head(url, timeout=_PROBE_TIMEOUT, allow_redirects=False)
      except requests.exceptions.RequestException as e:
        raise UserInputError(f"cannot download TFDS {builder.name}: could not reach {host} "
                             f"({_connection_problem(e, url)}); {_OFFLINE_FIX}") from None
      if response.status_code in _GATEWAY_STATUSES:
        raise UserInputError(
            f"cannot download TFDS {builder.name}: could not reach {host} ({_via_proxy(url)}"
            f"answered HTTP {response.status_code}); {_OFFLINE_FIX}")


def _is_downloaded(builder, root: str, url: str, info) -> bool:
  """Whether TFDS's download cache under `root` already holds `url` with its checksum."""
  try:
    from tensorflow_datasets.core.download import resource
    name = resource.get_dl_fname(url, info.checksum)
  except (ImportError, AttributeError):  # TFDS internals moved: probe, which is only slower.
    return False
  downloads = os.path.join(root, "downloads")
  return any(tf.io.gfile.exists(os.path.join(d, name))
             for d in (os.path.join(downloads, builder.name), downloads))


def _via_proxy(url: str) -> str:
  """'the proxy URL ' when the environment sends `url` through one, else 'it '."""
  proxy = requests.utils.select_proxy(url, requests.utils.get_environ_proxies(url))
  return f"the proxy {proxy} " if proxy else "it "


def _connection_problem(error: BaseException, url: str) -> str:
  """What went wrong connecting to `url`, in a few words, naming the proxy if one was used."""
  text = str(error)
  if isinstance(error, requests.exceptions.ProxyError):
    return f"{_via_proxy(url)}did not accept the connection"
  if isinstance(error, requests.exceptions.Timeout):
    return f"{_via_proxy(url)}did not answer within {_PROBE_TIMEOUT} s"
  if "NameResolution" in text or "name resolution" in text or "not known" in text:
    return "its DNS lookup failed"
  if isinstance(error, requests.exceptions.SSLError):
    return "its TLS handshake failed"
  return f"{_via_proxy(url)}did not accept the connection"


def _tfds_user_problem(error: BaseException) -> Optional[str]:
  """The problem and fix for a failure of `tfds.load` the user can fix; None for a bug."""
  if isinstance(error, requests.exceptions.RequestException):  # Before OSError: it is one.
    url = getattr(error.request, "url", None) or ""
    host = urllib.parse.urlsplit(url).netloc or "the dataset's host"
    return f"could not download from {host} ({_connection_problem(error, url)}); {_OFFLINE_FIX}"
  if isinstance(error, tfds.download.DownloadError):  # An HTTP status other than 200.
    return (f"{first_line(error)}; try again later, or prepare the dataset where it downloads "
            "and pass that --data_dir")
  if isinstance(error, download_manager.NonMatchingChecksumError):
    return (f"{first_line(error).rstrip(':')} (a truncated download, or a proxy or mirror that "
            "changes files); delete that file and run again")
  # ResourceExhaustedError only where it speaks of space: it also means out of memory.
  if isinstance(error, tf.errors.PermissionDeniedError) or (
      isinstance(error, tf.errors.ResourceExhaustedError) and "space" in str(error)) or (
          isinstance(error, OSError) and (error.errno in _UNWRITABLE_ERRNOS
                                          or "Not enough disk space" in str(error))):
    return f"{first_line(error)}; pass a writable --data_dir with room for the dataset"
  return None


# OSError numbers of a directory that cannot be written or is full.
_UNWRITABLE_ERRNOS = (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT)


def _listing(root: str) -> Optional[set]:
  """Every path under a local `root` (empty if it does not exist); None for object stores,
  whose listing is slow and where TFDS's temporaries are left alone."""
  if "://" in root:
    return None
  paths = set()
  for directory, subdirectories, files in os.walk(root):
    paths.add(directory)
    paths.update(os.path.join(directory, n) for n in subdirectories + files)
  return paths


def _remove_partial_files(root: str, before: set) -> None:
  """Removes what a failed download left under `root` that was not there `before`: TFDS's
  temporary downloads (`*.tmp.*`) and incomplete dataset directories, then the directories
  it created that are left empty. Complete downloads stay: TFDS reuses them next time."""
  for directory, subdirectories, files in os.walk(root, topdown=False):
    for name in files + subdirectories:
      path = os.path.join(directory, name)
      if path in before or not os.path.lexists(path):
        continue
      if ".tmp." in name or name.startswith(constants.INCOMPLETE_PREFIX):
        if os.path.isdir(path) and not os.path.islink(path):
          shutil.rmtree(path, ignore_errors=True)
        else:
          os.remove(path)
      elif os.path.isdir(path) and not os.listdir(path):
        os.rmdir(path)
  if root not in before and os.path.isdir(root) and not os.listdir(root):
    os.rmdir(root)


def _to_numpy(dataset: tf.data.Dataset):
  """All (image, label) pairs of a TFDS split as two arrays, read in large batches."""
  batches = list(dataset.batch(10_000).as_numpy_iterator())
  return (np.concatenate([images for images, _ in batches]),
          np.concatenate([labels for _, labels in batches]))
