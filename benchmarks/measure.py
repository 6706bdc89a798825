"""One benchmark measurement per process: `python -m benchmarks.measure NAME --dataset=...`.

Each measurement runs in a fresh process, so none inherits another's compiled functions or
threads, and times "from process start" include Python and TensorFlow start-up. The result
is one line, `RESULT {json}`, on standard output. `benchmarks.run` runs them all.

  pipeline            the training input pipeline alone, images/s
  package             the package's training loop (controller.make_train_loop), steady images/s,
                      without shift augmentation unless --shift_pixels (the exercise has none),
                      under --precision (the resolved policy and its reason are in the result)
  exercise            the same model the original exercise's way: float64 NumPy arrays / 255
                      into Keras `model.fit`, batch 128, steady images/s
  package_tta         wall-clock time until the test metrics reach the bar, package recipe
                      (step None: the run ended without reaching it)
  exercise_tta        the same, the exercise's way (test metrics at each epoch's end; epochs
                      None: not reached in --max_epochs, seconds then run to the last epoch)
  startup             time from process start to the package's first training step, by stage
  pytorch             the same model in plain PyTorch (benchmarks.torch_peer), steady images/s,
                      on --arrays (an npz of the training and test splits: this process imports
                      no TensorFlow, so the two frameworks' thread pools never share one), in
                      the recipe --channels_last, --autocast_bfloat16, --compile say (default:
                      eager float32 NCHW); torch.compile's compilation is in the warm-up
  pytorch_tta         package_tta's recipe in PyTorch: --epochs of the same schedule, batch,
                      shifts, loss weights and optimizer, the test split evaluated every
                      --eval_every_steps and at each epoch's end; the same recipe options, and
                      the time from process start counts torch.compile's compilation
  limits              what this machine's kernels reach, in float32 and bfloat16, and what a
                      step's FLOPs are, as TensorFlow counts them (benchmarks.limits), at
                      --batch_size

The package's measurements (package, package_tta, startup) build the task under --precision
(default auto), set once through train.configure_process; their results record the resolved
`precision` and `precision_reason`.
"""

import functools
import json
import os
import sys
import tempfile
import time

from absl import app, flags

from benchmarks import precision as precision_lib
from trainer.config import DEFAULT_LOSS_WEIGHTS, format_loss_weights, PRECISIONS, TrainConfig

# The trainer's defaults (trainer.config imports no TensorFlow, so start-up times stay whole).
DEFAULTS = TrainConfig
FLAGS = flags.FLAGS


def _define_flags() -> None:
  """Defined only when run as a program, so that tests may import this module alongside
  trainer.task (whose --dataset and --batch_size are defined on import)."""
  flags.DEFINE_string("dataset", "idx:/usr/share/datasets/fashion-mnist", "Any --dataset source.")
  flags.DEFINE_integer("batch_size", DEFAULTS.batch_size, "Global batch size.")
  flags.DEFINE_integer("steps_per_loop", 50, "Package loop: steps per call into the device.")
  flags.DEFINE_integer("measure_steps", 600, "Throughput: steps timed after the warm-up.")
  flags.DEFINE_bool("jit_compile", False, "Package loop: XLA-compile each replica's step.")
  flags.DEFINE_float("target_accuracy", 0.90, "Time to accuracy: test accuracy to reach.")
  flags.DEFINE_float("target_mse", 0.015, "Time to accuracy: test reconstruction MSE to reach.")
  flags.DEFINE_integer("epochs", 3, "Package time to accuracy: --epochs of its recipe.")
  flags.DEFINE_integer("eval_every_steps", 250, "Package time to accuracy: evaluation cadence.")
  flags.DEFINE_integer("shift_pixels", 0, "Package loop and time to accuracy: --shift_pixels (0: "
                       "none, the exercise's work per step).")
  flags.DEFINE_float("learning_rate", DEFAULTS.learning_rate,
                     "Package time to accuracy: --learning_rate.")
  flags.DEFINE_string("loss_weights", format_loss_weights(DEFAULT_LOSS_WEIGHTS),
                      "Package time to accuracy: --loss_weights.")
  flags.DEFINE_string("loss_weighting", DEFAULTS.loss_weighting,
                      "Package time to accuracy: --loss_weighting.")
  flags.DEFINE_string("arrays", "", "PyTorch peer: an npz of uint8 `images` (N, 28, 28, 1) and "
                      "`labels`, and `test_images` and `test_labels`, written by benchmarks.run "
                      "from --dataset's training and test splits.")
  flags.DEFINE_integer("max_epochs", 20, "Exercise time to accuracy: give up after this many.")
  flags.DEFINE_enum("precision", "auto", PRECISIONS, "Package: " + precision_lib.FLAG_HELP)
  flags.DEFINE_bool("channels_last", False, "PyTorch peer: the model and its inputs in "
                    "channels_last memory format (NHWC in memory).")
  flags.DEFINE_bool("autocast_bfloat16", False, "PyTorch peer: each step's forward pass under "
                    'torch.autocast("cpu", dtype=torch.bfloat16); the losses in float32.')
  flags.DEFINE_bool("compile", False, "PyTorch peer: the model through torch.compile (its "
                    "compilation is in the warm-up of `pytorch`, and in the time from process "
                    "start of `pytorch_tta`).")
  flags.DEFINE_integer("width", DEFAULTS.width, "Package loop, start-up and PyTorch peer: "
                       "--width (tests take a narrow model).")
  flags.DEFINE_integer("latent_dim", DEFAULTS.latent_dim, "Package loop, start-up and PyTorch "
                       "peer: --latent_dim.")


# Set by benchmarks.run just before it starts this process (time.time(), so comparable here).
PROCESS_START = float(os.environ.get("BENCHMARK_PROCESS_START", time.time()))


def _emit(**result) -> None:
  print("RESULT " + json.dumps(result), flush=True)


def _reached(metrics) -> bool:
  return (metrics["accuracy"] >= FLAGS.target_accuracy
          and metrics["reconstruction_mse"] <= FLAGS.target_mse)


def measure_pipeline(splits) -> None:
  from trainer.data import pipeline
  dataset = pipeline.training_dataset(splits.train, FLAGS.batch_size,
                                  pipeline.steps_per_epoch(len(splits.train), FLAGS.batch_size),
                                  pipeline.TrainingInput(seed=0, shift_pixels=1))
  batches = iter(dataset)
  for _ in range(20):
    next(batches)
  started = time.perf_counter()
  count = 2000
  for _ in range(count):
    next(batches)
  _emit(images_per_second=count * FLAGS.batch_size / (time.perf_counter() - started))


def _package_loop(config, splits, strategy):
  """The package's task and the controller's loop over it, as `trainer.job.train` builds them,
  under `config.precision`'s policy (set here, once, before anything is built); and the
  resolved policy with its reason."""
  from trainer.job import controller
  from trainer.multitask import problem
  resolved = precision_lib.configure(config, strategy)
  task = problem.make_task(config, strategy, resolved.policy, splits)
  return (task, controller.make_train_loop(strategy, task), iter(task.train_dataset(0)),
          resolved)


def _precision_figures(resolved, config) -> dict:
  """What a result records of its precision: the policy, why, and the flag asked."""
  return {"precision": resolved.policy, "precision_reason": resolved.reason,
          "precision_flag": config.precision}


def measure_package(splits) -> None:
  import tensorflow as tf
  from trainer.config import TrainConfig
  strategy = tf.distribute.get_strategy()
  config = TrainConfig(dataset=FLAGS.dataset, model_dir=tempfile.mkdtemp(),
                       batch_size=FLAGS.batch_size, steps_per_loop=FLAGS.steps_per_loop,
                       shift_pixels=FLAGS.shift_pixels, jit_compile=FLAGS.jit_compile,
                       precision=FLAGS.precision, width=FLAGS.width,
                       latent_dim=FLAGS.latent_dim)
  _, loop, batches, resolved = _package_loop(config, splits, strategy)
  calls = max(2, FLAGS.measure_steps // config.steps_per_loop)
  steps, no_stop = tf.constant(config.steps_per_loop), tf.constant(0.0)
  for _ in range(2):  # Tracing, compilation and the first steps are left out.
    loop(batches, steps, no_stop)[0].numpy()
  started = time.perf_counter()
  for _ in range(calls):
    loop(batches, steps, no_stop)[0].numpy()  # The host reads the outputs each call.
  seconds = time.perf_counter() - started
  _emit(images_per_second=calls * config.steps_per_loop * config.batch_size / seconds,
        **_precision_figures(resolved, config))


def _exercise_model():
  """The package's model, compiled as the exercise compiles it, and its float64 arrays."""
  import keras
  import numpy as np
  from trainer.multitask import CLASSIFIER, DECODER
  from trainer.multitask.model import build_model
  model = build_model(DEFAULTS.latent_dim, DEFAULTS.width, scaled_inputs=True)
  model.compile(optimizer=keras.optimizers.Adam(),
                loss={CLASSIFIER: "sparse_categorical_crossentropy", DECODER: "mse"},
                loss_weights={CLASSIFIER: 1.0, DECODER: 0.2})

  def arrays(split):
    pixels = split.images.astype(np.float64) / 255.0
    return pixels, {CLASSIFIER: split.labels, DECODER: pixels}

  return model, arrays


def measure_exercise(splits) -> None:
  import keras
  model, arrays = _exercise_model()
  batch_ends = []
  timer = keras.callbacks.LambdaCallback(
      on_train_batch_end=lambda batch, logs: batch_ends.append(time.perf_counter()))
  x, y = arrays(splits.train)
  model.fit(x, y, batch_size=128, epochs=1, verbose=0, callbacks=[timer])
  warm = 20  # Tracing, compilation and the first steps are left out.
  _emit(images_per_second=(len(batch_ends) - 1 - warm) * 128 / (batch_ends[-1] - batch_ends[warm]))


def measure_exercise_tta(splits) -> None:
  import keras
  import numpy as np
  model, arrays = _exercise_model()
  x, y = arrays(splits.train)
  x_test, _ = arrays(splits.test)

  class StopAtTarget(keras.callbacks.Callback):
    last_metrics = None

    def on_epoch_end(self, epoch, logs=None):
      outputs = self.model.predict(x_test, batch_size=512, verbose=0)
      metrics = {"accuracy": float(np.mean(np.argmax(outputs["classifier"], -1)
                                           == splits.test.labels)),
                 "reconstruction_mse": float(np.mean((outputs["decoder"] - x_test) ** 2))}
      print(f"epoch {epoch + 1} at {time.time() - PROCESS_START:.1f} s: {metrics}",
            file=sys.stderr, flush=True)
      self.last_metrics = metrics
      if _reached(metrics):
        _emit(reached_at=time.time(), epochs=epoch + 1, **metrics)
        self.model.stop_training = True

  stopper = StopAtTarget()
  model.fit(x, y, batch_size=128, epochs=FLAGS.max_epochs, verbose=0, callbacks=[stopper])
  if not _reached(stopper.last_metrics):  # Say so, with when and where the run ended.
    _emit(ended_at=time.time(), epochs=None, **stopper.last_metrics)


class _Reached(Exception):
  pass


def measure_package_tta(splits) -> None:
  import tensorflow as tf
  from trainer.config import parse_loss_weights, TrainConfig
  from trainer.job import train
  from trainer.multitask import problem
  config = TrainConfig(dataset=FLAGS.dataset, model_dir=tempfile.mkdtemp(), report=False,
                       batch_size=FLAGS.batch_size, epochs=FLAGS.epochs,
                       eval_every_steps=FLAGS.eval_every_steps, shift_pixels=FLAGS.shift_pixels,
                       learning_rate=FLAGS.learning_rate,
                       loss_weights=parse_loss_weights(FLAGS.loss_weights),
                       loss_weighting=FLAGS.loss_weighting, precision=FLAGS.precision)
  resolved = None

  def stop_at_target(global_step, evaluate):
    metrics = evaluate("test")
    print(f"step {global_step} at {time.time() - PROCESS_START:.1f} s: {metrics}", file=sys.stderr,
          flush=True)
    if _reached(metrics):
      _emit(reached_at=time.time(), step=global_step, **metrics,
            **_precision_figures(resolved, config))
      raise _Reached

  resolved = precision_lib.configure(config, tf.distribute.get_strategy())
  try:
    metrics = train.run(config, tf.distribute.get_strategy(),
                        functools.partial(problem.make_task, splits=splits),
                        on_evaluation=stop_at_target)
  except _Reached:
    return
  # Not reached: say so, with where the run ended.
  _emit(step=None, accuracy=metrics["test_accuracy"],
        reconstruction_mse=metrics["test_reconstruction_mse"],
        **_precision_figures(resolved, config))


def measure_startup(_) -> None:
  stages = {}
  mark = lambda name: stages.setdefault(name, time.time() - PROCESS_START)
  import tensorflow as tf
  from trainer.config import TrainConfig
  from trainer.data import sources
  from trainer.job import distribution
  mark("python_and_tensorflow_imports")
  splits = sources.load_splits(FLAGS.dataset)
  mark("data_loaded")
  strategy = distribution.get_strategy("auto")
  mark("strategy_ready")
  config = TrainConfig(dataset=FLAGS.dataset, model_dir=tempfile.mkdtemp(),
                       precision=FLAGS.precision, width=FLAGS.width, latent_dim=FLAGS.latent_dim)
  _, loop, batches, resolved = _package_loop(config, splits, strategy)
  mark("model_and_input_pipeline_built")
  loop(batches, tf.constant(1), tf.constant(0.0))[0].numpy()
  mark("first_step_done")
  _emit(**stages, **_precision_figures(resolved, config))


def _peer_recipe():
  from benchmarks import torch_peer
  return torch_peer.Recipe(channels_last=FLAGS.channels_last,
                           autocast_bfloat16=FLAGS.autocast_bfloat16, compile=FLAGS.compile)


def measure_pytorch(_) -> None:
  import itertools

  import numpy as np

  from benchmarks import torch_peer
  torch_peer.use_all_cores()
  recipe = _peer_recipe()
  with np.load(FLAGS.arrays, allow_pickle=False) as arrays:
    images, labels = arrays["images"], arrays["labels"]
  model = torch_peer.build_model(FLAGS.latent_dim, FLAGS.width)
  warm = 20  # As `exercise`: the first steps (allocation, kernel choice, compilation) are out.
  optimizer, scheduler = torch_peer.make_optimizer(model, warm + FLAGS.measure_steps)
  step = torch_peer.prepare(model, recipe)
  batches = torch_peer.shuffled_batches(images, labels, FLAGS.batch_size)
  started = time.perf_counter()
  torch_peer.train_steps(step, optimizer, scheduler, itertools.islice(batches, warm),
                         recipe=recipe)
  warm_seconds = time.perf_counter() - started
  started = time.perf_counter()
  torch_peer.train_steps(step, optimizer, scheduler,
                         itertools.islice(batches, FLAGS.measure_steps), recipe=recipe)
  _emit(images_per_second=FLAGS.measure_steps * FLAGS.batch_size
        / (time.perf_counter() - started), warm_up_seconds=warm_seconds,
        recipe=recipe.name, **recipe._asdict())


def measure_pytorch_tta(_) -> None:
  import numpy as np

  import torch

  from benchmarks import torch_peer
  from trainer.config import parse_loss_weights
  if FLAGS.loss_weighting != "fixed":
    sys.exit(f"error: the PyTorch peer has only the fixed weighting, not --loss_weighting="
             f"{FLAGS.loss_weighting}")
  torch_peer.use_all_cores()
  torch.manual_seed(0)  # The package's default --seed: one run is one initialisation.
  with np.load(FLAGS.arrays, allow_pickle=False) as arrays:
    images, labels = arrays["images"], arrays["labels"]
    test_images, test_labels = arrays["test_images"], arrays["test_labels"]
  steps_per_epoch = len(labels) // FLAGS.batch_size  # The remainder dropped, as the package.
  total_steps = FLAGS.epochs * steps_per_epoch
  recipe = _peer_recipe()
  model = torch_peer.build_model(FLAGS.latent_dim, FLAGS.width)
  optimizer, scheduler = torch_peer.make_optimizer(model, total_steps,
                                                   peak=FLAGS.learning_rate)
  step_model = torch_peer.prepare(model, recipe)  # Compiled on its first call, timed here.
  batches = torch_peer.shuffled_batches(images, labels, FLAGS.batch_size,
                                        shift_pixels=FLAGS.shift_pixels)
  weights = parse_loss_weights(FLAGS.loss_weights)
  step = 0
  while step < total_steps:
    # To the next evaluation: every --eval_every_steps and each epoch's end, as the package.
    stop = min(total_steps, (step // steps_per_epoch + 1) * steps_per_epoch)
    if FLAGS.eval_every_steps:  # 0: at epoch ends only, as the package.
      stop = min(stop, (step // FLAGS.eval_every_steps + 1) * FLAGS.eval_every_steps)
    torch_peer.train_steps(step_model, optimizer, scheduler,
                           (next(batches) for _ in range(stop - step)), weights, recipe=recipe)
    step = stop
    # In batches of the training batch, as the package evaluates, in the same recipe.
    metrics = torch_peer.evaluate(step_model, test_images, test_labels, FLAGS.batch_size,
                                  recipe=recipe)
    print(f"step {step} at {time.time() - PROCESS_START:.1f} s: {metrics}", file=sys.stderr,
          flush=True)
    if _reached(metrics):
      _emit(reached_at=time.time(), step=step, **metrics, recipe=recipe.name)
      return
  _emit(step=None, **metrics, recipe=recipe.name)


def measure_limits(_) -> None:
  from benchmarks import limits
  _emit(**limits.measure(FLAGS.batch_size))


MEASUREMENTS = {"pipeline": measure_pipeline, "package": measure_package,
                "exercise": measure_exercise, "package_tta": measure_package_tta,
                "exercise_tta": measure_exercise_tta, "startup": measure_startup,
                "limits": measure_limits, "pytorch": measure_pytorch,
                "pytorch_tta": measure_pytorch_tta}
# Those that read no --dataset.
WITHOUT_DATA = ("startup", "limits", "pytorch", "pytorch_tta")


def main(argv) -> None:
  if len(argv) != 2 or argv[1] not in MEASUREMENTS:
    sys.exit(f"usage: python -m benchmarks.measure {{{','.join(MEASUREMENTS)}}} [--flags]")
  splits = None
  if argv[1] not in WITHOUT_DATA:
    from trainer.data import sources
    splits = sources.load_splits(FLAGS.dataset)
  MEASUREMENTS[argv[1]](splits)


if __name__ == "__main__":
  _define_flags()
  app.run(main)
