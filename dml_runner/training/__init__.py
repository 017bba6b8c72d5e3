"""The training engine: the Trainer, its Checkpointer, data parallelism and the sweep callback."""
