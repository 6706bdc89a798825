"""What this machine's kernels reach, measured through the same TensorFlow build and threads
as the training loop, and how many FLOPs a training step really asks of them.

    python -m benchmarks.measure limits --batch_size=128     # prints RESULT {json}

A peak computed from /proc/cpuinfo flags is not a limit a user's kernels meet: AMD's Zen 4
reports avx512f but runs 512-bit FMAs on 256-bit units, two vCPUs may be one core's two
threads, and the listed clock is not the running one. So the limit is measured: large
matrix products (the kernel closest to the machine's peak; the best of a few sizes), and the
model's heaviest convolution alone, forward and backward. The best of a few timed repeats of
each counts.

Each is measured in every compute dtype asked for (float32, and bfloat16 for the
mixed_bfloat16 policy: issue 39), so that a training step's achieved rate is compared with
the limit of its own precision. Where bfloat16 is emulated (no avx512_bf16 or AMX), its
limit is low, and so is the mixed_bfloat16 step's rate.
"""

import os
import platform
import re
import time
from typing import Callable, Dict, Iterable

# The matmul's rate grows with its size up to the cache's and the threads' sweet spot, which
# differs by CPU and dtype: the best of these counts.
MATMUL_SIZES = (1024, 2048, 4096)
DTYPES = ("float32", "bfloat16")
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


def matmul_rate(size: int = 2048, dtype: str = "float32") -> float:
  """FLOP/s of a (size x size) @ (size x size) product in `dtype`, 2 size^3 FLOPs each."""
  import tensorflow as tf
  left = tf.random.stateless_normal((size, size), seed=(1, 2), dtype=dtype)
  right = tf.random.stateless_normal((size, size), seed=(3, 4), dtype=dtype)
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


def convolution_rates(shape: Dict[str, int], batch: int, dtype: str = "float32"
                      ) -> Dict[str, float]:
  """FLOP/s of one 'same' convolution of `shape` on `batch` images in `dtype`: forward alone,
  and forward with both backward products (input and kernel gradients, each as many FLOPs)."""
  import tensorflow as tf
  images = tf.random.stateless_normal(
      (batch, shape["height"], shape["width"], shape["channels"]), seed=(5, 6), dtype=dtype)
  kernel = tf.Variable(tf.random.stateless_normal(
      (shape["kernel"], shape["kernel"], shape["channels"], shape["filters"]), seed=(7, 8),
      dtype=dtype))
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
    return (tf.reduce_sum(tf.cast(output, tf.float32))
            + tf.reduce_sum(tf.cast(input_gradient, tf.float32))
            + tf.reduce_sum(tf.cast(kernel_gradient, tf.float32)))

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


def dtype_limits(shape: Dict[str, int], batch: int, dtype: str,
                 sizes: Iterable[int] = MATMUL_SIZES) -> Dict[str, object]:
  """The rates of `dtype`'s kernels: the matmul at each of `sizes`, the heaviest convolution
  `shape` at `batch`, and the best of them all, `limit_flops_per_second`."""
  matmuls = {str(size): matmul_rate(size, dtype) for size in sizes}
  convolution = convolution_rates(shape, batch, dtype)
  return {"matmul_flops_per_second_by_size": matmuls,
          "matmul_flops_per_second": max(matmuls.values()),
          "convolution_forward_flops_per_second": convolution["forward"],
          "convolution_forward_and_backward_flops_per_second":
              convolution["forward_and_backward"],
          "limit_flops_per_second": max(*matmuls.values(), *convolution.values())}


def measure(batch: int, dtypes: Iterable[str] = DTYPES) -> Dict[str, object]:
  """Every figure of this module for the default model at `batch` images a step, the kernels'
  rates in each of `dtypes` (`by_dtype`)."""
  import tensorflow as tf
  from trainer.config import TrainConfig
  from trainer.multitask.model import build_model
  model = build_model(TrainConfig.latent_dim, TrainConfig.width)
  shape = heaviest_convolution(model)
  return {
      "cpu": cpu_description(), "tensorflow": tf.__version__,
      "onednn": os.environ.get("TF_ENABLE_ONEDNN_OPTS", "default (on)"),
      "intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads() or "default",
      "heaviest_convolution": {**shape, "batch": batch},
      "by_dtype": {dtype: dtype_limits(shape, batch, dtype) for dtype in dtypes},
      # The same work under every policy: the count is of the float32 graph (a mixed policy
      # adds only casts, which the count leaves out as it leaves out other elementwise work).
      "counted_training_flops_per_image": counted_training_flops(model, batch),
  }
