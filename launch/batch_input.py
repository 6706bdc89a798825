"""Batch prediction input: images as the JSON lines that Vertex AI batch prediction reads.

    python -m launch.batch_input --output=gs://BUCKET/instances.jsonl INPUT [INPUT ...]

This module owns turning image files into those lines. Each line is one instance, a 28x28
image as a nested list of ints 0-255 (`[[0,0,...],...]`): the prediction service stacks the
lines of a batch into the (N, 28, 28) uint8 `images` that the export's `serving_default`
signature takes (see `trainer.export`), so no conversion happens on the server.

INPUTs (local or gs://), in order, every image of each:
  .npz  an array of uint8 pixels 0-255, shaped (N, 28, 28), (N, 28, 28, 1) or (N, 784) (the
        trainer's own `npz:` layout). `--key` names the array; by default the file's only
        array, else the one named `images`, else `X` (the trainer's layout). Integer arrays of
        another dtype are taken when every value is 0-255. Float arrays are taken only when
        every value is a whole number 0-255 and some exceed 1: an array within [0, 1] is most
        likely scaled pixels, and is refused rather than guessed at.
  .png  one 28x28 greyscale image, 8-bit (grey saved as opaque RGB is taken too).

Nothing is rescaled, resized or inverted: a bad input ends the command with one `error:` line
naming the file and the fix, exit code 2, and no output file. Every input is read and checked
before anything is written, and the output appears only whole (written as OUTPUT.partial, then
renamed).
"""

import functools
import io
import json
import os
import zipfile
import zlib
from typing import Iterable, Iterator, List, Sequence

import numpy as np
from absl import app
from absl import flags

from trainer import cli
from trainer.config import UserInputError, first_line

IMAGE_SIZE = 28
# Tried in order when an npz holds several arrays and --key is not given: a clear name, then
# the trainer's own dataset layout (X images, y labels), so a training file converts as it is.
DEFAULT_KEYS = ("images", "X")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ZIP_SIGNATURE = b"PK\x03\x04"
ACCEPTED_SHAPES = "(N, 28, 28), (N, 28, 28, 1) or (N, 784)"

FLAGS = flags.FLAGS


def as_images(array: np.ndarray, where: str) -> np.ndarray:
  """`array` as uint8 images (N, 28, 28), after checking its shape and pixel values.

  Takes (N, 28, 28), (N, 28, 28, 1) or (N, 784) rows. Raises `UserInputError` naming `where`
  for any other shape, for values outside 0-255, and for non-integer pixels (see the module
  docstring for which float arrays pass).
  """
  array = np.asarray(array)
  side = IMAGE_SIZE
  if array.ndim == 2 and array.shape[1] == side * side:
    array = array.reshape(-1, side, side)
  elif array.ndim == 4 and array.shape[1:] == (side, side, 1):
    array = array[..., 0]
  if array.ndim != 3 or array.shape[1:] != (side, side):
    single = " (for one image, save it as shape (1, 28, 28))" if array.shape == (side, side) else ""
    raise UserInputError(
        f"{where}: images of shape {array.shape}, expected {ACCEPTED_SHAPES}{single}")
  if array.dtype == np.uint8 or not array.size:
    return np.ascontiguousarray(array, dtype=np.uint8)
  if array.dtype == np.bool_ or not (np.issubdtype(array.dtype, np.integer)
                                     or np.issubdtype(array.dtype, np.floating)):
    raise UserInputError(f"{where}: {array.dtype} pixels, expected uint8 0-255; save the images "
                         "as uint8 (np.asarray(images, np.uint8))")
  if np.issubdtype(array.dtype, np.floating):
    if not np.isfinite(array).all() or (array != np.round(array)).any():
      raise UserInputError(
          f"{where}: {array.dtype} pixels that are not all whole numbers, expected 0-255; "
          "nothing is rescaled here: convert them to uint8 0-255 first "
          "(np.round(images * 255).astype(np.uint8) if they are scaled to [0, 1])")
    if array.max() <= 1:
      raise UserInputError(
          f"{where}: {array.dtype} pixels all within 0..1, which look scaled to [0, 1] rather "
          "than 0-255; save them as uint8 0-255 (np.round(images * 255).astype(np.uint8))")
  low, high = array.min(), array.max()
  if low < 0 or high > 255:
    raise UserInputError(
        f"{where}: pixel values range {low:g}..{high:g}, outside 0-255; nothing is rescaled "
        "here: save them as uint8 0-255")
  return array.astype(np.uint8)


def instance_lines(images: np.ndarray) -> Iterator[str]:
  """One JSON line per image (without its newline): the 28x28 pixels as nested lists of ints.

  `images` is uint8 (N, 28, 28) or (N, 28, 28, 1) (anything `as_images` takes). The lines are
  compact (no spaces): a 28x28 image is at most 3,164 characters.
  """
  for image in as_images(images, "images"):
    # tolist() gives Python ints, which json writes without a fraction: "0", never "0.0".
    yield json.dumps(image.tolist(), separators=(",", ":"))


def _read_bytes(path: str) -> bytes:
  import tensorflow as tf  # Here, not at the top: the CLI refuses bad flags before paying for it.
  try:
    with tf.io.gfile.GFile(path, "rb") as f:
      return f.read()
  except tf.errors.NotFoundError:
    raise UserInputError(f"{path}: no such file") from None
  except (tf.errors.OpError, OSError) as e:
    raise UserInputError(f"{path}: cannot read it ({first_line(e)})") from None


def read_npz(path: str, key: str = "") -> np.ndarray:
  """The images (N, 28, 28) uint8 of one array of the npz file at `path` (local or gs://).

  `key` names the array; when empty, the file's only array, else the first of DEFAULT_KEYS it
  has. Raises `UserInputError` listing the file's arrays when that finds none.
  """
  raw = _read_bytes(path)
  # numpy takes anything that is not a zip archive for a pickle; say what it really is.
  if not raw.startswith(ZIP_SIGNATURE):
    raise UserInputError(f"{path}: not an npz file (no zip header); save the images with np.savez")
  try:
    with np.load(io.BytesIO(raw), allow_pickle=False) as npz:
      names = list(npz.files)
      if not names:
        raise UserInputError(f"{path}: no arrays in it; save the images with np.savez")
      if key and key not in names:
        raise UserInputError(f"{path}: no array named {key!r}; it has {', '.join(names)}: "
                             "pass --key with one of them")
      if not key:
        key = names[0] if len(names) == 1 else next((k for k in DEFAULT_KEYS if k in names), "")
      if not key:
        raise UserInputError(
            f"{path}: several arrays ({', '.join(names)}) and none named "
            f"{' or '.join(DEFAULT_KEYS)}; pass --key=NAME to say which holds the images")
      array = npz[key]
  except UserInputError:
    raise
  except ValueError as e:  # numpy says "Object arrays cannot be loaded when allow_pickle=False".
    raise UserInputError(
        f"{path}: cannot read it without pickle ({e}); save plain arrays") from None
  except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as e:
    raise UserInputError(
        f"{path}: not a readable npz file ({e}); save it again with np.savez") from None
  return as_images(array, f"{path} (array {key})")


def read_png(path: str) -> np.ndarray:
  """The one image (1, 28, 28) uint8 of the PNG file at `path` (local or gs://).

  Raises `UserInputError` naming the file and the fix for anything but a 28x28 greyscale
  image: another size, colour, transparency, or not a PNG.
  """
  import tensorflow as tf
  raw = _read_bytes(path)
  if not raw.startswith(PNG_SIGNATURE):
    raise UserInputError(f"{path}: not a PNG file; save it as PNG, or put the images in an npz")
  # The bit depth is byte 24 of every PNG (in its IHDR chunk); decoding 16-bit pixels as uint8
  # would rescale them.
  if len(raw) > 24 and raw[24] > 8:
    raise UserInputError(f"{path}: {raw[24]}-bit pixels; save it as 8-bit greyscale (0-255), "
                         "nothing is rescaled here")
  try:
    image = tf.io.decode_png(raw, channels=0, dtype=tf.uint8).numpy()
  except tf.errors.InvalidArgumentError as e:
    raise UserInputError(f"{path}: a broken PNG file ({first_line(e)}); save it again") from None
  channels = image.shape[-1]
  # Grey saved as RGB (all three channels alike) and fully opaque alpha lose nothing.
  opaque = channels in (1, 3) or (image[..., -1] == 255).all()
  grey = channels in (1, 2) or (image[..., :3] == image[..., :1]).all()
  if not (opaque and grey):
    raise UserInputError(f"{path}: a colour or transparent image; save it as 8-bit greyscale, "
                         "a white digit on black as in MNIST")
  height, width = image.shape[:2]
  if (height, width) != (IMAGE_SIZE, IMAGE_SIZE):
    raise UserInputError(f"{path}: {width}x{height} pixels, expected 28x28; resize it to "
                         "28x28 first (nothing is resized here)")
  return image[np.newaxis, :, :, 0]


def read_inputs(paths: Sequence[str], key: str = "") -> np.ndarray:
  """Every image of the .npz and .png files at `paths`, in order, as uint8 (N, 28, 28).

  `key` chooses the array of every npz (see `read_npz`). Raises `UserInputError` for a file
  of another kind, a bad file, or no images at all.
  """
  readers = {".npz": functools.partial(read_npz, key=key), ".png": read_png}
  parts: List[np.ndarray] = []
  for path in paths:
    reader = readers.get(os.path.splitext(path)[1].lower())
    if reader is None:
      raise UserInputError(f"{path}: not an .npz or .png file; give images as npz arrays or "
                           "28x28 greyscale PNG files")
    parts.append(reader(path))
  images = np.concatenate(parts) if parts else np.zeros((0, IMAGE_SIZE, IMAGE_SIZE), np.uint8)
  if not len(images):
    raise UserInputError(f"no images in {', '.join(paths) or 'the inputs'}: nothing to predict")
  return images


def write_lines(lines: Iterable[str], output: str) -> int:
  """Writes `lines`, each ended by a newline, to `output` (local or gs://); returns how many.

  The file appears only when complete: it is written as OUTPUT.partial, then renamed. Raises
  `UserInputError` when it cannot be written; a failed or interrupted write removes the
  partial file and leaves any earlier OUTPUT as it was.
  """
  import tensorflow as tf
  partial = f"{output}.partial"
  count = 0
  try:
    if "://" not in output:
      tf.io.gfile.makedirs(os.path.dirname(os.path.abspath(output)))
    with tf.io.gfile.GFile(partial, "w") as f:
      for line in lines:
        f.write(line + "\n")
        count += 1
    # Not written in place: a GFile closed by an exception (Ctrl-C included) would publish
    # what it holds. A local rename is atomic; on gs:// it is a server-side copy, which
    # creates the object whole.
    tf.io.gfile.rename(partial, output, overwrite=True)
  except BaseException as e:
    if tf.io.gfile.exists(partial):
      tf.io.gfile.remove(partial)
    if isinstance(e, (tf.errors.OpError, OSError)):
      raise UserInputError(f"cannot write {output} ({first_line(e)}); check the path and that "
                           "you may write there") from None
    raise
  return count


def main(argv: List[str]) -> None:
  paths = argv[1:]
  output = FLAGS.output
  usage = "python -m launch.batch_input --output=gs://BUCKET/instances.jsonl INPUT [INPUT ...]"
  if not output:
    cli.fail(f"no --output given: {usage}")
  if not paths:
    cli.fail(f"no inputs given (.npz or .png files): {usage}")
  if any(os.path.abspath(path) == os.path.abspath(output) for path in paths if "://" not in path):
    cli.fail(f"--output={output} is also an input; write the lines to another file")
  with cli.tensorflow_imported_quietly():
    import tensorflow  # noqa: F401  Imported here so that its start-up lines are filtered.
  try:
    count = write_lines(instance_lines(read_inputs(paths, FLAGS.key)), output)
  except UserInputError as e:
    cli.fail(str(e))
  print(f"wrote {count} instances (one 28x28 image a line) to {output}")
  if not output.startswith("gs://"):
    print("Vertex AI reads instances from Cloud Storage: copy it to gs:// for "
          "python -m launch.vertex batch_predict --instances=gs://...")


def _define_flags() -> None:
  """Defined only when run as a program, so that tests may import this module."""
  flags.DEFINE_string("output", "", "Where to write the JSON lines (local or gs://), one 28x28 "
                      "image a line; replaced if it exists.")
  flags.DEFINE_string("key", "", "The array of each npz input that holds the images; default "
                      "the only array, else 'images', else 'X' (the trainer's npz layout).")


if __name__ == "__main__":
  _define_flags()
  app.run(main, flags_parser=functools.partial(
      cli.parse_flags, description=__doc__, groups={"Flags": ["output", "key"]}))
