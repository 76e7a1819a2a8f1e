"""Training: the shared loop, checkpoints and run directories."""
