"""The training engine: the Trainer, its Checkpointer and the sweep callback."""
