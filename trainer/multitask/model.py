"""The multitask network: a shared convolutional encoder, a classifier head and a decoder head.

One functional Keras model takes uint8 images and returns a dict with `classifier` (class
probabilities) and `decoder` (the image rebuilt, in [0, 1]). Layers follow the global Keras
dtype policy, so under mixed precision the convolutions and dense layers compute in bfloat16
or float16; batch normalisation computes its statistics in float32 (Keras upcasts them), and
the final softmax and sigmoid are pinned to float32 for a stable loss.

The shape of the default, and the levers measured to get there, are in benchmarks/README.md.
"""

import keras

from trainer.data.sources import IMAGE_SHAPE, NUM_CLASSES
from trainer.multitask import CLASSIFIER, DECODER


def _batch_norm(x, name: str):
  # Synchronised: under tf.distribute the statistics are the global batch's, so they do not
  # depend on how many replicas share it. Momentum 0.9 (PyTorch's default; Keras's is 0.99):
  # the moving statistics that evaluation and the export use settle within tens of steps, so a
  # short run (one epoch of the 4,000-digit sample is 62 steps) is not judged on the initial
  # ones.
  return keras.layers.BatchNormalization(synchronized=True, momentum=0.9, name=name)(x)


def _conv(x, filters: int, batch_norm: bool, name: str, transpose: bool = False):
  """3x3 convolution (stride 2 if `transpose`), batch normalisation, ReLU."""
  layer = keras.layers.Conv2DTranspose if transpose else keras.layers.Conv2D
  x = layer(filters, 3, strides=2 if transpose else 1, padding="same", use_bias=not batch_norm,
            name=name)(x)
  if batch_norm:
    x = _batch_norm(x, name=f"{name}_bn")
  return keras.layers.ReLU(name=f"{name}_relu")(x)


def build_encoder(latent_dim: int, width: int, *, scaled_inputs: bool = False,
                  batch_norm: bool = True, blocks: int = 3) -> keras.Model:
  """uint8 (28, 28, 1) images (or, with `scaled_inputs`, floats in [0, 1]) to a latent vector.

  `width` channels at full resolution, doubling at each of the `blocks` resolutions
  (28, 14, 7); the later blocks hold two convolutions each.
  """
  images = keras.Input(IMAGE_SHAPE, dtype="float32" if scaled_inputs else "uint8", name="images")
  x = keras.layers.Rescaling(1.0 if scaled_inputs else 1.0 / 255.0, name="scale")(images)
  for block in range(blocks):
    filters = width * 2 ** block
    # One convolution at full resolution: a second there would cost as much as a whole block.
    for repeat in range(1 if block == 0 else 2):
      x = _conv(x, filters, batch_norm, name=f"encoder{block}_{repeat}")
    if block < 2:
      x = keras.layers.MaxPooling2D(name=f"encoder{block}_pool")(x)
  x = keras.layers.Flatten()(x)
  # A linear latent: a ReLU here leaves units dead to both heads (measured: worse accuracy and
  # reconstruction on Fashion-MNIST).
  latent = keras.layers.Dense(latent_dim, name="latent")(x)
  return keras.Model(images, latent, name="encoder")


def build_classifier_head(latent_dim: int) -> keras.Model:
  """Latent vector to the probabilities of the ten classes."""
  latent = keras.Input((latent_dim,), name="latent")
  x = keras.layers.Dense(128, activation="relu")(latent)
  logits = keras.layers.Dense(NUM_CLASSES, name="logits")(x)
  probabilities = keras.layers.Activation("softmax", dtype="float32", name="probabilities")(logits)
  return keras.Model(latent, probabilities, name=CLASSIFIER)


def build_decoder_head(latent_dim: int, width: int, *, batch_norm: bool = True,
                       deep: bool = False) -> keras.Model:
  """Latent vector back to a (28, 28, 1) image in [0, 1]: the encoder mirrored; `deep` adds a
  convolution at 7x7 and at 14x14, and a full-resolution layer of features (issue 26: on three
  seeds it kept the bars no better, at 1.3 times the time per image)."""
  latent = keras.Input((latent_dim,), name="latent")
  x = keras.layers.Dense(7 * 7 * 2 * width, use_bias=not batch_norm, name="decoder_dense")(latent)
  x = keras.layers.Reshape((7, 7, 2 * width))(x)
  if batch_norm:
    x = _batch_norm(x, name="decoder_dense_bn")
  x = keras.layers.ReLU()(x)
  if deep:
    x = _conv(x, 2 * width, batch_norm, name="decoder7")
  x = _conv(x, width, batch_norm, name="decoder14_up", transpose=True)
  if deep:
    x = _conv(x, width, batch_norm, name="decoder14")
    # Upsampled to full resolution with `width` channels before the pixels are drawn: each
    # pixel is then drawn from its own features, not one linear read-out of the 14x14 ones.
    x = _conv(x, width, batch_norm, name="decoder28_up", transpose=True)
    x = keras.layers.Conv2D(1, 3, padding="same", name="pixel_logits")(x)
  else:
    x = keras.layers.Conv2DTranspose(1, 3, strides=2, padding="same", name="pixel_logits")(x)
  pixels = keras.layers.Activation("sigmoid", dtype="float32", name="pixels")(x)
  return keras.Model(latent, pixels, name=DECODER)


def build_model(latent_dim: int, width: int, *, scaled_inputs: bool = False,
                batch_norm: bool = True, blocks: int = 3, deep_decoder: bool = False
                ) -> keras.Model:
  """The whole multitask model; call it inside the strategy scope, after setting the policy.

  It takes uint8 images; `scaled_inputs` makes it take floats already in [0, 1] instead (the
  benchmark's Keras `fit` baseline feeds those). `latent_dim` and `width` come from the
  configuration (`multitask.default_model`); `batch_norm`, `blocks` and `deep_decoder` are the
  architecture levers benchmarks/levers.py measures, and their defaults are the job's.
  """
  encoder = build_encoder(latent_dim, width, scaled_inputs=scaled_inputs,
                          batch_norm=batch_norm, blocks=blocks)
  classifier = build_classifier_head(latent_dim)
  decoder = build_decoder_head(latent_dim, width, batch_norm=batch_norm, deep=deep_decoder)
  images = keras.Input(IMAGE_SHAPE, dtype="float32" if scaled_inputs else "uint8", name="images")
  latent = encoder(images)
  outputs = {CLASSIFIER: classifier(latent), DECODER: decoder(latent)}
  return keras.Model(images, outputs, name="multitask_autoencoder")
