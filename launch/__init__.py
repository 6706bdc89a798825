"""Launchers that take the trainer to Vertex AI and Cloud TPU VMs."""
