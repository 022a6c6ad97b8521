"""Relearning attacks: full and LoRA finetuning of a released model, evaluated at snapshot steps; sweeps."""
