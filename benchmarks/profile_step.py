"""Where a training call's time goes: a per-op profile of one call of the package's loop.

    pip install -e '.[bench]'                  # xprof: the TensorBoard profile plugin's tools
    python -m benchmarks.profile_step [--dataset=idx:/usr/share/datasets/fashion-mnist]
        [--batch_size=64] [--steps_per_loop=50] [--precision=auto] [--logdir=DIR]
        [--output=FILE]

Builds the training loop as `benchmarks.measure package` does (the package's task and
`controller.make_train_loop` under --precision's policy, set once through
train.configure_process, the default strategy; the model, batch and the rest are
TrainConfig's defaults; the resolved policy and its reason head the summary), runs two calls so that tracing and oneDNN's kernel choice stay
out, times a third, then runs ONE call of --steps_per_loop steps under TensorFlow's profiler.
xprof's `framework_op_stats` tool (TensorBoard's profile plugin shows it as "framework op
stats") reads the trace and gives each TensorFlow op's self-time; those are summed by category:

  convolution          op types with "Conv" (Conv2D and its two gradients, oneDNN's _Mkl*)
  batch normalisation  ops under a layer's `*_bn` name scope, forward and gradient (Keras 3
                       builds the layer from Sum, Square, Mul and the like, never the fused
                       kernel, so only the scope tells them apart), and FusedBatchNorm*
  optimizer update     ops under the optimizer's name scope (AdamW's moments, decay, assigns)
  dense (MatMul)       the dense layers' matrix products, forward and gradient
  input pipeline       tf.data's iterator events, and the ops of its map functions
  other                the rest: activations, pooling, losses, the finiteness checks, ...

It prints, and writes to --output (benchmarks/profile_step.txt; empty: not written), each
category's milliseconds per step and share, the 15 op types with the most self-time, and the
summed op self-time against the call's wall time (and the unprofiled call's: the profiler's
own cost): two ops may run at once on TensorFlow's executor threads, so the sum can exceed the
wall time, and the shares are of the sum. Above a 1-minute load average of 1 when it starts,
it says the machine was loaded. The trace stays in --logdir, for `xprof --logdir=DIR` or
TensorBoard to browse.
"""

import collections
import dataclasses
import glob
import json
import os
import re
import tempfile
import time
from typing import Dict, Iterable, List, Tuple

from absl import app, flags

from benchmarks import precision as precision_lib
from trainer.config import PRECISIONS, TrainConfig

FLAGS = flags.FLAGS


def _define_flags() -> None:
  """Defined only when run as a program, so that tests may import this module alongside
  trainer.task (whose --dataset and --batch_size are defined on import)."""
  flags.DEFINE_string("dataset", "idx:/usr/share/datasets/fashion-mnist", "Any --dataset source.")
  flags.DEFINE_integer("batch_size", TrainConfig.batch_size, "Global batch size.")
  flags.DEFINE_integer("steps_per_loop", 50, "Steps in the profiled call.")
  flags.DEFINE_enum("precision", "auto", PRECISIONS, precision_lib.FLAG_HELP)
  flags.DEFINE_string("logdir", "", "Where the trace goes (empty: a new temporary directory).")
  flags.DEFINE_string("output", os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                             "profile_step.txt"),
                      "Where the printed summary is written too (empty: nowhere).")


CATEGORIES = ("convolution", "batch normalisation", "optimizer update", "dense (MatMul)",
              "input pipeline", "other")
TOP_OP_TYPES = 15
# A layer's name scope ends in "_bn" (trainer.multitask.model names them so); TensorFlow may add "_1".
_BATCH_NORM_SCOPE = re.compile(r"(^|/)[^/]*_bn(_\d+)?/")


@dataclasses.dataclass(frozen=True)
class Profile:
  """One profiled call: self-times in seconds, summed by category and by op type."""
  steps: int
  batch_size: int
  wall_seconds: float
  unprofiled_seconds: float  # The same call's wall time without the profiler, just before.
  by_category: Dict[str, float]
  by_type: Dict[str, float]
  precision: str = "float32"  # The Keras dtype policy the loop was built under.
  precision_reason: str = ""  # Why --precision resolved to it.

  @property
  def op_seconds(self) -> float:
    return sum(self.by_category.values())

  def shares(self) -> Dict[str, float]:
    return {name: seconds / self.op_seconds for name, seconds in self.by_category.items()}


def optimizer_scope(optimizer_name: str) -> re.Pattern:
  """The name scope of the optimizer's ops, from its Keras name: Keras numbers the names of
  later optimizers in a process ("adam_w", "adam_w_1"), so any number matches."""
  base = re.sub(r"_\d+$", "", optimizer_name)
  return re.compile(rf"(^|/){re.escape(base)}(_\d+)?/")


def category(op_name: str, op_type: str, optimizer: re.Pattern) -> str:
  """The category of one op, from its full name and type as the profile shows them (say
  "while/body/_1/while/multitask_autoencoder_1/encoder_1/encoder1_1_bn_1/Square", "Square")."""
  # The loop's steps run inside the while loop autograph makes of `for ... in tf.range`; what
  # runs outside it is tf.data's map functions, on tf.data's threads (plus a few scalar ops
  # once per call). "Dataset" is the iterator's own events, IteratorGetNext its consumer.
  if op_type == "Dataset" or op_type.startswith("IteratorGetNext") or not op_name.startswith(
      "while/"):
    return "input pipeline"
  if _BATCH_NORM_SCOPE.search(op_name) or "FusedBatchNorm" in op_type:
    return "batch normalisation"
  if optimizer.search(op_name) or op_type.startswith("ResourceApply"):
    return "optimizer update"
  if "Conv" in op_type:
    return "convolution"
  if "MatMul" in op_type:
    return "dense (MatMul)"
  return "other"


def _timed(call) -> float:
  started = time.perf_counter()
  call()[0].numpy()  # Waits for the call's end, as the controller does.
  return time.perf_counter() - started


def package_loop(config: TrainConfig, splits):
  """The package's task and the controller's loop over it, under the default strategy and
  `config.precision`'s policy (set once, here, before anything is built), as
  `benchmarks.measure`'s `_package_loop` builds them (that module is not imported: it
  defines its flags on import, and they clash with trainer.task's); and the resolved policy
  with its reason."""
  import tensorflow as tf
  from trainer.job import controller
  from trainer.multitask import problem
  strategy = tf.distribute.get_strategy()
  resolved = precision_lib.configure(config, strategy)
  task = problem.make_task(config, strategy, resolved.policy, splits)
  return (task, controller.make_train_loop(strategy, task), iter(task.train_dataset(0)),
          resolved)


def capture(loop, batches, steps: int, logdir: str) -> Tuple[float, float]:
  """Profiles one call of `loop` for `steps` steps into `logdir`, after three unprofiled
  ones; returns the wall seconds of the profiled call and of the unprofiled one before it."""
  import tensorflow as tf
  steps, no_stop = tf.constant(steps), tf.constant(0.0)
  call = lambda: loop(batches, steps, no_stop)
  for _ in range(2):  # Tracing, oneDNN's kernel choice and the first steps are left out.
    _timed(call)
  unprofiled_seconds = _timed(call)  # What the profiler's own cost adds shows against this.
  tf.profiler.experimental.start(logdir)
  try:
    wall_seconds = _timed(call)
  finally:
    tf.profiler.experimental.stop()
  return wall_seconds, unprofiled_seconds


def op_self_times(logdir: str) -> List[Tuple[str, str, float]]:
  """(op name, op type, self-seconds) of each TensorFlow op in the newest trace in `logdir`,
  as xprof's framework_op_stats tool sums them over the trace."""
  from xprof.convert import raw_to_tool_data
  runs = sorted(glob.glob(os.path.join(logdir, "plugins", "profile", "*")))
  paths = glob.glob(os.path.join(runs[-1], "*.xplane.pb")) if runs else []
  if not paths:
    raise FileNotFoundError(f"no trace (*.xplane.pb) under {logdir}/plugins/profile")
  data, _ = raw_to_tool_data.xspace_to_tool_data(paths, "framework_op_stats",
                                                 {"use_saved_result": False})
  if not data:
    raise RuntimeError(f"xprof could not read the trace in {runs[-1]}")
  # Its first table is every host op, with the threads' idle time as an "IDLE" row. (Its
  # occurrence counts are unreliable on CPU, twice the events in the trace; the times are not.)
  table = json.loads(data)[0]
  columns = [column["id"] for column in table["cols"]]
  rows = [dict(zip(columns, (cell.get("v") for cell in row["c"]))) for row in table["rows"]]
  return [(row["operation"], row["type"], row["total_self_time"] / 1e6)
          for row in rows if row["type"] != "IDLE"]


def summarise(ops: Iterable[Tuple[str, str, float]], optimizer_name: str, steps: int,
              batch_size: int, wall_seconds: float, unprofiled_seconds: float,
              precision: str = "float32", precision_reason: str = "") -> Profile:
  """Sums op self-times by category (every category present, zero if unseen) and by type."""
  optimizer = optimizer_scope(optimizer_name)
  by_category = dict.fromkeys(CATEGORIES, 0.0)
  by_type = collections.Counter()
  for name, op_type, seconds in ops:
    by_category[category(name, op_type, optimizer)] += seconds
    by_type[op_type] += seconds
  return Profile(steps, batch_size, wall_seconds, unprofiled_seconds, by_category,
                 dict(by_type), precision, precision_reason)


def profile(config: TrainConfig, splits, logdir: str) -> Profile:
  """Profiles one call of the package's loop on `splits` under `config` (its steps_per_loop
  steps) into `logdir`, and summarises it."""
  task, loop, batches, resolved = package_loop(config, splits)
  wall_seconds, unprofiled_seconds = capture(loop, batches, config.steps_per_loop, logdir)
  return summarise(op_self_times(logdir), task.optimizer.name, config.steps_per_loop,
                   config.batch_size, wall_seconds, unprofiled_seconds, resolved.policy,
                   resolved.reason)


def report(result: Profile, dataset: str = "", load_average: float = 0.0) -> str:
  """The summary as a text table; `load_average`, the machine's before the run, is noted
  above 1 (with 2 CPUs, other work then took time from the call)."""
  per_step = lambda seconds: 1e3 * seconds / result.steps
  shares = result.shares()
  lines = [f"One call of the package's training loop: {result.steps} steps of batch "
           f"{result.batch_size}, {result.precision}, {os.cpu_count()} logical CPUs."]
  lines += [f"Precision: {result.precision} ({result.precision_reason})."
            ] if result.precision_reason else []
  lines += [f"Data: {dataset}."] if dataset else []
  lines += ["Self-time of each TensorFlow op (xprof framework_op_stats), summed:", "",
           f"{'category':<34}{'ms/step':>9}{'share':>8}"]
  lines += [f"{name:<34}{per_step(result.by_category[name]):>9.2f}{shares[name]:>8.1%}"
            for name in CATEGORIES]
  lines += [f"{'all ops':<34}{per_step(result.op_seconds):>9.2f}{1:>8.1%}",
            f"{'wall time of the call':<34}{per_step(result.wall_seconds):>9.2f}",
            f"{'the call before, unprofiled':<34}{per_step(result.unprofiled_seconds):>9.2f}",
            f"op self-time / wall time: {result.op_seconds / result.wall_seconds:.2f} (ops run "
            "at once on the executor's threads)", "",
            f"{'top ' + str(TOP_OP_TYPES) + ' op types':<34}{'ms/step':>9}{'share':>8}"]
  top = sorted(result.by_type.items(), key=lambda item: -item[1])[:TOP_OP_TYPES]
  lines += [f"{op_type:<34}{per_step(seconds):>9.2f}{seconds / result.op_seconds:>8.1%}"
            for op_type, seconds in top]
  if load_average > 1:
    lines += ["", f"A loaded machine: the 1-minute load average was {load_average:.2f} when the "
              "run started, so the times are inflated; the shares are what counts."]
  return "\n".join(lines) + "\n"


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  load_average = os.getloadavg()[0]  # Before this process's own work adds to it.
  from trainer.data import sources
  logdir = FLAGS.logdir or tempfile.mkdtemp(prefix="profile_step_")
  config = TrainConfig(dataset=FLAGS.dataset, model_dir=tempfile.mkdtemp(),
                       batch_size=FLAGS.batch_size, steps_per_loop=FLAGS.steps_per_loop,
                       precision=FLAGS.precision)
  text = report(profile(config, sources.load_splits(FLAGS.dataset), logdir), FLAGS.dataset,
                load_average)
  print(text, end="")
  if FLAGS.output:
    with open(FLAGS.output, "w") as f:
      f.write(text)
  print(f"The trace: {logdir} (browse it with `xprof --logdir={logdir}`).")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
