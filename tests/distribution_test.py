"""Tests of trainer.job.distribution: strategy names, `auto`, precision, and their errors."""

import json

import pytest
import tensorflow as tf

from tests import helpers
from trainer.errors import UserInputError
from trainer.job import distribution


@pytest.fixture(autouse=True)
def _no_cluster(monkeypatch):
  monkeypatch.delenv("TF_CONFIG", raising=False)
  monkeypatch.delenv("TPU_NAME", raising=False)


@pytest.mark.parametrize("name, expected_type", [
    ("default", type(tf.distribute.get_strategy())),
    ("one_device", tf.distribute.OneDeviceStrategy),
    ("mirrored", tf.distribute.MirroredStrategy),
])
def test_each_local_name_makes_its_strategy(name, expected_type):
  strategy = distribution.get_strategy(name)
  assert type(strategy) is expected_type
  assert distribution.strategy_name(strategy) == name


def test_mirrored_mirrors_over_logical_cpus_when_there_is_no_gpu():
  assert distribution.get_strategy("mirrored").num_replicas_in_sync == 2


def test_auto_on_one_cpu_host_is_default():
  assert distribution.resolve_strategy_name("auto")[0] == "default"


def test_auto_picks_multi_worker_when_tf_config_names_two_workers(monkeypatch):
  monkeypatch.setenv("TF_CONFIG", json.dumps({
      "cluster": {"worker": ["localhost:1", "localhost:2"]}, "task": {"type": "worker", "index": 0}}))
  name, why = distribution.resolve_strategy_name("auto")
  assert name == "multi_worker_mirrored" and "2 workers" in why


def test_auto_counts_the_chief_of_a_vertex_ai_cluster(monkeypatch):
  # Vertex AI names worker pool 0 "chief" and pool 1 "worker" in each replica's TF_CONFIG.
  monkeypatch.setenv("TF_CONFIG", json.dumps({
      "cluster": {"chief": ["cmle-training-workerpool0-0:2222"],
                  "worker": [f"cmle-training-workerpool1-{i}:2222" for i in range(3)]},
      "task": {"type": "worker", "index": 2}}))
  name, why = distribution.resolve_strategy_name("auto")
  assert name == "multi_worker_mirrored" and "4 workers" in why


def test_auto_picks_tpu_when_one_is_named(monkeypatch):
  monkeypatch.setenv("TPU_NAME", "my-tpu")
  assert distribution.resolve_strategy_name("auto")[0] == "tpu"


def test_tpu_without_a_tpu_is_a_clear_error():
  with pytest.raises(UserInputError, match="--strategy=tpu but no TPU is reachable"):
    distribution.get_strategy("tpu")


def test_unknown_name_is_a_clear_error():
  with pytest.raises(UserInputError, match="unknown --strategy='horovod'"):
    distribution.get_strategy("horovod")


@pytest.mark.parametrize("tf_config", ["{not json", "[1, 2]", '{"cluster": 3}'])
def test_bad_tf_config_is_a_clear_error(monkeypatch, tf_config):
  monkeypatch.setenv("TF_CONFIG", tf_config)
  with pytest.raises(UserInputError, match="TF_CONFIG is not a JSON object with a cluster"):
    distribution.resolve_strategy_name("auto")


def _set_cluster(monkeypatch, workers: int, index) -> None:
  """$TF_CONFIG for a cluster of `workers` workers, this host the one at `index`."""
  monkeypatch.setenv("TF_CONFIG", json.dumps({
      "cluster": {"worker": [f"localhost:{port}" for port in range(1, workers + 1)]},
      "task": {"type": "worker", "index": index}}))


# Past a cluster of two, TensorFlow raises a ValueError; past a cluster of one, the host used to
# train alone without a word.
@pytest.mark.parametrize("workers, index, hosts", [
    (2, 5, "2 workers (indices 0 to 1)"),
    (1, 3, "1 worker (index 0)"),
])
def test_a_task_index_past_the_cluster_is_a_clear_error(monkeypatch, workers, index, hosts):
  _set_cluster(monkeypatch, workers, index)
  with pytest.raises(UserInputError) as e:
    distribution.get_strategy("auto")
  assert str(e.value) == (
      f"$TF_CONFIG's task is worker index {index}, but its cluster has {hosts}; set each "
      "host's task.index to its place in cluster.worker, or unset TF_CONFIG to train on one host")


def test_tasks_within_their_cluster_pass_the_check(monkeypatch):
  _set_cluster(monkeypatch, 1, 0)
  distribution.check_task_in_cluster()
  monkeypatch.setenv("TF_CONFIG", json.dumps({  # Vertex AI's: pool 0 is the chief.
      "cluster": {"chief": ["pool0-0:2222"], "worker": ["pool1-0:2222", "pool1-1:2222"]},
      "task": {"type": "chief", "index": 0}}))
  distribution.check_task_in_cluster()


def test_a_task_index_past_the_cluster_ends_the_job_with_one_line(tmp_path, monkeypatch, capsys):
  # Through the entry point's main in this process (the check comes before any strategy is
  # made); the trainer's start-up as a process is tests/cli_test.py's and predict_test's.
  from absl import flags
  from trainer import cli, task
  cluster = {"worker": ["localhost:1", "localhost:2"]}
  monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": cluster,
                                              "task": {"type": "worker", "index": 5}}))
  flags.FLAGS.unparse_flags()
  result = helpers.run_in_process(capsys, lambda: task.main(cli.parse_flags([
      "trainer.task", "--dataset=mnist_sample", f"--model_dir={tmp_path}/run", "--epochs=1"])))
  helpers.assert_one_error_line(
      result, "$TF_CONFIG's task is worker index 5, but its cluster has 2 workers (indices 0 to "
      "1); set each host's task.index to its place in cluster.worker, or unset TF_CONFIG to train "
      "on one host", whole=True)
  assert not (tmp_path / "run").exists()


# Flags as /proc/cpuinfo lists them, cut to what matters here.
AVX2 = "fpu sse2 avx fma avx2".split()
AVX512 = AVX2 + "avx512f avx512bw avx512vl avx512_vnni".split()  # Skylake to Ice Lake.
ZEN4 = AVX512 + ["avx512_bf16"]
SAPPHIRE_RAPIDS = AVX512 + "avx512_bf16 amx_bf16 amx_tile amx_int8".split()
AMX_ONLY = AVX2 + ["amx_bf16"]


@pytest.mark.parametrize("flags, onednn, machine, policy, why", [
    (ZEN4, None, "x86_64", "mixed_bfloat16", "a CPU with avx512_bf16: oneDNN computes"),
    (SAPPHIRE_RAPIDS, None, "x86_64", "mixed_bfloat16", "avx512_bf16 and amx_bf16"),
    (AMX_ONLY, "1", "x86_64", "mixed_bfloat16", "a CPU with amx_bf16: oneDNN"),
    (AVX2, None, "x86_64", "float32", "without avx512_bf16 or amx_bf16"),
    (AVX2, "1", "x86_64", "float32", "without avx512_bf16 or amx_bf16"),
    (AVX512, None, "x86_64", "float32", "without avx512_bf16 or amx_bf16"),
    ([], None, "x86_64", "float32", "without avx512_bf16 or amx_bf16"),
    (None, None, "x86_64", "float32", "flags cannot be read"),
    (ZEN4, "0", "x86_64", "float32", "oneDNN turned off (TF_ENABLE_ONEDNN_OPTS=0)"),
    (ZEN4, "False", "x86_64", "float32", "oneDNN turned off"),
    (ZEN4 + ["bf16"], None, "aarch64", "float32", "a aarch64 CPU"),
])
def test_auto_precision_on_a_cpu_is_bfloat16_only_where_it_is_native(flags, onednn, machine,
                                                                      policy, why):
  chosen = distribution.cpu_precision(flags, onednn, machine)
  assert chosen.policy == policy
  assert why in chosen.reason


def test_cpu_flags_are_read_from_the_flags_line_and_missing_ones_are_none(tmp_path):
  cpuinfo = tmp_path / "cpuinfo"
  cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512_bf16\n\nprocessor\t: 1\n"
                     "flags\t\t: fpu\n")
  assert distribution.read_cpu_flags(str(cpuinfo)) == ["fpu", "avx2", "avx512_bf16"]
  cpuinfo.write_text("processor\t: 0\nFeatures\t: fp asimd bf16\n")  # ARM's file.
  assert distribution.read_cpu_flags(str(cpuinfo)) is None
  assert distribution.read_cpu_flags(str(tmp_path / "none")) is None


def test_precision_auto_on_this_cpu_follows_its_flags_and_names_pass_through(monkeypatch):
  strategy = tf.distribute.get_strategy()
  monkeypatch.setattr(distribution, "read_cpu_flags", lambda: ZEN4)
  monkeypatch.delenv("TF_ENABLE_ONEDNN_OPTS", raising=False)
  monkeypatch.setattr(distribution.platform, "machine", lambda: "x86_64")
  assert distribution.resolve_precision("auto", strategy).policy == "mixed_bfloat16"
  monkeypatch.setattr(distribution, "read_cpu_flags", lambda: AVX2)
  assert distribution.resolve_precision("auto", strategy).policy == "float32"
  assert distribution.resolve_precision("mixed_bfloat16", strategy) == (
      "mixed_bfloat16", "asked for by --precision")
  with pytest.raises(UserInputError, match="unknown --precision='half'"):
    distribution.resolve_precision("half", strategy)


def test_steps_per_loop_default_is_50_on_cpu(two_replicas):
  assert distribution.default_steps_per_loop(tf.distribute.get_strategy()) == 50
  assert distribution.default_steps_per_loop(two_replicas) == 50
