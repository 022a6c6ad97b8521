"""Defaults of the toy world that the command line shows in ``--help`` (kept free of torch so help stays fast)."""

DEFAULT_STEPS = 20
"""DDIM steps when sampling the toy model."""
DEFAULT_GUIDANCE = 4.0
"""Classifier-free guidance scale when sampling the toy model."""
PRETRAIN_STEPS = 3500
"""Training steps of :class:`~metaunlearn.toyworld.pretrain.ToyModelConfig` unless given (the shipped model's)."""
PRETRAIN_THREADS = 1
"""torch threads of ``toy pretrain``: the trained weights depend on the thread count; the shipped assets used 1."""
DEFAULT_PRETRAIN_OUT = "toy_assets"
"""Where ``toy pretrain`` writes unless told (in the working directory; never the shipped assets by default)."""
