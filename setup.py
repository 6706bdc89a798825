"""The MNIST multitask trainer: a shared encoder with classifier and decoder heads."""

import setuptools

# TensorFlow and Keras are pinned to the minor release the loop is tested on: Keras 3's
# distribution behaviour changes between releases (model.fit broke under multi-worker in 3.15).
INSTALL_REQUIRES = [
    "tensorflow>=2.21,<2.22",
    "keras>=3.15,<3.16",
    "tensorflow-datasets>=4.9,<5",
    "tensorboard>=2.21,<2.22",
    "numpy>=1.26",
    "scikit-learn>=1.3",
    "absl-py>=2.1",
]

setuptools.setup(
    name="mnist-multitask-trainer",
    version="0.1.0",
    description="Distributed multitask (classifier + autoencoder) training on MNIST with TensorFlow.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=setuptools.find_packages(include=["trainer", "trainer.*"]),
    package_data={"trainer": ["assets/*.npz", "assets/*.md"]},
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require={
        "test": ["pytest>=8", "portpicker>=1.6"],
    },
    license="Apache-2.0 (code); bundled MNIST sample: CC BY-SA 3.0",
)
