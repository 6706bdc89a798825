"""MNIST multitask trainer: shared encoder, classifier and decoder heads, any tf.distribute strategy."""
