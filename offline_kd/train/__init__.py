"""Training students from a store: student models, the store reader, the loss, the DeepSpeed loop and its state, checkpoints, metrics and held-out evaluation."""
