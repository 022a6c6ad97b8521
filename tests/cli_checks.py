"""Checks on what a CLI run left behind, shared by the tests of bad input and of trustworthy results."""

from __future__ import annotations

from pathlib import Path


def assert_user_error(result, *fragments: str) -> str:
    """Exit 2, exactly one ``error:`` line on stderr naming ``fragments``, nothing that looks like a traceback."""
    assert result.exit_code == 2, (result.exit_code, result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file below ``folder`` (relative path -> bytes), to show a failed command changed nothing."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
