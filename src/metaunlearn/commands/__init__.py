"""CLI commands, one module per stage; each exposes ``register(app)``."""
