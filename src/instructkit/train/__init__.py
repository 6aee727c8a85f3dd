"""Training: the one loop (fit.py) and its objectives (loop.py: SFT, dpo.py: DPO), the losses, LoRA,
checkpoints, configs and metrics loggers."""
