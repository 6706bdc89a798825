"""The one reader of the image and array files users give `trainer.predict` and
`launch.batch_input` (local or gs://): every image as uint8 (28, 28), or a `UserInputError`
naming the file, the problem and the fix.

TensorFlow (for tf.io.gfile and image decoding) is imported inside the functions that use it:
the entry points check their arguments before paying for its start-up.
"""

import io
import os
from typing import List, Optional, Sequence

import numpy as np

from trainer.data import sources
from trainer.errors import first_line, UserInputError

# Array files, read by `read_array`; any other input is an image file.
ARRAY_SUFFIXES = (".npy", ".npz")
# Tried in order when an npz holds several arrays and no key is given: a clear name, then the
# trainer's own dataset layout (X images, y labels), so a training file is read as it is.
DEFAULT_KEYS = ("images", "X")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
NPY_SIGNATURE = b"\x93NUMPY"
ACCEPTED_SHAPES = "(N, 28, 28), (N, 28, 28, 1) or (N, 784)"
IMAGE_FORMATS = "a PNG, JPEG, GIF or BMP image, or .npy/.npz arrays"


def is_array_file(path: str) -> bool:
  """Whether `read_input` reads `path` as an array of images (.npy, .npz), not as one image."""
  return os.path.splitext(path)[1].lower() in ARRAY_SUFFIXES


def read_inputs(paths: Sequence[str], key: str = "", resize: Optional[bool] = None) -> np.ndarray:
  """Every image of the files at `paths` (see `read_input`), in order, as uint8 (N, 28, 28).

  Raises `UserInputError` for a bad file, or for no images at all.
  """
  parts = [read_input(path, key, resize) for path in paths]
  images = np.concatenate(parts) if parts else np.zeros((0,) + sources.IMAGE_SHAPE[:2], np.uint8)
  if not len(images):
    raise UserInputError(f"no images in {', '.join(paths) or 'the inputs'}: nothing to predict")
  return images


def read_input(path: str, key: str = "", resize: Optional[bool] = None) -> np.ndarray:
  """The images (N, 28, 28) uint8 of one file (local or gs://): every row of an .npy or .npz
  array (`read_array`, with `key`), else the one image of an image file (`read_image_file`,
  with `resize`). Raises `UserInputError` naming the file, the problem and the fix."""
  if is_array_file(path):
    return read_array(path, key)
  return read_image_file(path, resize)


def _read_bytes(path: str) -> bytes:
  import tensorflow as tf
  try:
    with tf.io.gfile.GFile(path, "rb") as f:
      return f.read()
  except tf.errors.NotFoundError:
    raise UserInputError(f"{path}: no such file") from None
  except (tf.errors.OpError, OSError) as e:
    raise UserInputError(f"{path}: cannot read it ({first_line(e)})") from None


def read_array(path: str, key: str = "") -> np.ndarray:
  """The images (N, 28, 28) uint8 of the .npy file at `path`, or of one array of the .npz file
  there (local or gs://), checked by `as_images`.

  `key` names the npz's array; when empty, the file's only array, else the first of
  DEFAULT_KEYS it has. Raises `UserInputError` naming the file and the fix for a file that is
  not what its name says, one that needs pickle, one whose header claims more data than it
  holds, or an npz where that finds no array (listing its arrays).
  """
  raw = _read_bytes(path)
  if os.path.splitext(path)[1].lower() == ".npy":
    # numpy takes anything without its header for a pickle; say what it really is.
    if not raw.startswith(NPY_SIGNATURE):
      raise UserInputError(f"{path}: not an .npy file (no NumPy header); save it with np.save")
    try:
      sources.check_npy_header(io.BytesIO(raw), len(raw), path, "np.save")
      array = np.load(io.BytesIO(raw), allow_pickle=False)
    except UserInputError:  # A ValueError too, and already says what is wrong.
      raise
    except (ValueError, OSError, EOFError) as e:
      raise sources.load_error(e, path, ".npy", "np.save") from None
    return as_images(array, path)
  arrays = sources.npz_arrays(io.BytesIO(raw), path, lambda names: [_images_key(names, key, path)])
  ((key, array),) = arrays.items()
  return as_images(array, f"{path} (array {key})")


def _images_key(names: List[str], key: str, path: str) -> str:
  """Which of an npz's arrays (`names`) holds the images: `key`, else the only one, else the
  first of DEFAULT_KEYS it has."""
  if not names:
    raise UserInputError(f"{path}: no arrays in it; save the images with np.savez")
  if key and key not in names:
    raise UserInputError(f"{path}: no array named {key!r}; it has {', '.join(names)}: "
                         "pass --key with one of them")
  chosen = key or (names[0] if len(names) == 1 else
                   next((name for name in DEFAULT_KEYS if name in names), ""))
  if not chosen:
    raise UserInputError(
        f"{path}: several arrays ({', '.join(names)}) and none named "
        f"{' or '.join(DEFAULT_KEYS)}; pass --key=NAME to say which holds the images")
  return chosen


def as_images(array: np.ndarray, where: str) -> np.ndarray:
  """`array` as uint8 images (N, 28, 28), after checking its shape and pixel values.

  Takes (N, 28, 28), (N, 28, 28, 1) or (N, 784) rows. Integer arrays of another dtype are
  taken when every value is 0-255. Float arrays are taken only when every value is a whole
  number 0-255 and some exceed 1: an array within [0, 1] is most likely scaled pixels, and is
  refused rather than guessed at. Raises `UserInputError` naming `where` for anything else.
  """
  array = np.asarray(array)
  side = sources.IMAGE_SHAPE[0]
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


def read_image_file(path: str, resize: Optional[bool] = None) -> np.ndarray:
  """The one image (1, 28, 28) uint8 of a PNG, JPEG, GIF or BMP file at `path` (local or gs://).

  Raises `UserInputError` naming the file and the fix for anything else: not an image, 16-bit
  pixels, colour or transparency (grey saved as opaque RGB is fine), or another size. Another
  size is scaled to 28x28 when `resize` is True; refused naming --resize when it is False;
  refused, asking for a 28x28 file, when it is None (a caller without a --resize flag).
  """
  import tensorflow as tf
  raw = _read_bytes(path)
  # The bit depth is byte 24 of every PNG (in its IHDR chunk); decoding 16-bit pixels as uint8
  # would rescale them.
  if raw.startswith(PNG_SIGNATURE) and len(raw) > 24 and raw[24] > 8:
    raise UserInputError(f"{path}: {raw[24]}-bit pixels; save it as 8-bit greyscale (0-255), "
                         "nothing is rescaled here")
  try:
    image = tf.io.decode_image(raw, expand_animations=False).numpy()
  except (tf.errors.InvalidArgumentError, ValueError):
    raise UserInputError(f"{path}: not an image; give {IMAGE_FORMATS}") from None
  channels = image.shape[-1]
  # Grey saved as RGB (all three channels alike) and fully opaque alpha lose nothing.
  opaque = channels in (1, 3) or (image[..., -1] == 255).all()
  grey = channels in (1, 2) or (image[..., :3] == image[..., :1]).all()
  if not (opaque and grey):
    raise UserInputError(f"{path}: a colour or transparent image; save it as 8-bit greyscale")
  return _sized(image[..., 0], path, resize)[np.newaxis]


def _sized(image: np.ndarray, path: str, resize: Optional[bool]) -> np.ndarray:
  """A (H, W) uint8 image as 28x28: see `read_image_file` for `resize`."""
  height, width = image.shape
  if (height, width) == sources.IMAGE_SHAPE[:2]:
    return image
  if not resize:
    fix = ("pass --resize to scale it" if resize is False else
           "resize it to 28x28 first (nothing is resized here)")
    raise UserInputError(f"{path}: {width}x{height} pixels, expected 28x28; {fix}")
  import tensorflow as tf
  scaled = tf.image.resize(image[..., np.newaxis], sources.IMAGE_SHAPE[:2], antialias=True).numpy()
  return np.round(np.clip(scaled[..., 0], 0, 255)).astype(np.uint8)
