"""Training: configs, optimizers, schedules, checkpoints and reference models."""
