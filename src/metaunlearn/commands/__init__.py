"""CLI commands, one module per stage; each exposes ``register(app)``."""


def invocation() -> str:
    """This command line as a user would type it (``metaunlearn demo --seeds 3``), for a run's provenance."""
    import shlex
    import sys

    return " ".join(["metaunlearn", *(shlex.quote(a) for a in sys.argv[1:])])
