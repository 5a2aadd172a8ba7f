"""The training engine: the Trainer, its callbacks, optimizers, schedules, checkpoints and run folders."""
