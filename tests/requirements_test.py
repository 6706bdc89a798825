"""Tests of launch.requirements: what TPU hosts install comes from setup.py's one list."""

from launch import requirements


def test_tpu_hosts_get_every_requirement_but_tensorflow_and_its_tensorboard():
  arguments = requirements.tpu_pip_arguments()
  names = {requirements._name(a) for a in arguments if not a.startswith(("-", "http"))}
  core = {requirements._name(r) for r in requirements.core_requirements("tuning")}
  assert names == core - {"tensorflow", "tensorboard"} | {"tensorflow-tpu"}


def test_core_requirements_are_setup_pys_and_extras_only_when_asked():
  core = requirements.core_requirements()
  assert "tensorflow<2.22,>=2.21" in core and "absl-py>=2.1" in core
  assert not any("hypertune" in r or "pytest" in r for r in core)
  assert requirements.core_requirements("tuning") == core + ["cloudml-hypertune==0.1.0.dev6"]


def test_wheel_name_is_the_one_pip_wheel_builds():
  assert requirements.wheel_name().startswith("mnist_multitask_trainer-")
  assert requirements.wheel_name().endswith("-py3-none-any.whl")
