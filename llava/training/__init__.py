"""Stage-1 / stage-2 training on Ray Train with DeepSpeed (see trainer.py for the entry point)."""
