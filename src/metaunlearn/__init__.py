"""metaunlearn: make unlearned diffusion models resist relearning (Meta-Unlearning, arXiv 2410.12777)."""

__version__ = "0.1.0"
