"""Training: DeepSpeed engines on Ray Train workers, data streams, checkpoints."""
