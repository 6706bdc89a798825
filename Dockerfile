# The trainer's container image for Vertex AI custom jobs: ENTRYPOINT python -m trainer.task.
#
#   CPU: docker build -t IMAGE .
#   GPU: docker build --build-arg TENSORFLOW='tensorflow[and-cuda]==2.21.0' -t IMAGE .
#   TPU: docker build --build-arg TENSORFLOW=tpu -t IMAGE .
#
# TENSORFLOW is the TensorFlow to install: a pip requirement within setup.py's pin, or `tpu`
# for TensorFlow's TPU build (tensorflow-tpu 2.20.0 with its libtpu, see launch/requirements.py),
# under which the package goes in without its own TensorFlow.
FROM python:3.11.14-slim-bookworm

ARG TENSORFLOW="tensorflow==2.21.0"

# `docker run --user "$(id -u)"` runs the trainer as the host's user, who can write to a mounted
# runs/ directory but has no home in the image: HOME is set, and open to any user as /tmp is
# (chmod 1777 below), for the files Keras and TFDS keep there.
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HOME=/home/trainer

WORKDIR /opt/trainer
COPY setup.py README.md ./
COPY trainer ./trainer
COPY launch ./launch

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# DL3013 reads ".[tuning]" as an unpinned package: it is this package, pinned by setup.py.
# hadolint ignore=DL3013
RUN if [ "${TENSORFLOW}" = "tpu" ]; then \
      pip install --no-cache-dir --no-deps . \
      && python -m launch.requirements tpu | xargs pip install --no-cache-dir; \
    else \
      pip install --no-cache-dir "${TENSORFLOW}" ".[tuning]"; \
    fi \
    && useradd --create-home --uid 1000 trainer \
    && chmod 1777 /home/trainer

# Not root; numeric, so that any host can resolve it.
USER 1000
ENTRYPOINT ["python", "-m", "trainer.task"]
