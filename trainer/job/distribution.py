"""Strategy and precision: from `--strategy` and `--precision` names to what TensorFlow runs.

One function picks the `tf.distribute.Strategy`, one the Keras dtype policy; both explain an
`auto` choice in the log and turn a choice that cannot work into a `UserInputError`.
"""

import glob
import json
import os
import platform
from typing import Dict, Iterable, List, NamedTuple, Optional, Tuple

import keras
import tensorflow as tf
from absl import logging

from trainer.config import PRECISIONS, STRATEGIES
from trainer.errors import first_line, unknown_choice, UserInputError


def _tpu_hint(tpu: str) -> Optional[str]:
  """Why a TPU may be reachable from here, or None. Cheap: it never dials a TPU."""
  if tpu:
    return f"--tpu={tpu} was given"
  if os.environ.get("TPU_NAME"):
    return f"$TPU_NAME={os.environ['TPU_NAME']} is set"
  if glob.glob("/dev/accel*"):
    return "this host has TPU chips (/dev/accel*)"
  return None


# What a collective raises when a peer worker died (connection reset) or stopped answering
# (the coordination service misses its heartbeats, about 10 s): training cannot go on.
PEER_FAILURES = (tf.errors.UnavailableError, tf.errors.DeadlineExceededError,
                 tf.errors.AbortedError, tf.errors.CancelledError)


def describe_op_error(error: tf.errors.OpError) -> str:
  """The informative line of a TensorFlow runtime error, whose message starts with boilerplate."""
  for line in error.message.splitlines():
    line = line.strip()
    if line and not line.startswith(("Graph execution error", "Detected at node", "File ")):
      return f"{type(error).__name__}: {line}"
  return type(error).__name__


def _tf_config() -> Tuple[Dict[str, int], dict]:
  """How many hosts of each type $TF_CONFIG's cluster names, and its task; each {} where it
  has none or is unset. Raises `UserInputError` for one that is not a JSON object with a
  cluster."""
  try:
    tf_config = json.loads(os.environ.get("TF_CONFIG") or "{}")
    hosts = {kind: len(addresses) for kind, addresses in tf_config.get("cluster", {}).items()}
    return hosts, dict(tf_config.get("task", {}))
  except (AttributeError, TypeError, ValueError) as e:  # ValueError: JSONDecodeError too.
    raise UserInputError(
        f"$TF_CONFIG is not a JSON object with a cluster ({e}); fix or unset it") from None


def cluster_workers() -> int:
  """How many hosts $TF_CONFIG names (chief and workers), 1 when it is unset."""
  hosts, _ = _tf_config()
  return max(1, hosts.get("chief", 0) + hosts.get("worker", 0))


def check_task_in_cluster() -> None:
  """Raises `UserInputError` when $TF_CONFIG's task is a chief or worker whose index is not
  one of its cluster's hosts of that type.

  TensorFlow stops such a host with a ValueError traceback in a cluster of several hosts, and
  in a cluster of one trains it alone without a word. Other task types, and a TF_CONFIG
  without a cluster, are left to TensorFlow.
  """
  hosts, task = _tf_config()
  kind, index = task.get("type"), task.get("index", 0)
  if not hosts or kind not in ("chief", "worker"):
    return
  try:
    position = int(index)  # As TensorFlow reads it.
  except (TypeError, ValueError):
    position = -1
  if not 0 <= position < hosts.get(kind, 0):
    raise UserInputError(
        f"$TF_CONFIG's task is {kind} index {json.dumps(index)}, but its cluster has "
        f"{_count_hosts(hosts.get(kind, 0), kind)}; set each host's task.index to its place in "
        f"cluster.{kind}, or unset TF_CONFIG to train on one host")


def _count_hosts(hosts: int, kind: str) -> str:
  """'no worker', '1 worker (index 0)', '3 workers (indices 0 to 2)'."""
  if hosts <= 1:
    return f"1 {kind} (index 0)" if hosts else f"no {kind}"
  return f"{hosts} {kind}s (indices 0 to {hosts - 1})"


def resolve_strategy_name(name: str, tpu: str = "") -> Tuple[str, str]:
  """The concrete strategy name for `name`, and why it was chosen (for `auto`)."""
  if name != "auto":
    return name, "asked for by --strategy"
  hint = _tpu_hint(tpu)
  if hint:
    return "tpu", hint
  workers = cluster_workers()
  if workers > 1:
    return "multi_worker_mirrored", f"$TF_CONFIG names {workers} workers"
  gpus = len(tf.config.list_physical_devices("GPU"))
  if gpus > 1:
    return "mirrored", f"{gpus} GPUs are visible"
  return "default", f"no TPU, one host, {gpus} GPU(s)"


def _connect_tpu(tpu: str) -> tf.distribute.cluster_resolver.TPUClusterResolver:
  tpu = tpu or os.environ.get("TPU_NAME") or "local"
  try:
    resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu)
    if tpu != "local":
      tf.config.experimental_connect_to_cluster(resolver)
    tf.tpu.experimental.initialize_tpu_system(resolver)
  except (ValueError, RuntimeError, tf.errors.OpError) as e:
    raise UserInputError(
        f"--strategy=tpu but no TPU is reachable at --tpu={tpu} ({first_line(e)}); "
        "run on a Cloud TPU VM (--tpu=local), name your TPU with --tpu, or pick another "
        "--strategy") from None
  return resolver


def get_strategy(name: str, tpu: str = "") -> tf.distribute.Strategy:
  """Creates the strategy `name` names; call it before any other TensorFlow work.

  `mirrored` mirrors over the local GPUs, or over the local logical CPU devices where there
  are no GPUs (how tests exercise it); `multi_worker_mirrored` reads the cluster from
  $TF_CONFIG, checked first whatever the strategy (`check_task_in_cluster`).
  """
  check_task_in_cluster()
  resolved, why = resolve_strategy_name(name, tpu)
  if resolved == "tpu":
    strategy = tf.distribute.TPUStrategy(_connect_tpu(tpu))
  elif resolved == "multi_worker_mirrored":
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
  elif resolved == "mirrored":
    devices = tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU")
    strategy = tf.distribute.MirroredStrategy([d.name for d in devices])
  elif resolved == "one_device":
    gpus = tf.config.list_logical_devices("GPU")
    strategy = tf.distribute.OneDeviceStrategy(gpus[0].name if gpus else "/cpu:0")
  elif resolved == "default":
    strategy = tf.distribute.get_strategy()
  else:
    raise UserInputError(unknown_choice("strategy", name, STRATEGIES))
  logging.info("Strategy: %s (%s), %d replica(s) in sync.", resolved, why,
               strategy.num_replicas_in_sync)
  return strategy


def strategy_name(strategy: tf.distribute.Strategy) -> str:
  """The --strategy name that would create `strategy`, for logs and metrics."""
  if isinstance(strategy, tf.distribute.TPUStrategy):
    return "tpu"
  if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
    return "multi_worker_mirrored"
  if isinstance(strategy, tf.distribute.MirroredStrategy):
    return "mirrored"
  if isinstance(strategy, tf.distribute.OneDeviceStrategy):
    return "one_device"
  return "default"


class Precision(NamedTuple):
  """A resolved `--precision`: the Keras dtype policy, and why it was chosen (for the log and
  metrics.json)."""
  policy: str
  reason: str


# The CPU flags (Linux's names) of a native bfloat16 dot product: oneDNN then runs bfloat16
# convolutions and matmuls for real; without them it converts to float32 and back, slower.
CPU_BFLOAT16_FLAGS = ("avx512_bf16", "amx_bf16")


def read_cpu_flags(path: str = "/proc/cpuinfo") -> Optional[List[str]]:
  """The first processor's flags in `path`, or None where there is no such file or line (not
  Linux, or not x86: ARM lists "Features" instead)."""
  try:
    with open(path) as f:
      for line in f:
        name, _, value = line.partition(":")
        if name.strip() == "flags":
          return value.split()
  except OSError:
    return None
  return None


def cpu_precision(cpu_flags: Optional[Iterable[str]], onednn_setting: Optional[str],
                  machine: str) -> Precision:
  """`auto` on a CPU: mixed_bfloat16 where oneDNN computes bfloat16 natively, float32 where it
  would be emulated.

  `cpu_flags` are /proc/cpuinfo's (None: unknown); `onednn_setting` is $TF_ENABLE_ONEDNN_OPTS
  (None: unset, and TensorFlow turns oneDNN on by itself on CPUs with these flags);
  `machine` is `platform.machine()`. Pure, so that each CPU can be tested from its flags.
  """
  if machine.lower() not in ("x86_64", "amd64"):
    return Precision("float32", f"a {machine or 'unknown'} CPU: bfloat16 is not native to "
                     "TensorFlow's kernels there")
  if onednn_setting is not None and onednn_setting.strip().lower() in ("0", "false"):
    return Precision("float32", f"a CPU with oneDNN turned off (TF_ENABLE_ONEDNN_OPTS="
                     f"{onednn_setting}): bfloat16 would be emulated")
  if cpu_flags is None:
    return Precision("float32", "a CPU whose flags cannot be read (no /proc/cpuinfo): "
                     "bfloat16 may be emulated")
  native = [flag for flag in CPU_BFLOAT16_FLAGS if flag in set(cpu_flags)]
  if native:
    return Precision("mixed_bfloat16", f"a CPU with {' and '.join(native)}: oneDNN computes "
                     "bfloat16 natively")
  return Precision("float32", "a CPU without avx512_bf16 or amx_bf16: bfloat16 would be "
                   "emulated")


def resolve_precision(name: str, strategy: tf.distribute.Strategy) -> Precision:
  """The Keras dtype policy for `name`, and why: `auto` is bfloat16 on TPU, float16 on GPU,
  and on a CPU what `cpu_precision` says of this one."""
  if name not in PRECISIONS:
    raise UserInputError(unknown_choice("precision", name, PRECISIONS))
  if name != "auto":
    return Precision(name, "asked for by --precision")
  if isinstance(strategy, tf.distribute.TPUStrategy):
    return Precision("mixed_bfloat16", "a TPU")
  if tf.config.list_logical_devices("GPU"):
    return Precision("mixed_float16", "a GPU")
  return cpu_precision(read_cpu_flags(), os.environ.get("TF_ENABLE_ONEDNN_OPTS"),
                       platform.machine())


def set_precision(precision: Precision) -> None:
  """Sets the global Keras dtype policy; do it once, before any layer is built."""
  keras.mixed_precision.set_dtype_policy(precision.policy)
  logging.info("Precision: %s (%s; compute %s, variables %s).", precision.policy,
               precision.reason, keras.mixed_precision.dtype_policy().compute_dtype,
               keras.mixed_precision.dtype_policy().variable_dtype)


def default_steps_per_loop(strategy: tf.distribute.Strategy) -> int:
  """Training steps per call into the device, by platform.

  Each call costs a host round trip: on a TPU, where a step takes well under a millisecond,
  500 steps a call keep the TPU busy; GPUs, 200. On CPU a step takes tens of milliseconds,
  and 50 steps (seconds) keep SIGTERM, progress and checkpoints prompt at no measured cost.
  """
  if isinstance(strategy, (tf.distribute.TPUStrategy, tf.distribute.experimental.TPUStrategy)):
    return 500
  if tf.config.list_logical_devices("GPU"):
    return 200
  return 50
