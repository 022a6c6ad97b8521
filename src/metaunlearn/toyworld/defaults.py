"""Defaults of the toy world that the command line shows in ``--help`` (kept free of torch so help stays fast)."""

DEFAULT_STEPS = 20
"""DDIM steps when sampling the toy model."""
DEFAULT_GUIDANCE = 4.0
"""Classifier-free guidance scale when sampling the toy model."""
PRETRAIN_STEPS = 2500
"""Training steps of :class:`~metaunlearn.toyworld.pretrain.ToyModelConfig` unless given."""
