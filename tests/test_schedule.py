"""The scheduling layer: one stage graph run by the local backends and by Ray gives the same results; a failing task
is retried once and then reported with its log."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from rich.console import Console

from metaunlearn.errors import UserError
from metaunlearn.experiment.schedule import log_path, run_graph


# ---- the scheduler itself, on a stand-in backend ---------------------------------------------------------------------
@dataclass(frozen=True)
class _Task:
    stage: str
    after: tuple[str, ...] = ()


class _Run:
    def __init__(self, path: Path) -> None:
        self.path = path


class _Experiment:
    def __init__(self, path: Path, done=()) -> None:
        self.run = _Run(path)
        self.console = Console(file=open(path / "console.txt", "w"), width=200)  # noqa: SIM115
        self.done = set(done)

    def is_done(self, task) -> bool:
        return task.stage in self.done


class _Backend:
    """Runs tasks on the spot; ``fail`` maps a stage to how many of its attempts raise."""

    capacity = 2
    shows_progress = False

    def __init__(self, run_dir: Path, fail: dict[str, int], error=RuntimeError) -> None:
        self.run_dir, self.fail, self.error = run_dir, dict(fail), error
        self.calls: list[tuple[str, int]] = []
        self.outcomes: dict[int, BaseException | None] = {}
        self.closed = None

    def submit(self, task, attempt):
        self.calls.append((task.stage, attempt))
        log = log_path(self.run_dir, task.stage)
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("a") as f:
            f.write(f"attempt {attempt}\n")
        failing = self.fail.get(task.stage, 0) >= attempt
        self.outcomes[len(self.outcomes)] = self.error(f"{task.stage} broke") if failing else None
        return len(self.outcomes) - 1

    def wait(self, handles):
        return [(h, self.outcomes[h]) for h in handles]

    def close(self, cancel):
        self.closed = cancel


def test_graph_order_skip_retry_once_and_report_with_log(tmp_path):
    tasks = [_Task("attack-b", ("unlearn-b",)), _Task("unlearn-a"), _Task("unlearn-b"), _Task("attack-a", ("unlearn-a",))]
    experiment = _Experiment(tmp_path, done={"unlearn-a"})
    backend = _Backend(tmp_path, fail={"unlearn-b": 1})  # fails once, then works
    finished = []
    run_graph(experiment, tasks, lambda: backend, progress=False, on_done=lambda t: finished.append(t.stage))
    assert ("unlearn-a", 1) not in backend.calls  # done by its marker: skipped
    assert backend.calls.count(("unlearn-b", 1)) == 1 and backend.calls.count(("unlearn-b", 2)) == 1
    assert finished.index("unlearn-b") < finished.index("attack-b")  # an attack waits for its model
    assert set(finished) == {"attack-a", "unlearn-b", "attack-b"} and backend.closed is False

    broken = _Backend(tmp_path, fail={"attack-a": 2})  # fails twice: reported with its log
    with pytest.raises(UserError) as info:
        run_graph(_Experiment(tmp_path), [_Task("attack-a")], lambda: broken, progress=False)
    assert broken.calls == [("attack-a", 1), ("attack-a", 2)] and broken.closed is True
    message = str(info.value)
    assert "attack-a failed twice" in message and "attack-a broke" in message
    assert message.endswith(f"log: {log_path(tmp_path, 'attack-a')}")

    bad_input = _Backend(tmp_path, fail={"attack-a": 2}, error=UserError)  # bad input is not retried
    with pytest.raises(UserError):
        run_graph(_Experiment(tmp_path), [_Task("attack-a")], lambda: bad_input, progress=False)
    assert bad_input.calls == [("attack-a", 1)]

    with pytest.raises(UserError, match="needed but not part of this run"):
        run_graph(_Experiment(tmp_path), [_Task("attack-c", ("unlearn-c",))], lambda: _Backend(tmp_path, {}), progress=False)


# ---- the same grid on the local backend and on Ray -------------------------------------------------------------------
def _grid(tiny_sd_dir: Path, tmp_path: Path) -> Path:
    from test_configs_run import CONFIGS, _shrink

    from metaunlearn.testing.tiny_pipelines import save_tiny_clip

    cfg = _shrink(yaml.safe_load((CONFIGS / "sd14_nudity.yaml").read_text()), tiny_sd_dir, tmp_path,
                  save_tiny_clip(tmp_path / "clip"))
    cfg["grid"]["methods"] = [m for m in cfg["grid"]["methods"] if m["name"] == "uce"]
    cfg["grid"].update(seeds=[0], include_base=False)
    cfg["attack"]["modes"] = ["full"]
    cfg["attack"]["sets"] = {k: v for k, v in cfg["attack"]["sets"].items() if k == "hrm-m"}
    cfg["attack_data"] = {k: v for k, v in cfg["attack_data"].items() if k == "hrm-m"}
    cfg["eval"]["quality"] = {}
    cfg.pop("run_dir")
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _rows(run: Path) -> list[dict]:
    rows = json.loads((run / "results.json").read_text())
    rows = rows["rows"] if isinstance(rows, dict) else rows
    key = lambda r: tuple(str(r[k]) for k in ("model", "attack_set", "mode", "lr", "seed", "step"))  # noqa: E731
    return sorted(rows, key=key)


def test_ray_backend_gives_the_local_backends_results(tiny_sd_dir, tmp_path, run_cli, monkeypatch):
    """``metaunlearn run CONFIG --ray --jobs 2`` (a local Ray instance, two 1-CPU workers) writes the result rows of
    ``metaunlearn run CONFIG --jobs 2`` (two local worker processes); a second run skips every finished stage."""
    pytest.importorskip("ray")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # Ray's 1-CPU workers run with it; the local workers inherit it
    config = _grid(tiny_sd_dir, tmp_path)
    run = tmp_path / "run"
    local = run_cli("run", config, "-q", "--jobs", "2", "-o", run)
    assert local.exit_code == 0, local.stderr
    expected = _rows(run)
    # the grid's stages again, on Ray (data and attack sets are kept: only the scheduled stages differ)
    for folder in ("models", "attacks", "grids", "logs"):
        shutil.rmtree(run / folder, ignore_errors=True)
    for marker in (run / "stages").glob("*.json"):
        if marker.name.startswith(("unlearn-", "attack-uce")):
            marker.unlink()
    (run / "results.json").unlink()
    on_ray = run_cli("run", config, "-q", "--ray", "--jobs", "2", "-o", run)
    assert on_ray.exit_code == 0, on_ray.stderr
    assert "Ray tasks of 1 CPU / 0 GPU each on 2 CPUs" in on_ray.stdout
    got = _rows(run)
    assert len(got) == len(expected) > 0 and {r["model"] for r in got} == {"uce-plain", "uce-meta"}
    for x, y in zip(expected, got):
        assert set(x) == set(y)
        for k in x:
            if isinstance(x[k], float):
                assert y[k] == pytest.approx(x[k], rel=1e-6, abs=1e-9), k
            else:
                assert x[k] == y[k], k
    for stage in ("unlearn-uce-meta", "attack-uce-meta"):
        assert "attempt 1 of 2" in log_path(run, stage).read_text()
    again = run_cli("run", config, "-q", "--ray", "--jobs", "2", "-o", run)
    assert again.exit_code == 0, again.stderr
    assert "skip attack-uce-meta (done)" in again.stdout and "start" not in again.stdout


def test_run_under_a_launcher_is_refused(tiny_sd_dir, tmp_path, run_cli, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    result = run_cli("run", _grid(tiny_sd_dir, tmp_path), "-q", "-o", tmp_path / "run")
    assert result.exit_code == 2 and "start it as one process" in result.stderr
    assert not (tmp_path / "run" / "stages").exists()
