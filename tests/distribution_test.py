"""Tests of trainer.distribution: strategy names, `auto`, precision, and their errors."""

import json

import pytest
import tensorflow as tf

from tests import helpers
from trainer import distribution
from trainer.config import UserInputError


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


def test_a_task_index_past_the_cluster_ends_the_job_with_one_line(tmp_path):
  cluster = {"worker": ["localhost:1", "localhost:2"]}
  result = helpers.run_trainer(
      "--dataset=mnist_sample", f"--model_dir={tmp_path}/run", "--epochs=1", timeout=120,
      env={"TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": 5}})})
  helpers.assert_one_error_line(
      result, "$TF_CONFIG's task is worker index 5, but its cluster has 2 workers (indices 0 to "
      "1); set each host's task.index to its place in cluster.worker, or unset TF_CONFIG to train "
      "on one host", whole=True)
  assert not (tmp_path / "run").exists()


def test_precision_auto_is_float32_on_cpu_and_names_pass_through():
  strategy = tf.distribute.get_strategy()
  assert distribution.resolve_precision("auto", strategy) == "float32"
  assert distribution.resolve_precision("mixed_bfloat16", strategy) == "mixed_bfloat16"
  with pytest.raises(UserInputError, match="unknown --precision='half'"):
    distribution.resolve_precision("half", strategy)


def test_steps_per_loop_default_is_50_on_cpu(two_replicas):
  assert distribution.default_steps_per_loop(tf.distribute.get_strategy()) == 50
  assert distribution.default_steps_per_loop(two_replicas) == 50
