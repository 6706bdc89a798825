"""The multitask problem: one encoder, a classifier and a decoder, trained on one weighted loss.

    model    the shared encoder and the two heads
    losses   per-example losses, labelled-only classification, task weighting
    problem  the task the job trains (`make_task`): its step, metrics, evaluation and export
    export   the SavedModel and Keras file, and reading them back
    report   the images and page a person reads after training

The heads' names are here: the model's outputs, the pipeline's label dict and the loss weights
are keyed by them. Importing this package loads no TensorFlow.
"""

CLASSIFIER = "classifier"
DECODER = "decoder"
OUTPUT_NAMES = (CLASSIFIER, DECODER)
