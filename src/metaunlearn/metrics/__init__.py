"""Evaluation: concept detectors (toy, NudeNet, CLIP zero-shot), quality (Fréchet distance, CLIP score)."""
