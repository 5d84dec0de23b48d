"""What a run keeps: its resumable state, the checkpoint schema, checkpoint storage (files,
index, sharded tensors), the lock on model_dir and warm start."""
