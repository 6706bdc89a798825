"""The package's default model in plain PyTorch on CPU: the benchmarks' peer (issue 26).

Contract: `build_model(latent_dim, width)` is `trainer.multitask.model.build_model(latent_dim, width)`
with its defaults (batch normalisation, three encoder blocks, the shallow decoder): the same
layers in the same order, with the same widths, kernels, strides, padding, biases, batch
normalisation settings and initialisation, and `parameter_count(model)` equals Keras's
`count_params()` (tests/torch_peer_test.py asserts both). `make_optimizer` and `train_steps`
train it as the package does: AdamW at the package's defaults, linear warm-up then cosine
decay to zero, cross-entropy and reconstruction MSE weighted by DEFAULT_LOSS_WEIGHTS.

The model takes float32 NCHW images (N, 1, 28, 28) already scaled to [0, 1], as the Keras
`exercise` baseline's `build_model(..., scaled_inputs=True)` does (the job's model takes uint8
and rescales inside; the Rescaling layer has no weights). It returns {"classifier": logits
(N, 10), "decoder": pixels (N, 1, 28, 28) in [0, 1]}: the classifier's softmax is folded into
the cross-entropy (Keras's recovers the logits from its softmax where it can).

The recipe (issue 39): `Recipe(channels_last, autocast_bfloat16, compile)`, eager float32
NCHW by default. `prepare(model, recipe)` moves the model to channels_last memory format and
compiles it with torch.compile, as asked; `train_steps` and `evaluate` then convert each
batch to that memory format and run the forward pass under
`torch.autocast("cpu", dtype=torch.bfloat16)`, as asked, with the losses and metrics in
float32 (the package's mixed_bfloat16 computes its losses in float32 too). The shapes, the
parameters (float32, as Keras's mixed policies keep them) and the optimizer do not change.

Needs the `bench` extra (pip install -e '.[bench]'); the package itself does not depend on
PyTorch. No TensorFlow here, so PyTorch and TensorFlow do not share a benchmark's process
(trainer.config and trainer.data.sources import none on import). Call `use_all_cores()` once, at
the entry point.

What differs, and why it is left so:
  * Keras flattens NHWC, PyTorch NCHW: the `latent` layer's inputs (and the decoder dense
    layer's outputs, reshaped) are a permutation of Keras's. Same parameters, same function
    up to that permutation.
  * Keras's Adam adds epsilon to sqrt(v) before the bias correction, PyTorch after it: at
    epsilon 1e-7 the step differs only where sqrt(v) is itself about 1e-7.
  * Batch normalisation's moving variance: Keras averages the biased batch variance,
    PyTorch the unbiased one (a factor n / (n - 1), n = batch x height x width). Training is
    the same; evaluation's statistics differ by that factor.
"""

import collections
import contextlib
import math
import os
from typing import Dict, Iterable, List, NamedTuple, Tuple

import torch
from torch import nn
from torch.nn import functional as F

from trainer.config import DEFAULT_LOSS_WEIGHTS, flag_default
from trainer.multitask import CLASSIFIER, DECODER
from trainer.data.sources import NUM_CLASSES  # TensorFlow only inside the functions that read data.

# Keras's BatchNormalization as trainer.multitask.model makes it: momentum 0.9 weights the old moving
# statistics, PyTorch's momentum weights the new batch's (1 - 0.9); Keras's epsilon is 1e-3,
# PyTorch's default 1e-5.
BN_MOMENTUM = 0.1
BN_EPSILON = 1e-3
ADAM_EPSILON = 1e-7  # Keras's AdamW default; PyTorch's is 1e-8.


class Recipe(NamedTuple):
  """How the peer runs on CPU; every option off is today's eager float32 NCHW."""
  channels_last: bool = False  # The model and its inputs in channels_last memory format.
  autocast_bfloat16: bool = False  # The forward pass under torch.autocast to bfloat16.
  compile: bool = False  # The model through torch.compile (compiled on its first call).

  @property
  def name(self) -> str:
    """"eager_float32_nchw" for the default; else the options on, joined: say
    "autocast_bfloat16+channels_last+compile"."""
    on = [option for option, value in zip(self._fields, self) if value]
    return "+".join(sorted(on)) if on else "eager_float32_nchw"

  def flags(self) -> List[str]:
    """The options as `benchmarks.measure pytorch` takes them."""
    return [f"--{option}" for option, value in zip(self._fields, self) if value]


EAGER_FLOAT32 = Recipe()


def prepare(model: nn.Module, recipe: Recipe = EAGER_FLOAT32) -> nn.Module:
  """`model` as `recipe` runs it: moved to channels_last (in place) and compiled, as asked.
  Train and evaluate what this returns; the optimizer is made from `model`'s parameters (the
  compiled module shares them). torch.compile compiles on the first call, so its cost falls in
  the first step, where a user pays it."""
  if recipe.channels_last:
    model.to(memory_format=torch.channels_last)
  if recipe.compile:
    return torch.compile(model)
  return model


def _inputs(images: torch.Tensor, recipe: Recipe) -> torch.Tensor:
  if recipe.channels_last:
    return images.contiguous(memory_format=torch.channels_last)
  return images


def _precision(recipe: Recipe):
  """The context a forward pass runs in under `recipe`."""
  if recipe.autocast_bfloat16:
    return torch.autocast("cpu", dtype=torch.bfloat16)
  return contextlib.nullcontext()


def use_all_cores() -> None:
  """Lets PyTorch use every core; once, at the entry point (not at import: a test importing
  this module must not change the threads of the process it runs in)."""
  torch.set_num_threads(os.cpu_count())


def _batch_norm(channels: int) -> nn.BatchNorm2d:
  return nn.BatchNorm2d(channels, eps=BN_EPSILON, momentum=BN_MOMENTUM)


class SameConvTranspose2d(nn.ConvTranspose2d):
  """Keras's 3x3 stride-2 "same" transposed convolution: input pixel i writes output pixels 2i
  to 2i + 2 (TensorFlow pads its forward convolution by 0 before and 1 after), and the size
  doubles. PyTorch's padding=1, output_padding=1 also doubles the size, but writes 2i - 1 to
  2i + 1: every output one pixel off. So: no padding, and the last row and column cut (PyTorch
  computes them too: (2n + 1)^2 outputs for Keras's (2n)^2, 6% more at 14 to 28)."""

  def __init__(self, in_channels: int, out_channels: int, bias: bool = True):
    super().__init__(in_channels, out_channels, 3, stride=2, bias=bias)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return super().forward(x)[..., :-1, :-1]


def _conv(name: str, in_channels: int, filters: int, transpose: bool = False):
  """trainer.multitask.model._conv with batch norm: 3x3 "same" convolution (stride 2 if `transpose`), no
  bias (batch norm's beta is the bias), batch normalisation, ReLU; (name, module) pairs."""
  if transpose:
    conv = SameConvTranspose2d(in_channels, filters, bias=False)
  else:
    conv = nn.Conv2d(in_channels, filters, 3, padding=1, bias=False)
  return [(name, conv), (f"{name}_bn", _batch_norm(filters)), (f"{name}_relu", nn.ReLU())]


class _Unflatten(nn.Module):
  """Keras's Reshape((7, 7, channels)), in NCHW."""

  def __init__(self, channels: int):
    super().__init__()
    self.channels = channels

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return x.view(-1, self.channels, 7, 7)


def build_encoder(latent_dim: int, width: int) -> nn.Sequential:
  """trainer.multitask.model.build_encoder: `width` channels at 28x28, doubling at 14x14 and 7x7, where
  the blocks hold two convolutions each; a linear latent."""
  layers, channels = [], 1
  for block in range(3):
    filters = width * 2 ** block
    for repeat in range(1 if block == 0 else 2):
      layers += _conv(f"encoder{block}_{repeat}", channels, filters)
      channels = filters
    if block < 2:
      layers.append((f"encoder{block}_pool", nn.MaxPool2d(2)))
  # NCHW order, where Keras flattens NHWC: a permutation of the latent layer's inputs.
  layers += [("flatten", nn.Flatten()), ("latent", nn.Linear(7 * 7 * channels, latent_dim))]
  return nn.Sequential(collections.OrderedDict(layers))


def build_classifier_head(latent_dim: int) -> nn.Sequential:
  """trainer.multitask.model.build_classifier_head, to logits: the softmax is in the loss."""
  return nn.Sequential(collections.OrderedDict([
      ("dense", nn.Linear(latent_dim, 128)), ("relu", nn.ReLU()),
      ("logits", nn.Linear(128, NUM_CLASSES))]))


def build_decoder_head(latent_dim: int, width: int, deep: bool = False) -> nn.Sequential:
  """trainer.multitask.model.build_decoder_head: the encoder mirrored, to pixels in [0, 1]; `deep` as
  there (a convolution at 7x7 and 14x14, and full-resolution features)."""
  layers = [("decoder_dense", nn.Linear(latent_dim, 7 * 7 * 2 * width, bias=False)),
            ("reshape", _Unflatten(2 * width)),
            ("decoder_dense_bn", _batch_norm(2 * width)), ("relu", nn.ReLU())]
  if deep:
    layers += _conv("decoder7", 2 * width, 2 * width)
  layers += _conv("decoder14_up", 2 * width, width, transpose=True)
  if deep:
    layers += _conv("decoder14", width, width)
    layers += _conv("decoder28_up", width, width, transpose=True)
    layers.append(("pixel_logits", nn.Conv2d(width, 1, 3, padding=1)))
  else:
    layers.append(("pixel_logits", SameConvTranspose2d(width, 1)))
  layers.append(("pixels", nn.Sigmoid()))
  return nn.Sequential(collections.OrderedDict(layers))


class MultitaskModel(nn.Module):
  """The shared encoder and the two heads; `forward` returns the dict the module doc says."""

  def __init__(self, latent_dim: int, width: int, deep_decoder: bool = False):
    super().__init__()
    self.encoder = build_encoder(latent_dim, width)
    self.classifier = build_classifier_head(latent_dim)
    self.decoder = build_decoder_head(latent_dim, width, deep_decoder)
    self.apply(_keras_initialisation)

  def forward(self, images: torch.Tensor) -> Dict[str, torch.Tensor]:
    latent = self.encoder(images)
    return {CLASSIFIER: self.classifier(latent), DECODER: self.decoder(latent)}


def _keras_initialisation(module: nn.Module) -> None:
  # Keras's defaults (Glorot-uniform kernels, zero biases), not PyTorch's (He-uniform with
  # a=sqrt(5), uniform biases): the same model starts from the same distribution. PyTorch's
  # fans of a (transposed) convolution are Keras's (in, out and the 3x3 window), and the
  # Glorot bound is symmetric in them. Batch norm starts at 1 and 0 in both.
  if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
    nn.init.xavier_uniform_(module.weight)
    if module.bias is not None:
      nn.init.zeros_(module.bias)


def build_model(latent_dim: int = 256, width: int = 48, deep_decoder: bool = False
                ) -> MultitaskModel:
  """The peer of trainer.multitask.model.build_model(latent_dim, width, deep_decoder=...); defaults are
  the job's."""
  return MultitaskModel(latent_dim, width, deep_decoder)


def parameter_count(model: nn.Module) -> int:
  """Keras's `count_params()` of the same model: the parameters and batch normalisation's
  moving mean and variance, which Keras keeps as (non-trainable) weights and PyTorch as
  buffers. `num_batches_tracked` is PyTorch's alone (Keras has no such weight)."""
  moving = sum(buffer.numel() for name, buffer in model.named_buffers()
               if name.endswith(("running_mean", "running_var")))
  return sum(parameter.numel() for parameter in model.parameters()) + moving


def learning_rate(step: int, total_steps: int, peak: float, warmup_steps: int) -> float:
  """trainer.multitask.problem.learning_rate_schedule at `step` (Keras's CosineDecay): linear from 0
  to `peak` over the warm-up (at most a fifth of the run), then cosine decay to 0."""
  warmup = min(warmup_steps, total_steps // 5)
  decay_steps = max(1, total_steps - warmup)
  step = min(step, warmup + decay_steps)
  if step < warmup:
    return peak * step / warmup
  return peak * 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / decay_steps))


def make_optimizer(model: nn.Module, total_steps: int,
                   peak: float = flag_default("learning_rate"),
                   warmup_steps: int = flag_default("warmup_steps"),
                   weight_decay: float = flag_default("weight_decay"),
                   ) -> Tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
  """trainer.multitask.problem.make_optimizer: AdamW and its schedule, at the package's defaults.

  Every parameter decays, batch norm's and the biases too: the package excludes only the
  learned task weights, which the fixed weighting does not have. Keras's AdamW also decays
  before the Adam step, by lr x weight_decay, as PyTorch's does.
  """
  optimizer = torch.optim.AdamW(model.parameters(), lr=peak, betas=(0.9, 0.999),
                                eps=ADAM_EPSILON, weight_decay=weight_decay)
  # LambdaLR scales the peak; step k (from 0) runs at the rate of Keras's iteration k.
  scheduler = torch.optim.lr_scheduler.LambdaLR(
      optimizer, lambda step: learning_rate(step, total_steps, 1.0, warmup_steps))
  return optimizer, scheduler


def loss(outputs: Dict[str, torch.Tensor], images: torch.Tensor, labels: torch.Tensor,
         loss_weights: Dict[str, float] = DEFAULT_LOSS_WEIGHTS) -> torch.Tensor:
  """The package's fixed weighting, every example labelled: weighted mean cross-entropy and
  mean reconstruction MSE of the input images (shifted ones too: the package's decoder target
  is the shifted image)."""
  return (loss_weights[CLASSIFIER] * F.cross_entropy(outputs[CLASSIFIER], labels)
          + loss_weights[DECODER] * F.mse_loss(outputs[DECODER], images))


def train_steps(model: nn.Module, optimizer: torch.optim.Optimizer,
                scheduler: torch.optim.lr_scheduler.LRScheduler,
                batches: Iterable[Tuple[torch.Tensor, torch.Tensor]],
                loss_weights: Dict[str, float] = DEFAULT_LOSS_WEIGHTS,
                recipe: Recipe = EAGER_FLOAT32) -> List[float]:
  """One training step per (images, labels) batch, images as `build_model`'s take them and
  labels int64 (N,); returns each step's total loss. `model` as `prepare(model, recipe)`
  returned it: the batches are converted to its memory format here, and the forward pass
  runs under the recipe's autocast (the losses in float32)."""
  model.train()
  losses = []
  for images, labels in batches:
    images = _inputs(images, recipe)
    optimizer.zero_grad(set_to_none=True)
    with _precision(recipe):
      outputs = model(images)
    outputs = {name: output.float() for name, output in outputs.items()}
    total = loss(outputs, images, labels, loss_weights)
    total.backward()
    optimizer.step()
    scheduler.step()
    losses.append(total.item())
  return losses


def evaluate(model: nn.Module, images, labels, batch_size: int = 1000,
             recipe: Recipe = EAGER_FLOAT32) -> Dict[str, float]:
  """Test metrics as the package reports them: accuracy and reconstruction MSE over every
  example of uint8 NHWC `images` and int `labels`, batch normalisation on its moving
  statistics; the forward pass in `recipe` (as `train_steps`), the metrics in float32."""
  model.eval()
  correct, squared_error = 0, 0.0
  with torch.no_grad():
    for start in range(0, len(labels), batch_size):
      pixels = torch.from_numpy(images[start:start + batch_size]).permute(0, 3, 1, 2)
      pixels = _inputs(pixels.float().div_(255.0), recipe)
      with _precision(recipe):
        outputs = model(pixels)
      outputs = {name: output.float() for name, output in outputs.items()}
      correct += int((outputs[CLASSIFIER].argmax(1)
                      == torch.from_numpy(labels[start:start + batch_size]).long()).sum())
      squared_error += float(((outputs[DECODER] - pixels) ** 2).sum())
  return {"accuracy": correct / len(labels),
          "reconstruction_mse": squared_error / images[..., 0].size}


def random_shift(images: torch.Tensor, pixels: int, generator: torch.Generator) -> torch.Tensor:
  """trainer.data.pipeline.random_shift: each NCHW image moved by up to `pixels` each way, the
  uncovered edge filled with background (0)."""
  count, _, size, _ = images.shape
  padded = F.pad(images, (pixels, pixels, pixels, pixels))
  offsets = torch.randint(0, 2 * pixels + 1, (count, 2), generator=generator)
  rows = (offsets[:, :1] + torch.arange(size))[:, :, None]
  cols = (offsets[:, 1:] + torch.arange(size))[:, None, :]
  return padded[torch.arange(count)[:, None, None], 0, rows, cols][:, None]


def shuffled_batches(images, labels, batch_size: int, seed: int = 0, shift_pixels: int = 0
                     ) -> Iterable[Tuple[torch.Tensor, torch.Tensor]]:
  """Endless (images, labels) batches of uint8 NHWC `images` (N, 28, 28, 1) and int `labels`,
  reshuffled every epoch and the remainder dropped, as the package's input does: float32
  NCHW images in [0, 1], moved by up to `shift_pixels` as the package's --shift_pixels does,
  and int64 labels. The conversion is done per batch, in the loop that is timed, as the
  package's pipeline does its own."""
  generator = torch.Generator().manual_seed(seed)
  pixels = torch.from_numpy(images).permute(0, 3, 1, 2)  # A view: converted per batch below.
  targets = torch.from_numpy(labels).long()
  while True:
    order = torch.randperm(len(targets), generator=generator)
    for start in range(0, len(order) - batch_size + 1, batch_size):
      chosen = order[start:start + batch_size]
      batch = pixels[chosen].float().div_(255.0)
      if shift_pixels:
        batch = random_shift(batch, shift_pixels, generator)
      yield batch, targets[chosen]


if __name__ == "__main__":
  use_all_cores()
  print(f"parameters (as Keras counts them): {parameter_count(build_model()):,}")
