"""metaunlearn: make unlearned diffusion models resist relearning (Meta-Unlearning, arXiv 2410.12777).

The Python API (imported on first use, so ``import metaunlearn`` stays light)::

    metaunlearn.unlearn(config, method="esd", meta=True, out="runs/x/esd-meta")  -> UnlearnResult
    metaunlearn.attack(model, config, run_dir="runs/x")                           -> AttackResult (.rows, .to_pandas())
    metaunlearn.evaluate(model, config)                                            -> EvalResult (.metrics)
    metaunlearn.against_reference(run_dir, budget=25)                              -> excess relearning records
    metaunlearn.generate(model, prompts, out)                                      -> an image folder

See :mod:`metaunlearn.api`.
"""

__version__ = "0.1.0"

_API = ("unlearn", "attack", "evaluate", "generate", "toy_model", "toy_reference", "against_reference",
        "AttackResult", "EvalResult")
__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        from metaunlearn import api

        return getattr(api, name)
    raise AttributeError(f"module 'metaunlearn' has no attribute {name!r}")
