"""Concept data: image folders with captions, generation from a backbone, and the latent/conditioning cache."""
