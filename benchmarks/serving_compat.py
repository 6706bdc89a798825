"""Serving compatibility: does an older TensorFlow load and serve what this package exports?

    python -m benchmarks.serving_compat [--export_dir=DIR] [--tf_version=2.15.1] [--images=0]

Vertex AI's newest prebuilt TensorFlow prediction image is
us-docker.pkg.dev/vertex-ai/prediction/tf2-cpu.2-15:latest (TensorFlow 2.15); the package
exports with the TensorFlow it runs (2.21). A SavedModel promises to load in the TensorFlow
that wrote it and newer, not older, so this measures instead of assuming:

1. the export: a small model trained with the package (`python -m trainer.task
   --dataset=mnist_sample --epochs=1 --width=8`), or the one at --export_dir;
2. the reference: its `serving_default` under the running TensorFlow, on real MNIST digits
   (--data, the first --images of them; 0 for all), which `launch.batch_input` also writes
   as the JSON lines a batch prediction job reads;
3. for --tf_version: a throwaway virtualenv under a temporary directory with
   tensorflow-cpu==VERSION (or tensorflow==VERSION where no -cpu wheel exists) from the
   package index, in which `tf.saved_model.load` loads the export, `serving_default` runs on
   those JSON lines turned into a uint8 tensor (as TF Serving turns a request's instances
   into one) and on the same images as (N, 28, 28, 1), a wrong shape is fed to see the
   export's own shape check, and `saved_model_cli show --all` describes the export;
4. the comparison: the largest absolute difference of the classifier's probabilities (and
   of the decoder's pixels), and how often the predicted classes agree.

Then a verdict. When the version cannot load or run the export, the error is printed and, with
--try_newer, each newer minor release pip offers is tried in turn (its latest patch) until one
works: the oldest TensorFlow, hence the oldest serving image, that serves the export.

What it cannot measure here: the image runs TensorFlow Serving (the C++ model server), not
Python. Both load a SavedModel with the same C++ loader and run the same kernels of their
TensorFlow version, so this is strong evidence, not the server itself. It needs pip to reach
the package index, about 1 GB of disk per version tried, and a few minutes.
"""

import datetime
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional, Tuple

import numpy as np
from absl import app
from absl import flags

from trainer.job import run_directory

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGED_SAMPLE = os.path.join(REPO, "trainer", "assets", "mnist_5k.npz")
SHARED_SAMPLE = "/work/shared/data/mnist_5k.npz"
# Probabilities computed by the same graph on the same CPU kernels can still differ in the last
# bits between TensorFlow builds (oneDNN versions, instruction sets); beyond this they differ.
SAME_ANSWER_TOLERANCE = 1e-5
# Python's pip prints this for a version that has no wheel for the platform.
NO_WHEEL = "No matching distribution found"

FLAGS = flags.FLAGS

# Runs inside the other TensorFlow's virtualenv: only TensorFlow, NumPy and the standard
# library there. Writes the outputs to an npz and prints one JSON report as its last line.
CHILD = r'''
import json, sys
import numpy as np
import tensorflow as tf

export_dir, lines_path, outputs_path = sys.argv[1:]
report = {"tensorflow": tf.__version__, "numpy": np.__version__}

def error(e):
  text = str(e).strip()
  return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"[:600]

try:
  loaded = tf.saved_model.load(export_dir)
except Exception as e:
  report["load_error"] = error(e)
  print(json.dumps(report))
  sys.exit(0)
report["signatures"] = sorted(loaded.signatures)
with open(lines_path) as f:
  instances = [json.loads(line) for line in f]
feeds = {"lines": tf.constant(instances, tf.uint8),
         "rank4": tf.constant(np.array(instances, np.uint8)[..., np.newaxis])}
outputs = {}
for name, images in feeds.items():
  try:
    for key, value in loaded.signatures["serving_default"](images=images).items():
      outputs[f"{name}_{key}"] = value.numpy()
  except Exception as e:
    report[f"{name}_error"] = error(e)
try:
  outputs["latent"] = loaded.signatures["latent"](images=feeds["lines"])["latent"].numpy()
except Exception as e:
  report["latent_error"] = error(e)
try:
  loaded.signatures["serving_default"](images=tf.zeros([2, 14, 14], tf.uint8))
  report["wrong_shape"] = "accepted (the shape check did not run)"
except tf.errors.InvalidArgumentError as e:
  text = " ".join(str(e).split())
  text = text[max(text.find("assertion failed"), 0):]
  report["wrong_shape"] = "refused: " + text[:text.find(" [[") if " [[" in text else 200]
np.savez(outputs_path, **outputs)
print(json.dumps(report))
'''


def _run(command: List[str], **kwargs) -> subprocess.CompletedProcess:
  return subprocess.run(command, capture_output=True, text=True, **kwargs)


def _tail(text: str, lines: int = 15) -> str:
  return "\n".join("    " + line for line in text.strip().splitlines()[-lines:])


def _version_key(version: str) -> Tuple[int, ...]:
  return tuple(int(part) for part in re.findall(r"\d+", version)[:3])


def train_export(work: str) -> str:
  """Trains a small model with the package, as a user would; returns its export directory."""
  model_dir = os.path.join(work, "run")
  command = [sys.executable, "-m", "trainer.task", "--dataset=mnist_sample", "--epochs=1",
             "--width=8", f"--model_dir={model_dir}"]
  print(f"training: {shlex.join(['python', *command[1:]])}", flush=True)
  result = _run(command, cwd=REPO)
  if result.returncode:
    sys.exit(f"training failed (exit code {result.returncode}):\n{_tail(result.stderr)}")
  return run_directory.of(model_dir).export


def reference_outputs(export_dir: str, images: np.ndarray) -> Dict[str, np.ndarray]:
  """`serving_default` and `latent` under the running TensorFlow, on uint8 (N, 28, 28)."""
  from trainer.multitask import export
  exported = export.load(export_dir)
  outputs = export.predict_batches(exported, images)
  outputs["latent"] = export.predict_batches(exported, images, signature="latent")["latent"]
  return outputs


def make_virtualenv(work: str, version: str) -> Tuple[Optional[str], str]:
  """A virtualenv under `work` with TensorFlow `version`: (its bin directory, the package
  installed), or (None, pip's error) when neither wheel installs."""
  for package in ("tensorflow-cpu", "tensorflow"):
    env = os.path.join(work, f"venv-{package}-{version}")
    result = _run([sys.executable, "-m", "venv", env])
    if result.returncode:
      return None, f"python -m venv failed:\n{_tail(result.stderr)}"
    bin_dir = os.path.join(env, "bin")
    start = time.time()
    result = _run([os.path.join(bin_dir, "python"), "-m", "pip", "install", "--quiet",
                   "--disable-pip-version-check", f"{package}=={version}"])
    if result.returncode == 0:
      print(f"  installed {package}=={version} in {time.time() - start:.0f} s", flush=True)
      return bin_dir, package
    shutil.rmtree(env, ignore_errors=True)
    if NO_WHEEL not in result.stderr:
      return None, f"pip install {package}=={version} failed:\n{_tail(result.stderr)}"
  return None, f"no tensorflow-cpu or tensorflow {version} wheel for this platform"


def newer_versions(version: str) -> List[str]:
  """The latest patch of each TensorFlow minor release newer than `version` that pip offers,
  oldest first."""
  result = _run([sys.executable, "-m", "pip", "index", "versions", "tensorflow-cpu"])
  match = re.search(r"Available versions: (.*)", result.stdout)
  if not match:
    return []
  latest: Dict[Tuple[int, ...], str] = {}
  for candidate in match.group(1).split(", "):
    if not re.fullmatch(r"\d+\.\d+\.\d+", candidate):  # No pre-releases or .post releases.
      continue
    minor = _version_key(candidate)[:2]
    if minor > _version_key(version)[:2] and (
        minor not in latest or _version_key(candidate) > _version_key(latest[minor])):
      latest[minor] = candidate
  return [latest[minor] for minor in sorted(latest)]


def _compare(name: str, ours: np.ndarray, theirs: np.ndarray) -> float:
  if ours.shape != theirs.shape:
    print(f"    {name}: shapes differ, {ours.shape} here and {theirs.shape} there")
    return float("inf")
  difference = float(np.max(np.abs(ours.astype(np.float64) - theirs)))
  print(f"    {name}: max abs difference {difference:.3g}")
  return difference


def check_version(work: str, version: str, export_dir: str, lines_path: str,
                  reference: Dict[str, np.ndarray], labels: np.ndarray) -> bool:
  """Loads and runs the export under TensorFlow `version`; prints what it finds; returns
  whether it served the same answers."""
  print(f"\n== TensorFlow {version} ==", flush=True)
  bin_dir, package = make_virtualenv(work, version)
  if bin_dir is None:
    print(f"  cannot install it: {package}")
    return False
  child = os.path.join(work, "child.py")
  with open(child, "w") as f:
    f.write(CHILD)
  outputs_path = os.path.join(work, f"outputs-{version}.npz")
  env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""}
  result = _run([os.path.join(bin_dir, "python"), child, export_dir, lines_path, outputs_path],
                env=env, cwd=work)
  if result.returncode or not result.stdout.strip():
    print(f"  the loader crashed (exit code {result.returncode}):\n{_tail(result.stderr)}")
    return False
  report = json.loads(result.stdout.strip().splitlines()[-1])
  print(f"  {package} {report['tensorflow']} (NumPy {report['numpy']})")
  if "load_error" in report:
    print(f"  tf.saved_model.load FAILS: {report['load_error']}")
    ok = False
  else:
    print(f"  tf.saved_model.load: loaded; signatures {', '.join(report['signatures'])}")
    ok = True
    theirs = dict(np.load(outputs_path))
    argmax = reference["classifier"].argmax(1)
    for feed, what in (("lines", "JSON lines as uint8 (N, 28, 28)"),
                       ("rank4", "uint8 (N, 28, 28, 1)")):
      if f"{feed}_error" in report:
        print(f"  serving_default on {what} FAILS: {report[f'{feed}_error']}")
        ok = False
        continue
      print(f"  serving_default on {what}, {len(labels)} digits:")
      worst = max(_compare("classifier", reference["classifier"], theirs[f"{feed}_classifier"]),
                  _compare("decoder", reference["decoder"], theirs[f"{feed}_decoder"]))
      agree = float(np.mean(theirs[f"{feed}_classifier"].argmax(1) == argmax))
      accuracy = float(np.mean(theirs[f"{feed}_classifier"].argmax(1) == labels))
      print(f"    predicted classes agree on {agree:.2%}; accuracy {accuracy:.4f} there, "
            f"{np.mean(argmax == labels):.4f} here")
      ok = ok and worst <= SAME_ANSWER_TOLERANCE and agree == 1.0
    if "latent_error" in report:
      print(f"  latent FAILS: {report['latent_error']}")
      ok = False
    else:
      print("  latent signature on the JSON lines:")
      ok = _compare("latent", reference["latent"], theirs["latent"]) <= SAME_ANSWER_TOLERANCE and ok
    print(f"  a (2, 14, 14) batch: {report['wrong_shape']}")
  cli = os.path.join(bin_dir, "saved_model_cli")
  shown = _run([cli, "show", "--dir", export_dir, "--all"], env=env)
  print(f"  saved_model_cli show --dir EXPORT --all: exit code {shown.returncode}")
  text = shown.stdout if shown.returncode == 0 else shown.stdout + shown.stderr
  print("\n".join("    " + line for line in text.strip().splitlines()))
  return ok


def main(argv):
  if len(argv) > 1:
    sys.exit(f"unexpected arguments {' '.join(argv[1:])}: every setting is a --flag=value")
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  import tensorflow as tf
  from launch import batch_input
  print(f"command: python -m benchmarks.serving_compat {shlex.join(sys.argv[1:])}".rstrip())
  print(f"date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}")
  print(f"here: TensorFlow {tf.__version__}, Python {platform.python_version()}, "
        f"{platform.machine()}, NumPy {np.__version__}")
  start = time.time()
  work = tempfile.mkdtemp(prefix="serving_compat-")
  try:
    export_dir = FLAGS.export_dir or train_export(work)
    print(f"export: {export_dir if FLAGS.export_dir else 'a fresh one (see training above)'}")
    with np.load(FLAGS.data, allow_pickle=False) as npz:
      images, labels = npz["X"], npz["y"]
    count = FLAGS.images or len(images)
    images, labels = batch_input.as_images(images[:count], FLAGS.data), labels[:count]
    print(f"digits: the first {len(images)} of {FLAGS.data}")
    reference = reference_outputs(export_dir, images)
    lines_path = os.path.join(work, "instances.jsonl")
    batch_input.write_lines(batch_input.instance_lines(images), lines_path)
    versions = [FLAGS.tf_version]
    works = None
    while versions:
      version = versions.pop(0)
      if check_version(work, version, export_dir, lines_path, reference, labels):
        works = version
        break
      if FLAGS.try_newer and version == FLAGS.tf_version:
        versions = newer_versions(version)
        print(f"\n{version} does not serve it; trying newer: {', '.join(versions) or 'none'}")
    print("\n== verdict ==")
    if works == FLAGS.tf_version:
      print(f"TensorFlow {works} loads the export written by TensorFlow {tf.__version__} and "
            f"serves the same answers (within {SAME_ANSWER_TOLERANCE:g}, every predicted class "
            f"alike): the tf2-cpu.{'-'.join(works.split('.')[:2])} serving image can serve it.")
    elif works:
      print(f"TensorFlow {FLAGS.tf_version} does not serve the export here (see above); the "
            f"oldest that does is {works}: serve it with an image of TensorFlow "
            f"{'.'.join(works.split('.')[:2])} or newer (a custom container if Vertex AI has "
            "no prebuilt one).")
    else:
      print(f"No TensorFlow tried ({FLAGS.tf_version} and newer) serves the export: see above.")
    print(f"({time.time() - start:.0f} s in all)")
  finally:
    if FLAGS.keep:
      print(f"kept {work}")
    else:
      shutil.rmtree(work, ignore_errors=True)
  return 0 if works else 1


def _define_flags() -> None:
  """Defined only when run as a program, so that the module may be imported."""
  flags.DEFINE_string("export_dir", "", "An export (SavedModel directory) to check; default: "
                      "train a small one with the package first.")
  flags.DEFINE_string("tf_version", "2.15.1", "The TensorFlow release to load the export with "
                      "(2.15.1: the tf2-cpu.2-15 serving image's).")
  flags.DEFINE_bool("try_newer", True, "When that version fails, try each newer minor release "
                    "pip offers until one works.")
  flags.DEFINE_string("data", SHARED_SAMPLE if os.path.exists(SHARED_SAMPLE) else PACKAGED_SAMPLE,
                      "An npz of real digits (X: (N, 784) uint8) to predict.")
  flags.DEFINE_integer("images", 0, "How many of those digits to predict; 0 for all.")
  flags.DEFINE_bool("keep", False, "Keep the temporary directory (virtualenvs, export, outputs) "
                    "and print where it is.")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
