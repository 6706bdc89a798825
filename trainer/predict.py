"""Entry point: `python -m trainer.predict --model_dir=DIR IMAGE.png [IMAGE.png ...]`.

Prints, for each image file, the predicted class and its probability, and writes the
reconstruction beside it as NAME_reconstruction.png. Images must be 28x28 greyscale (PNG, JPEG,
GIF or BMP); `--resize` scales other sizes to 28x28. The model knows only MNIST's white digits
on black: an image that looks black on white (mean pixel above 127) is inverted first, with a
`note:` line on standard error, and its reconstruction is of the inverted, white-on-black image;
`--invert=never` or `--invert=always` overrides the guess. Every image is checked before any is
predicted: a bad one ends the command with one `error:` line naming it and exit code 2, and
nothing is written.
"""

import os
import sys

from absl import app
from absl import flags

from trainer import cli
from trainer import config as config_lib

FLAGS = flags.FLAGS

flags.DEFINE_string("model_dir", config_lib.default_model_dir(),
                    "A finished training job's --model_dir (local or gs://); its export is read.")
flags.DEFINE_bool("resize", False, "Scale images of another size to 28x28 instead of refusing.")
flags.DEFINE_enum("invert", "auto", ["auto", "always", "never"],
                  "Turn black-on-white images into MNIST's white on black: auto does it to images "
                  "whose mean pixel is above 127, with a note.")

SUFFIX = "_reconstruction.png"
# MNIST digits average about 33 of 255 (mostly black); a black-on-white digit, over 200.
BRIGHT_MEAN = 127


def looks_black_on_white(image) -> bool:
  """Whether a uint8 image is mostly bright, as a dark digit on a light ground is."""
  return float(image.mean()) > BRIGHT_MEAN


def reconstruction_path(path: str) -> str:
  """Where the reconstruction of `path` goes: beside it, NAME_reconstruction.png."""
  return os.path.splitext(path)[0] + SUFFIX


def main(argv):
  paths = argv[1:]
  if not paths:
    cli.fail("no images given: python -m trainer.predict --model_dir=DIR IMAGE.png [...]")
  if not FLAGS.model_dir:
    cli.fail("no --model_dir given and $AIP_MODEL_DIR is not set: pass a finished job's --model_dir")
  import numpy as np
  import tensorflow as tf
  from trainer import export, sources
  inputs = {os.path.abspath(path) for path in paths}
  targets = [os.path.abspath(reconstruction_path(path)) for path in paths]
  if len(set(targets)) < len(targets) or inputs & set(targets):
    cli.fail("two images would share a reconstruction file, or one would overwrite an input "
          "(NAME.png and NAME.jpg, or NAME_reconstruction.png): rename them")
  try:
    images = np.stack([sources.read_image_file(path, FLAGS.resize) for path in paths])
    exported = export.load(f"{FLAGS.model_dir.rstrip('/')}/export")
  except config_lib.UserInputError as e:
    cli.fail(str(e))
  for i, path in enumerate(paths):
    if FLAGS.invert == "always" or (FLAGS.invert == "auto" and looks_black_on_white(images[i])):
      images[i] = 255 - images[i]
      if FLAGS.invert == "auto":
        print(f"note: {path} looks black on white; inverted it to white on black as MNIST "
              "(--invert=never to keep it)", file=sys.stderr)
  outputs = export.predict_batches(exported, images)
  for path, probabilities, pixels in zip(paths, outputs["classifier"], outputs["decoder"]):
    label = int(np.argmax(probabilities))
    target = reconstruction_path(path)
    png = tf.io.encode_png(np.round(pixels[..., np.newaxis] * 255).astype(np.uint8))
    try:
      with tf.io.gfile.GFile(target, "wb") as f:
        f.write(png.numpy())
    except (tf.errors.OpError, OSError) as e:
      cli.fail(f"cannot write {target} ({type(e).__name__}); make its directory writable")
    print(f"{path}: {label} (probability {probabilities[label]:.4f}), reconstruction {target}")


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
