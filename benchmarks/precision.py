"""The precision a benchmark builds the package's task under (issue 39).

`benchmarks.measure`, `benchmarks.profile_step` and `benchmarks.checkpoint_cost` take
--precision (auto, float32, mixed_bfloat16, mixed_float16; default auto, as the job's) and
build the task under the policy it resolves to, set once through `train.configure_process`
before anything is built, as the job does. They record the policy and why it was chosen.

No TensorFlow is imported here until `configure` is called (benchmarks.measure's start-up
times stay whole).
"""

from trainer.config import PRECISIONS

FLAG_HELP = ("The Keras dtype policy the task is built under, one of " + ", ".join(PRECISIONS)
             + "; auto resolves as the job resolves it (trainer.job.distribution), and the "
             "resolved policy and its reason are recorded.")

# Each policy's compute dtype: the kernels' precision, whose measured limit its share is of.
COMPUTE_DTYPES = {"float32": "float32", "mixed_bfloat16": "bfloat16",
                  "mixed_float16": "float16"}


def configure(config, strategy):
  """`train.configure_process(config, strategy)`: seeds and the Keras dtype policy for
  `config.precision`, set once, before any model is built; its trainer.job.distribution.Precision
  (policy, reason)."""
  from trainer.job import train
  return train.configure_process(config, strategy)


def compute_dtype(policy: str) -> str:
  """The dtype `policy`'s convolutions and dense layers compute in."""
  return COMPUTE_DTYPES[policy]
