"""The embedded concept world: a 16×16 procedural image world small enough to run the whole pipeline on a CPU.

- ``taxonomy``: the concepts (forget / related / irrelevant), their prompts and shared attributes.
- ``world``: deterministic rendering of concept images.
- ``detector``: a small CNN that names the concept in an image (the toy analogue of NudeNet).
- ``pretrain``: trains the detector and a tiny pixel-space ``StableDiffusionPipeline`` and evaluates both.
- ``cli``: ``pretrain``, ``evaluate`` and ``render`` commands (mounted as ``metaunlearn toy ...``).
"""
