"""What this machine's kernels reach, measured through the same TensorFlow build and threads
as the training loop, and how many FLOPs a training step really asks of them.

    python -m benchmarks.measure limits --batch_size=128     # prints RESULT {json}

A peak computed from /proc/cpuinfo flags is not a limit a user's kernels meet: AMD's Zen 4
reports avx512f but runs 512-bit FMAs on 256-bit units, two vCPUs may be one core's two
threads, and the listed clock is not the running one. So the limit is measured: a large
float32 matrix product (the kernel closest to the machine's peak), and the model's heaviest
convolution alone, forward and backward. The best of a few timed repeats of each counts.
"""

import os
import platform
import re
import time
from typing import Callable, Dict

MATMUL_SIZE = 2048
REPEATS = 5
SECONDS_PER_REPEAT = 1.0


def cpu_description() -> Dict[str, object]:
  """The CPU as Linux describes it: model name, family and model numbers, logical CPUs and
  the vector flags that matter to float32 kernels."""
  try:
    with open("/proc/cpuinfo") as f:
      cpuinfo = f.read()
  except OSError:
    cpuinfo = ""

  def field(name):
    found = re.search(rf"^{name}\s*:\s*(.+)$", cpuinfo, re.MULTILINE)
    return found.group(1).strip() if found else None

  flags = (field("flags") or "").split()
  return {"model_name": field("model name") or platform.processor(),
          "vendor": field("vendor_id"), "family": field("cpu family"), "model": field("model"),
          "logical_cpus": os.cpu_count(), "listed_mhz": field("cpu MHz"),
          "vector_flags": sorted(flag for flag in flags
                                 if flag.startswith(("avx", "fma", "amx", "sse4")))}


def _best_rate(run: Callable[[], object], flops_per_run: float) -> float:
  """FLOP/s of `run` (one call returning a tensor), the best of REPEATS timed repeats of
  about SECONDS_PER_REPEAT each, after a warm-up call (tracing, oneDNN's kernel choice)."""
  run().numpy()
  started = time.perf_counter()
  run().numpy()
  calls = max(1, int(SECONDS_PER_REPEAT / max(time.perf_counter() - started, 1e-6)))
  best = 0.0
  for _ in range(REPEATS):
    started = time.perf_counter()
    for _ in range(calls):
      result = run()
    result.numpy()  # Waits for the last call: TensorFlow's eager ops may run ahead.
    best = max(best, calls * flops_per_run / (time.perf_counter() - started))
  return best


def matmul_rate(size: int = MATMUL_SIZE) -> float:
  """FLOP/s of a float32 (size x size) @ (size x size) product, 2 size^3 FLOPs each."""
  import tensorflow as tf
  left = tf.random.stateless_normal((size, size), seed=(1, 2))
  right = tf.random.stateless_normal((size, size), seed=(3, 4))
  product = tf.function(lambda: tf.linalg.matmul(left, right))
  return _best_rate(product, 2.0 * size ** 3)


def heaviest_convolution(model) -> Dict[str, int]:
  """The stride-1 Conv2D of `model` (a Keras model, nested models included) with the most
  multiply-adds per image: its input height, width and channels and its filters."""
  import keras

  def layers(parent):
    for layer in parent.layers:
      yield from layers(layer) if isinstance(layer, keras.Model) else [layer]

  shapes = [dict(height=layer.input.shape[1], width=layer.input.shape[2],
                 channels=layer.input.shape[3], filters=layer.filters,
                 kernel=layer.kernel_size[0])
            for layer in layers(model) if type(layer) is keras.layers.Conv2D
            and layer.strides == (1, 1)]
  return max(shapes, key=lambda s: s["height"] * s["width"] * s["channels"] * s["filters"]
             * s["kernel"] ** 2)


def convolution_rates(shape: Dict[str, int], batch: int) -> Dict[str, float]:
  """FLOP/s of one 'same' float32 convolution of `shape` on `batch` images: forward alone, and
  forward with both backward products (input and kernel gradients, each as many FLOPs)."""
  import tensorflow as tf
  images = tf.random.stateless_normal(
      (batch, shape["height"], shape["width"], shape["channels"]), seed=(5, 6))
  kernel = tf.Variable(tf.random.stateless_normal(
      (shape["kernel"], shape["kernel"], shape["channels"], shape["filters"]), seed=(7, 8)))
  forward_flops = (2.0 * batch * shape["height"] * shape["width"] * shape["channels"]
                   * shape["filters"] * shape["kernel"] ** 2)

  @tf.function
  def forward():
    return tf.nn.conv2d(images, kernel, strides=1, padding="SAME")

  @tf.function
  def forward_and_backward():
    with tf.GradientTape() as tape:
      tape.watch(images)
      output = tf.nn.conv2d(images, kernel, strides=1, padding="SAME")
    input_gradient, kernel_gradient = tape.gradient(output, [images, kernel])
    # The output is used too: the gradients of a linear op do not need it, and the graph
    # optimizer would prune the forward product, leaving 2 of the 3 products counted.
    return (tf.reduce_sum(output) + tf.reduce_sum(input_gradient)
            + tf.reduce_sum(kernel_gradient))

  return {"forward": _best_rate(forward, forward_flops),
          "forward_and_backward": _best_rate(forward_and_backward, 3 * forward_flops)}


def counted_training_flops(model, batch: int) -> float:
  """FLOPs of one training step's forward and backward pass on `batch` images, per image, as
  TensorFlow's own cost analysis counts them (the graph profiler's float_operation view, from
  each op's registered shape-based cost: a direct convolution's 2 x multiply-adds)."""
  import tensorflow as tf

  @tf.function
  def step(images):
    with tf.GradientTape() as tape:
      outputs = model(images, training=True)
      loss = (tf.reduce_mean(outputs["classifier"]) + tf.reduce_mean(outputs["decoder"]))
    return tape.gradient(loss, model.trainable_variables)

  graph = step.get_concrete_function(
      tf.TensorSpec((batch, 28, 28, 1), tf.uint8)).graph
  options = tf.compat.v1.profiler.ProfileOptionBuilder.float_operation()
  options["output"] = "none"
  profile = tf.compat.v1.profiler.profile(graph, options=options)
  return profile.total_float_ops / batch


def measure(batch: int) -> Dict[str, object]:
  """Every figure of this module for the default model at `batch` images a step."""
  import tensorflow as tf
  from trainer.config import TrainConfig
  from trainer.model import build_model
  model = build_model(TrainConfig.latent_dim, TrainConfig.width)
  shape = heaviest_convolution(model)
  return {
      "cpu": cpu_description(), "tensorflow": tf.__version__,
      "onednn": os.environ.get("TF_ENABLE_ONEDNN_OPTS", "default (on)"),
      "intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads() or "default",
      "matmul_size": MATMUL_SIZE, "matmul_flops_per_second": matmul_rate(),
      "heaviest_convolution": {**shape, "batch": batch,
                               **{f"{name}_flops_per_second": rate for name, rate in
                                  convolution_rates(shape, batch).items()}},
      "counted_training_flops_per_image": counted_training_flops(model, batch),
  }
