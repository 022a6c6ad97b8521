"""Shared fixtures: tiny SD-1.x / SDXL model folders (built once per session) and an in-process CLI runner."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import shutil  # noqa: E402
import sys  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def _private_digest_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Content digests of large files are cached per user; tests keep theirs apart."""
    os.environ["METAUNLEARN_CACHE"] = str(tmp_path_factory.mktemp("digest-cache"))


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random SD-1.x pipeline folder (16x16 images, 8x8 latents). Shared: copy it before modifying it."""
    from metaunlearn.testing.tiny_pipelines import save_tiny_pipeline

    return save_tiny_pipeline("sd", tmp_path_factory.mktemp("models") / "tiny-sd")


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random SDXL pipeline folder (two text encoders). Shared: copy it before modifying it."""
    from metaunlearn.testing.tiny_pipelines import save_tiny_pipeline

    return save_tiny_pipeline("sdxl", tmp_path_factory.mktemp("models") / "tiny-sdxl")


@pytest.fixture
def tiny_sd_copy(tiny_sd_dir: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny SD folder that a test may damage."""
    return Path(shutil.copytree(tiny_sd_dir, tmp_path / "model-copy"))


@dataclass
class CliResult:
    exit_code: int
    stdout: str
    stderr: str


@pytest.fixture
def run_cli(capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch):
    """Run ``metaunlearn <args>`` in this process through the real entry point (``metaunlearn.cli.main``)."""
    from metaunlearn.cli import main

    def run(*args: str | os.PathLike) -> CliResult:
        capsys.readouterr()
        monkeypatch.setattr(sys, "argv", ["metaunlearn", *map(str, args)])
        code = 0
        try:
            main()
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        out, err = capsys.readouterr()
        return CliResult(code, out, err)

    return run
