"""Predicts with a finished training run's export, image by image.

    python -m trainer.predict --model_dir=DIR [--output_dir=OUT] INPUT [INPUT ...]

INPUTs (local or gs://) are read by `trainer.data.image_files`, as `launch.batch_input` reads them:
  image   one 28x28 greyscale image (PNG, JPEG, GIF or BMP); --resize scales other sizes.
  .npy    an array of images, uint8 of shape (N, 28, 28), (N, 28, 28, 1) or (N, 784).
  .npz    such an array: --key, else the file's only array, else `images`, else `X` (the
          trainer's npz layout). Each row of an array is one image, named FILE[INDEX].

For each image, one line on standard output: its class (and the class's name where the run's
dataset names them, as Fashion-MNIST does; for digits just the digit), the probability, and
where its reconstruction went:
    digit.png: 7 (probability 0.9812), reconstruction digit_reconstruction.png
    items.npz[3]: 9 Ankle boot (probability 0.9812), reconstruction items_3_reconstruction.png
The reconstruction of NAME.EXT is NAME_reconstruction.png; of row INDEX of NAME.npy or
NAME.npz, NAME_INDEX_reconstruction.png. They go to --output_dir (created if missing), else
beside the input. An existing file is not replaced unless --overwrite is given.

The model knows the images it was trained on, and their background: the run's metrics.json
records its class names and whether its training images' background (their outer ring of
pixels) is dark, as MNIST's and Fashion-MNIST's are, or light (a run of an older trainer,
without these, counts as digits on a dark background). An image whose own outer ring is of
the other kind (a digit drawn on paper, for a dark run) is inverted first, with a `note:` line
on standard error, and its reconstruction is of the inverted image; --invert=never or
--invert=always overrides. The mean brightness is not what counts: Fashion-MNIST's bright
coats and bags on black are bright on average, yet on the background the model knows.

Bad input:
  - Wrong for the whole call (no inputs, no export, a damaged metrics.json, two inputs that
    would write the same reconstruction file, or one that would replace an input): one
    `error:` line, exit code 2, nothing predicted. Clashing names are found from the paths
    alone, before TensorFlow starts (an array file stands for any number of rows).
  - Wrong for one input (unreadable, missing, not a 28x28 grey image or array, or an existing
    reconstruction without --overwrite): one `error: INPUT: ...` line on standard error; the
    other inputs are still predicted, and the command exits with code 2 at the end.
"""

import dataclasses
import functools
import json
import os
import re
import sys
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from absl import app
from absl import flags

from trainer import cli, errors
from trainer import config as config_lib
from trainer.data import image_files, sources
from trainer.errors import first_line, JobError, UserInputError
from trainer.job import run_directory

FLAGS = flags.FLAGS

USAGE = "python -m trainer.predict --model_dir=DIR INPUT [INPUT ...]"
SUFFIX = "_reconstruction.png"
# A row's reconstruction, NAME_INDEX_reconstruction.png: group 1 is NAME, with its directory.
_ROW_TARGET = re.compile("(.*)_[0-9]+" + re.escape(SUFFIX))
# What a run of an older trainer, without these in its metrics.json, was trained on: MNIST.
DEFAULT_BACKGROUND = "dark"
BACKGROUNDS = ("dark", "light")


@dataclasses.dataclass(frozen=True)
class Options:
  """The command's flags, as `predict_inputs` takes them."""
  model_dir: str
  output_dir: str = ""
  overwrite: bool = False
  invert: str = "auto"  # auto, always or never
  resize: bool = False
  key: str = ""


@dataclasses.dataclass(frozen=True)
class Trained:
  """What a run's model was trained on, as its metrics.json says."""
  class_names: Tuple[str, ...] = sources.DIGITS
  background: str = DEFAULT_BACKGROUND


@dataclasses.dataclass
class Item:
  """One image to predict: its name in what is printed, its pixels, its reconstruction's path."""
  name: str
  image: np.ndarray  # (28, 28) uint8
  target: str


def reconstruction_path(path: str, output_dir: str = "", index=None) -> str:
  """Where the reconstruction of the image file `path`, or of row `index` of the array file
  `path`, goes: NAME_reconstruction.png or NAME_INDEX_reconstruction.png, in `output_dir`, else
  beside `path`. `index` may be a placeholder such as "INDEX", for messages."""
  directory = output_dir or os.path.dirname(path)
  stem = os.path.splitext(os.path.basename(path))[0]
  row = "" if index is None else f"_{index}"
  return os.path.join(directory, f"{stem}{row}{SUFFIX}")


def _canonical(path: str) -> str:
  """`path` spelled so that two spellings of one local file compare equal (object-store paths
  as they are)."""
  return path if "://" in path else os.path.abspath(path)


def check_call(paths: Sequence[str], options: Options) -> None:
  """The checks that need neither TensorFlow nor the files, made first: raises
  `UserInputError` for no inputs, no --model_dir, or clashing reconstruction files."""
  if not paths:
    raise UserInputError(f"no inputs given (images, or .npy/.npz arrays): {USAGE}")
  if not options.model_dir:
    raise UserInputError(config_lib.no_model_dir(os.environ, "a finished job's --model_dir"))
  check_targets(paths, options.output_dir)


def check_targets(paths: Sequence[str], output_dir: str = "") -> None:
  """Raises `UserInputError` where two inputs would write the same reconstruction file, or one
  would replace an input; judged from the paths alone, an array file standing for every row
  it may have (NAME_INDEX_reconstruction.png for any INDEX)."""
  inputs: Dict[str, str] = {}  # Canonical path to the input's path, as given.
  # Canonical NAME_reconstruction.png to the input's path: of image files, and of array files
  # (whose rows write NAME_INDEX_reconstruction.png).
  images: Dict[str, str] = {}
  arrays: Dict[str, str] = {}
  for path in paths:
    if _canonical(path) in inputs:
      raise UserInputError(f"{path} is given twice; give each input once")
    inputs[_canonical(path)] = path
    group = arrays if image_files.is_array_file(path) else images
    target = _canonical(reconstruction_path(path, output_dir))
    if target in group:
      raise _clash(group[target], path, output_dir)
    group[target] = path

  def row_owner(target: str) -> Optional[str]:
    match = _ROW_TARGET.fullmatch(target)
    return arrays.get(match.group(1) + SUFFIX) if match else None

  for target, path in images.items():
    if row_owner(target):
      raise _clash(row_owner(target), path, output_dir)
  for name, path in inputs.items():
    writer = images.get(name) or row_owner(name)
    if writer:
      raise UserInputError(f"the reconstruction of {writer} would replace the input {path}: "
                           "rename one of them, or pass --output_dir=DIR")


def _clash(first: str, second: str, output_dir: str) -> UserInputError:
  shown = reconstruction_path(second, output_dir,
                              "INDEX" if image_files.is_array_file(second) else None)
  return UserInputError(f"{first} and {second} would both write {shown}: rename one of them, "
                        "or predict them in calls with different --output_dir")


def needs_inversion(image: np.ndarray, trained_background: str, invert: str = "auto") -> bool:
  """Whether `image` (uint8 28x28) is inverted before the model sees it: as `invert` says
  ("always" or "never"), or for "auto" where its background, judged on its outer ring of
  pixels (`sources.background`), is not `trained_background`, that of the images the model
  was trained on. Never by its mean: bright garments on black are bright on average."""
  if invert != "auto":
    return invert == "always"
  return sources.background(image) != trained_background


def trained_on(model_dir: str) -> Trained:
  """What the run in `model_dir` was trained on, from its metrics.json (local or gs://).

  A run without `class_names` or `input_background` there (an older trainer's), or without
  metrics.json, counts as trained on digits with a dark background. Raises `UserInputError`
  for a file that is not JSON or holds other values.
  """
  from trainer.job import outputs# Imports TensorFlow: only once the entry point has, quietly.
  path = run_directory.of(model_dir).metrics
  fix = "delete it and run the training command again to write it anew"
  metrics = outputs.read_json(path, fix) or {}
  names = metrics.get("class_names", list(sources.DIGITS))
  background = metrics.get("input_background", DEFAULT_BACKGROUND)
  if not (isinstance(names, list) and len(names) == sources.NUM_CLASSES
          and all(isinstance(name, str) for name in names)):
    raise UserInputError(f"{path} is damaged: class_names is {json.dumps(names)[:200]}, not a "
                         f"list of {sources.NUM_CLASSES} names; {fix}")
  if background not in BACKGROUNDS:
    raise UserInputError(f"{path} is damaged: input_background is {json.dumps(background)}, "
                         f"not {' or '.join(map(json.dumps, BACKGROUNDS))}; {fix}")
  return Trained(tuple(names), background)


def _error(message: str) -> None:
  """One input's `error:` line; the command goes on with the other inputs."""
  print(f"error: {message}", file=sys.stderr)


def read_items(paths: Sequence[str], options: Options) -> Tuple[List[Item], int]:
  """The images of `paths`, in order, each named and given its reconstruction's path, and how
  many failed: an input that cannot be read, and an image whose reconstruction exists (without
  --overwrite), each print one `error:` line and are left out."""
  import tensorflow as tf
  items, failed = [], 0
  for path in paths:
    try:
      images = image_files.read_input(path, options.key, options.resize)
      if not len(images):
        raise UserInputError(f"{path}: no images in it (shape {images.shape}); nothing to predict")
    except UserInputError as e:
      _error(str(e))
      failed += 1
      continue
    array = image_files.is_array_file(path)
    for index, image in enumerate(images):
      name = f"{path}[{index}]" if array else path
      target = reconstruction_path(path, options.output_dir, index if array else None)
      if not options.overwrite and tf.io.gfile.exists(target):
        _error(f"{name}: its reconstruction {target} exists; pass --overwrite to replace it, "
               "or --output_dir=DIR to write elsewhere")
        failed += 1
      else:
        items.append(Item(name, image, target))
  return items, failed


def predict_inputs(paths: Sequence[str], options: Options) -> int:
  """Predicts every readable input of `paths` (see the module docstring for what is printed
  and written); returns how many inputs (or array rows) failed, each with its `error:` line.

  Raises `UserInputError`, before any input is read, for no export or a damaged metrics.json;
  and for an --output_dir that cannot be created.
  """
  from trainer.multitask import export# Imports TensorFlow: only once the entry point has, quietly.
  exported = export.load(run_directory.of(options.model_dir).export)
  trained = trained_on(options.model_dir)
  items, failed = read_items(paths, options)
  if not items:
    return failed
  for item in items:
    if needs_inversion(item.image, trained.background, options.invert):
      if options.invert == "auto":
        print(f"note: {item.name} has a {sources.background(item.image)} background, unlike "
              "the images the model was trained on; inverted it (--invert=never to keep it)",
              file=sys.stderr)
      item.image = 255 - item.image
  _make_directory(options.output_dir)
  outputs = export.predict_batches(exported, np.stack([item.image for item in items]))
  for item, probabilities, pixels in zip(items, outputs["classifier"], outputs["decoder"]):
    problem = _write_png(item.target, pixels)
    if problem:
      _error(f"{item.name}: {problem}")
      failed += 1
      continue
    print(f"{answer_line(item.name, probabilities, trained.class_names)}, reconstruction "
          f"{item.target}")
  return failed


def answer_line(name: str, probabilities: Sequence[float], class_names: Sequence[str]) -> str:
  """'NAME: 7 (probability 0.9876)': the input's most probable class, named as
  `class_names` name it ('9 Ankle boot'; a digit class by its digit alone). Online
  prediction (launch.endpoints) prints its answers so too."""
  label = int(np.argmax(probabilities))
  class_name = class_names[label]
  shown = str(label) if class_name == str(label) else f"{label} {class_name}"
  return f"{name}: {shown} (probability {probabilities[label]:.4f})"


def _make_directory(output_dir: str) -> None:
  import tensorflow as tf
  if not output_dir:
    return
  try:
    tf.io.gfile.makedirs(output_dir)
  except (tf.errors.OpError, OSError) as e:
    raise UserInputError(f"cannot create --output_dir={output_dir} ({first_line(e)}); pass a "
                         "directory you may write to") from None


def _write_png(target: str, pixels: np.ndarray) -> Optional[str]:
  """Writes the reconstruction `pixels` ((28, 28) in [0, 1]) as a PNG; returns what went wrong,
  or None."""
  import tensorflow as tf
  png = tf.io.encode_png(np.round(np.clip(pixels, 0, 1)[..., np.newaxis] * 255).astype(np.uint8))
  try:
    with tf.io.gfile.GFile(target, "wb") as f:
      f.write(png.numpy())
  except (tf.errors.OpError, OSError) as e:
    return (f"cannot write {target} ({first_line(e)}); make its directory writable, or pass "
            "--output_dir=DIR")
  return None


def main(argv: List[str]) -> None:
  paths = argv[1:]
  options = Options(FLAGS.model_dir, FLAGS.output_dir, FLAGS.overwrite, FLAGS.invert,
                    FLAGS.resize, FLAGS.key)
  try:
    check_call(paths, options)
  except UserInputError as e:
    cli.fail(str(e))
  with cli.tensorflow_imported_quietly():
    # Here, after the cheap checks, and inside the filter that keeps its start-up lines off.
    from trainer.multitask import export# noqa: F401
  try:
    failed = predict_inputs(paths, options)
  except JobError as e:
    cli.fail(str(e))
  if failed:
    sys.exit(errors.BAD_INPUT_EXIT_CODE)


def _define_flags() -> None:
  """Defined only when run as a program, so that tests may import this module."""
  flags.DEFINE_string("model_dir", config_lib.default_model_dir(),
                      "A finished training job's --model_dir (local or gs://); its export and "
                      "metrics.json are read.")
  flags.DEFINE_string("output_dir", "", "Where to write the reconstructions (local or gs://; "
                      "created if missing); default beside each input.")
  flags.DEFINE_bool("overwrite", False, "Replace reconstruction files that exist; without it, "
                    "an input whose reconstruction exists is an error.")
  flags.DEFINE_enum("invert", "auto", ["auto", "always", "never"],
                    "Invert images (255 - pixel) before the model sees them: auto inverts those "
                    "whose background (outer ring of pixels) is not like the training images', "
                    "with a note.")
  flags.DEFINE_bool("resize", False, "Scale images of another size to 28x28 instead of refusing.")
  flags.DEFINE_string("key", "", "The array of each npz input that holds the images; default "
                      "the only array, else 'images', else 'X' (the trainer's npz layout).")


GROUPS = {"Model": ["model_dir"], "Inputs": ["resize", "invert", "key"],
          "Outputs": ["output_dir", "overwrite"]}

if __name__ == "__main__":
  _define_flags()
  app.run(main, flags_parser=functools.partial(cli.parse_flags, description=__doc__,
                                               groups=GROUPS))
