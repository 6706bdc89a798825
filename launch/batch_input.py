"""Batch prediction input: images as the JSON lines that Vertex AI batch prediction reads.

    python -m launch.batch_input --output=gs://BUCKET/instances.jsonl INPUT [INPUT ...]

This module owns turning image files into those lines. Each line is one instance, a 28x28
image as a nested list of ints 0-255 (`[[0,0,...],...]`): the prediction service stacks the
lines of a batch into the (N, 28, 28) uint8 `images` that the export's `serving_default`
signature takes (see `trainer.multitask.export`), so no conversion happens on the server.

INPUTs (local or gs://), in order, every image of each, read by `trainer.data.image_files` (the reader
`trainer.predict` uses too):
  .npz  an array of uint8 pixels 0-255, shaped (N, 28, 28), (N, 28, 28, 1) or (N, 784) (the
        trainer's own `npz:` layout). `--key` names the array; by default the file's only
        array, else the one named `images`, else `X` (the trainer's layout). Integer arrays of
        another dtype are taken when every value is 0-255. Float arrays are taken only when
        every value is a whole number 0-255 and some exceed 1: an array within [0, 1] is most
        likely scaled pixels, and is refused rather than guessed at.
  .npy  one such array.
  other one 28x28 greyscale image, 8-bit: PNG, JPEG, GIF or BMP (grey saved as opaque RGB is
        taken too).

Nothing is rescaled, resized or inverted: a bad input ends the command with one `error:` line
naming the file and the fix, exit code 2, and no output file. Every input is read and checked
before anything is written, and the output appears only whole (written as OUTPUT.partial, then
renamed).
"""

import functools
import json
import os
from typing import Iterable, Iterator, List

import numpy as np
from absl import app
from absl import flags

from trainer import cli
from trainer.data import image_files
from trainer.errors import first_line, UserInputError

FLAGS = flags.FLAGS
# Kept here for the callers that convert arrays through this module (benchmarks/serving_compat).
as_images = image_files.as_images


def instance_lines(images: np.ndarray) -> Iterator[str]:
  """One JSON line per image (without its newline): the 28x28 pixels as nested lists of ints.

  `images` is uint8 (N, 28, 28) or (N, 28, 28, 1) (anything `image_files.as_images` takes). The
  lines are compact (no spaces): a 28x28 image is at most 3,164 characters.
  """
  for image in image_files.as_images(images, "images"):
    # tolist() gives Python ints, which json writes without a fraction: "0", never "0.0".
    yield json.dumps(image.tolist(), separators=(",", ":"))


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
    cli.fail(f"no inputs given (images, or .npy/.npz arrays): {usage}")
  if any(os.path.abspath(path) == os.path.abspath(output) for path in paths if "://" not in path):
    cli.fail(f"--output={output} is also an input; write the lines to another file")
  with cli.tensorflow_imported_quietly():
    import tensorflow  # noqa: F401  Imported here so that its start-up lines are filtered.
  try:
    count = write_lines(instance_lines(image_files.read_inputs(paths, FLAGS.key)), output)
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
