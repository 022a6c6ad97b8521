"""The documentation: the site builds in strict mode (no broken link or anchor) and the configuration reference is
the one the config models produce now."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from metaunlearn import docs_reference

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def test_configuration_reference_is_up_to_date():
    checked_in = (ROOT / "docs" / "configuration-reference.md").read_text()
    assert checked_in == docs_reference.render(), (
        f"docs/configuration-reference.md is out of date with the config models; regenerate it: "
        f"{docs_reference.REGENERATE}")


def test_reference_lists_every_key_of_every_section():
    from metaunlearn.experiment.config import ExperimentConfig
    from metaunlearn.meta.config import AttackConfig, MetaConfig
    from metaunlearn.unlearn_config import UnlearnConfig

    page = docs_reference.render()
    for model in (ExperimentConfig, UnlearnConfig, MetaConfig, AttackConfig):
        section = page.split(f"\n## {model.__name__}\n", 1)[1].split("\n## ", 1)[0]
        keys = re.findall(r"^\| `([^`]+)` \|", section, re.M)
        assert keys == list(model.model_fields), model.__name__
    meta = page.split("\n## MetaConfig\n", 1)[1].split("\n## ", 1)[0]
    order = next(line for line in meta.splitlines() if line.startswith("| `order` |"))
    assert "`first`, `second`, `second_fd`, `second_unrolled`" in order  # Literal choices are listed
    assert "| `first` |" in order  # the default


def test_reference_escapes_what_markdown_would_swallow():
    assert docs_reference._prose("runs/<name>/x, a*b and `<kept>`") == "runs/&lt;name&gt;/x, a\\*b and `<kept>`"
    assert docs_reference._cell("a | b") == "a \\| b"


def test_reference_command_writes_the_page(tmp_path):
    out = tmp_path / "reference.md"
    assert docs_reference.main(["--write", str(out)]) == 0
    assert out.read_text() == docs_reference.render()
    assert docs_reference.main(["--bogus"]) == 2


def test_documentation_site_builds_strict(tmp_path):
    pytest.importorskip("mkdocs", reason="mkdocs is in the test extra: pip install -e '.[test]'")
    site = tmp_path / "site"
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (site / "configuration-reference" / "index.html").is_file()
    shutil.rmtree(site)


def test_every_docs_page_is_in_the_nav_and_linked_from_the_readme():
    nav = (ROOT / "mkdocs.yml").read_text()
    readme = README.read_text()
    for page in sorted((ROOT / "docs").glob("*.md")):
        assert f": {page.name}" in nav, f"{page.name} is not in mkdocs.yml's nav"
        if page.name != "index.md":
            assert f"(docs/{page.name})" in readme, f"the README's documentation table lacks docs/{page.name}"


def test_readme_is_short():
    assert len(README.read_text().splitlines()) <= 250


def test_config_descriptions_fit_one_line():
    _, where = docs_reference._walk()
    long = [f"{model.__name__}.{key} ({len(field.description)})" for model in where
            for key, field in model.model_fields.items() if field.description and len(field.description) > 100]
    assert not long, f"descriptions over 100 characters (rationale belongs in docs/): {', '.join(long)}"
