"""Training: the loss, the loop, LoRA, checkpoints."""
