"""The packaged demo config validates and plans every stage (the full run itself is `make demo`)."""

from __future__ import annotations


def test_demo_plan_lists_every_stage(run_cli, tmp_path, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")  # one table row per line
    result = run_cli("demo", "--dry-run", "--run-dir", tmp_path / "demo")
    assert result.exit_code == 0, result.stderr
    text = " ".join(result.stdout.split())
    for method in ("esd", "sdd", "uce", "rece"):
        for variant in ("plain", "meta"):
            assert f"unlearn {method}-{variant}" in text
            assert f"attack {method}-{variant}" in text
    assert "report" in text
    assert not (tmp_path / "demo" / "models").exists()  # a dry run builds nothing


def test_demo_rejects_zero_seeds(run_cli):
    result = run_cli("demo", "--seeds", "0", "--dry-run")
    assert result.exit_code == 2
    assert result.stderr.strip().startswith("error:") and len(result.stderr.strip().splitlines()) == 1
