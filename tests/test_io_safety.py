"""I/O safety: full disks during saves, output permissions, what --overwrite may delete, failed overwrites, locks."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cli_checks import assert_user_error, snapshot

PROMPTS = ["a photo of a nude person", "naked body"]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}


def _limited(limit: int):
    """A ``preexec_fn`` that caps every file the process writes at ``limit`` bytes (as a full disk would refuse)."""

    def apply() -> None:
        import resource
        import signal

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def cli(*args, limit: int | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """``metaunlearn ARGS`` in a fresh process (under a file-size limit when ``limit`` is given)."""
    return subprocess.run([sys.executable, "-m", "metaunlearn.cli", *map(str, args)], capture_output=True, text=True,
                          env=_env(), timeout=timeout, preexec_fn=_limited(limit) if limit else None)


def one_error_line(proc: subprocess.CompletedProcess, *fragments: str) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr + proc.stdout
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def uce_config(path: Path, model: Path, prompts=PROMPTS, **extra) -> Path:
    path.write_text(yaml.safe_dump({"model": str(model), "method": {"name": "uce"}, "forget_prompts": list(prompts),
                                    "device": "cpu", "steps": 1, **extra}))
    return path


# ---- 1. a full disk while a model or a cache is saved -----------------------------------------------------------------
def test_a_file_size_limit_during_a_model_save_is_one_line_and_keeps_the_old_model(run_cli, tiny_sd_dir, tmp_path):
    out = tmp_path / "out"
    assert run_cli("unlearn", uce_config(tmp_path / "a.yaml", tiny_sd_dir), "-o", out, "-q").exit_code == 0
    model = snapshot(out / "model")
    # the UNet's weights (about 290 kB) pass no 200 kB limit; every record and config is far smaller
    proc = cli("unlearn", uce_config(tmp_path / "b.yaml", tiny_sd_dir, PROMPTS[:1]), "-o", out, "-q", "--overwrite",
               limit=200_000)
    one_error_line(proc, "File too large", str(out), "earlier outputs are unchanged")
    assert snapshot(out / "model") == model
    # no temporary folder left behind (.previous holds the replaced settings' records until a redo succeeds)
    assert not [p for p in out.parent.rglob(".*") if p.name not in ("stages", ".previous")]
    proc = cli("unlearn", tmp_path / "a.yaml", "-o", out, "-q")  # the original settings: still the folder's
    assert proc.returncode == 0 and "already done" in proc.stdout, proc.stderr


def test_a_file_size_limit_during_a_cache_save_is_one_line(tiny_sd_dir, tmp_path):
    out = tmp_path / "data" / "set"
    # 16x16 PNGs of a few hundred bytes and small records pass; the cache of 8 images (latents + text states) does not
    proc = cli("generate", tiny_sd_dir, "-p", PROMPTS[0], "-n", "8", "--steps", "1", "-o", out, "--cache", "-q",
               "--cache-dir", tmp_path / "cache", limit=6_000)
    one_error_line(proc, "File too large", str(tmp_path / "cache"), "earlier outputs are unchanged")
    assert not list((tmp_path / "cache").glob("*.safetensors")) and not list((tmp_path / "cache").glob(".*"))


# ---- 4. permissions follow the umask ------------------------------------------------------------------------------------
@pytest.mark.parametrize("mask", [0o022, 0o002])
def test_saved_models_and_checkpoints_get_the_umasks_permissions(tiny_sd_dir, tmp_path, mask):
    from metaunlearn.unlearn import UnlearnConfig, run_unlearn

    old = os.umask(mask)
    try:
        cfg = {"model": str(tiny_sd_dir), "out": str(tmp_path / "out"), "method": {"name": "esd", "params": {
            "ddim_steps": 2}}, "forget_prompts": PROMPTS, "steps": 1, "checkpoint_every": 1, "device": "cpu"}
        run_unlearn(UnlearnConfig.model_validate(cfg), progress=False)
    finally:
        os.umask(old)
    weights = list((tmp_path / "out").rglob("*.safetensors"))
    assert any("model" in p.parts for p in weights) and any("checkpoint" in p.parts for p in weights)
    for path in (tmp_path / "out").rglob("*"):
        want = (0o777 if path.is_dir() else 0o666) & ~mask
        assert stat.S_IMODE(path.stat().st_mode) == want, (path, oct(path.stat().st_mode))


def test_a_cache_file_gets_the_umasks_permissions(tiny_sd_dir, tmp_path):
    from metaunlearn.data.cache import CachedSet

    import torch

    old = os.umask(0o002)
    try:
        CachedSet(torch.zeros(1, 4, 8, 8), {"text": torch.zeros(1, 3)}, ["x"]).save(tmp_path / "c.safetensors")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "c.safetensors").stat().st_mode) == 0o664


# ---- 2. --overwrite removes only what metaunlearn made ------------------------------------------------------------------
def _users_folder(path: Path) -> dict[str, bytes]:
    (path / "model").mkdir(parents=True)
    (path / "notes.txt").write_text("mine")
    (path / "model" / "weights.bin").write_bytes(b"mine too")
    (path / "train_log.jsonl").write_text("{}\n")
    return snapshot(path)


def test_generate_overwrite_refuses_a_folder_metaunlearn_did_not_make(run_cli, tiny_sd_dir, tmp_path):
    out = tmp_path / "photos"
    mine = _users_folder(out)
    args = ("generate", tiny_sd_dir, "-p", PROMPTS[0], "--steps", "1", "-o", out, "-q")
    assert_user_error(run_cli(*args, "--overwrite"), "did not make", "notes.txt")
    assert snapshot(out) == mine
    made = tmp_path / "made"
    assert run_cli("generate", tiny_sd_dir, "-p", PROMPTS[0], "--steps", "1", "-o", made, "-q").exit_code == 0
    res = run_cli("generate", tiny_sd_dir, "-p", PROMPTS[1], "--steps", "1", "-o", made, "-q", "--overwrite")
    assert res.exit_code == 0, res.stderr  # its own folder is replaced
    assert PROMPTS[1] in (made / "metadata.jsonl").read_text()


def test_unlearn_overwrite_refuses_an_out_folder_metaunlearn_did_not_make(run_cli, tiny_sd_dir, tmp_path):
    out = tmp_path / "out"
    mine = _users_folder(out)
    res = run_cli("unlearn", uce_config(tmp_path / "a.yaml", tiny_sd_dir), "-o", out, "-q", "--overwrite")
    assert_user_error(res, "did not make", "--overwrite replaces only")
    assert snapshot(out) == mine


def test_stage_overwrite_keeps_outputs_without_a_record(tmp_path):
    from metaunlearn.errors import UserError
    from metaunlearn.runs import RunDir

    run = RunDir(tmp_path / "run")
    mine = run.path / "attacks" / "m" / "set" / "full_lr0.0001_s0.jsonl"
    mine.parent.mkdir(parents=True)
    mine.write_text("mine\n")
    with pytest.raises(UserError, match="did not make"):
        run.begin("attack/m/set", {"a": 1}, overwrite=True, outputs=[mine])
    assert mine.read_text() == "mine\n" and run.record("attack/m/set") is None
    run.mark_done("attack/m/set", {"a": 1})
    assert run.begin("attack/m/set", {"a": 2}, overwrite=True, outputs=[mine]).state == "changed"  # its own: redone


def test_report_refuses_to_replace_files_no_report_wrote(run_cli, tmp_path):
    run = tmp_path / "run"
    rows = [{"model": "m", "method": "esd", "variant": "plain", "attack_set": "hrm-m", "mode": "full", "lr": 1e-4,
             "seed": 0, "step": 0, "grid": None, "forget_rate": 0.5}]
    (run / "attacks" / "m" / "hrm-m").mkdir(parents=True)
    (run / "attacks" / "m" / "hrm-m" / "full_lr0.0001_s0.jsonl").write_text(json.dumps(rows[0]) + "\n")
    out = tmp_path / "site"
    out.mkdir()
    (out / "report.html").write_text("my page")
    assert_user_error(run_cli("report", run, "-o", out), "no metaunlearn report wrote")
    assert (out / "report.html").read_text() == "my page"
    assert run_cli("report", run).exit_code == 0
    assert run_cli("report", run).exit_code == 0  # its own report is replaced


# ---- 3. a failed --overwrite keeps the old settings' outputs usable ----------------------------------------------------
def test_a_failed_overwrite_leaves_the_old_settings_accepted(run_cli, tiny_sd_dir, tmp_path, monkeypatch):
    out = tmp_path / "out"
    cfg = {"model": str(tiny_sd_dir), "method": {"name": "esd", "params": {"ddim_steps": 2}}, "forget_prompts": PROMPTS,
           "steps": 2, "checkpoint_every": 1, "device": "cpu"}
    path = tmp_path / "unlearn.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert run_cli("unlearn", path, "-o", out, "-q").exit_code == 0
    good = snapshot(out)

    from metaunlearn.backbones.base import Backbone

    def full_disk(self, out_dir, records=None):
        raise OSError(28, "No space left on device", str(out_dir))

    monkeypatch.setattr(Backbone, "save", full_disk)  # the other settings train, then their model cannot be saved
    path.write_text(yaml.safe_dump({**cfg, "seed": 1}))
    assert_user_error(run_cli("unlearn", path, "-o", out, "-q", "--overwrite"), "No space left")
    monkeypatch.undo()
    assert snapshot(out / "model") == {k[len("model/"):]: v for k, v in good.items() if k.startswith("model/")}

    path.write_text(yaml.safe_dump(cfg))  # the original settings again: the old model is theirs, nothing redone
    res = run_cli("unlearn", path, "-o", out, "-q")
    assert res.exit_code == 0 and "already done" in res.stdout, res.stderr
    assert snapshot(out) == good  # their log, checkpoint, config and record are back
    path.write_text(yaml.safe_dump({**cfg, "seed": 1}))
    assert_user_error(run_cli("unlearn", path, "-o", out, "-q"), "config.seed", "--overwrite")
    assert run_cli("unlearn", path, "-o", out, "-q", "--overwrite").exit_code == 0
    assert json.loads((out / "config.json").read_text())["seed"] == 1 and not (out / ".previous").exists()
    assert not (out / "stages" / "unlearn.previous.json").exists()


def test_a_failed_overwrite_is_resumed_by_its_own_settings(tmp_path):
    from metaunlearn.runs import RunDir

    run = RunDir(tmp_path / "run")
    run.begin("s", {"a": 1})
    run.mark_done("s", {"a": 1})
    assert run.begin("s", {"a": 2}, overwrite=True).state == "changed"  # then the work fails
    assert run.begin("s", {"a": 2}).state == "partial"  # its own settings resume without --overwrite
    assert run.status("s", {"a": 1}).state == "done"  # the replaced settings are still the folder's
    assert run.begin("s", {"a": 1}).state == "done" and run.is_done("s", {"a": 1})


# ---- 6. generate resumes image by image --------------------------------------------------------------------------------
def _wait_for(predicate, proc: subprocess.Popen, what: str) -> None:
    import time

    deadline = time.monotonic() + 600  # a bound on a stuck process, not a timing assertion
    while not predicate():
        assert proc.poll() is None, f"the process ended before {what}: {proc.stderr.read() if proc.stderr else ''}"
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def test_generate_killed_part_way_resumes_with_the_same_images(run_cli, tiny_sd_dir, tmp_path, monkeypatch):
    import signal

    from metaunlearn.backbones.base import Backbone

    args = [tiny_sd_dir, "-p", PROMPTS[0], "-p", PROMPTS[1], "-n", "12", "--steps", "2", "--batch-size", "2",
            "--seed", "5", "-q"]
    out = tmp_path / "data" / "set"
    proc = subprocess.Popen([sys.executable, "-m", "metaunlearn.cli", "generate", *map(str, args), "-o", str(out)],
                            env={**_env(), "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    temp = lambda: list(out.parent.glob(".set.tmp-*"))  # noqa: E731
    _wait_for(lambda: any(len(list(t.glob("*.png"))) >= 4 for t in temp()), proc, "4 images were written")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    [left] = temp()
    kept = {p.name: p.read_bytes() for p in left.glob("*.png")}
    assert 4 <= len(kept) < 24 and not out.exists()

    real, sampled = Backbone.sample, []

    def counting(self, prompts, **kwargs):
        sampled.extend(prompts)
        return real(self, prompts, **kwargs)

    monkeypatch.setattr(Backbone, "sample", counting)
    assert run_cli("generate", *args, "-o", out).exit_code == 0
    assert len(sampled) == 24 - len(kept)  # only the missing images are sampled again
    assert not temp() and not [p for p in out.rglob(".*") if p.name != "stages"]
    assert {n: b for n, b in ((p.name, p.read_bytes()) for p in out.glob("*.png")) if n in kept} == kept

    whole = tmp_path / "whole" / "set"
    assert run_cli("generate", *args, "-o", whole).exit_code == 0  # an uninterrupted run: the same images
    assert snapshot(out).keys() == snapshot(whole).keys()
    for name in ("metadata.jsonl", *(f"{i:06d}.png" for i in range(24))):
        assert (out / name).read_bytes() == (whole / name).read_bytes(), name


# ---- 5. one process at a time writes a folder ----------------------------------------------------------------------------
HOLDER = """
import sys
from pathlib import Path
from metaunlearn.locking import folder_lock
with folder_lock(sys.argv[1]):
    print("locked", flush=True)
    if sys.stdin.readline().strip() == "release":
        Path(sys.argv[2]).write_text("released")
"""


class Holder:
    """Another process holding the lock of ``folder`` until it is told to release it or is killed."""

    def __init__(self, folder: Path, released: Path) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder), str(released)], env=_env(),
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline().strip() == "locked"
        self.pid = self.proc.pid

    def release(self) -> None:
        self.proc.stdin.write("release\n")
        self.proc.stdin.flush()
        assert self.proc.wait(timeout=600) == 0

    def kill(self) -> None:
        import signal

        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()


def test_a_locked_unlearn_folder_is_refused_naming_the_holder_and_a_killed_holder_releases_it(
        run_cli, tiny_sd_dir, tmp_path):
    out = tmp_path / "out"
    config = uce_config(tmp_path / "a.yaml", tiny_sd_dir)
    holder = Holder(out, tmp_path / "released")
    try:
        assert_user_error(run_cli("unlearn", config, "-o", out, "-q"), f"pid {holder.pid}", "--wait", str(out))
        assert not out.exists()
    finally:
        holder.kill()  # SIGKILL: the kernel releases the lock
    res = run_cli("unlearn", config, "-o", out, "-q")
    assert res.exit_code == 0, res.stderr
    assert (out / "model" / "model_index.json").is_file() and not list(tmp_path.glob(".*.lock"))


def test_wait_queues_behind_the_holder(tiny_sd_dir, tmp_path):
    out = tmp_path / "set"
    released = tmp_path / "released"
    holder = Holder(out, released)
    try:
        waiter = subprocess.Popen([sys.executable, "-m", "metaunlearn.cli", "generate", str(tiny_sd_dir), "-p",
                                   PROMPTS[0], "--steps", "1", "-o", str(out), "-q", "--wait"], env=_env(),
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        refused = cli("generate", tiny_sd_dir, "-p", PROMPTS[0], "--steps", "1", "-o", out, "-q")
        one_error_line(refused, f"pid {holder.pid}")
        assert waiter.poll() is None and not out.exists()
        holder.release()
    finally:
        holder.kill()
    _, err = waiter.communicate(timeout=600)
    assert waiter.returncode == 0, err
    assert released.is_file() and released.stat().st_mtime_ns <= (out / "metadata.jsonl").stat().st_mtime_ns
    assert not list(tmp_path.glob(".*.lock"))


def test_a_locked_run_folder_refuses_attack_run_and_demo(run_cli, tiny_sd_dir, tmp_path):
    from metaunlearn.data.imagefolder import write_imagefolder

    import torch

    run = tmp_path / "run"
    write_imagefolder(tmp_path / "attack-data", torch.rand(2, 3, 16, 16), PROMPTS)
    config = tmp_path / "attack.yaml"
    config.write_text(yaml.safe_dump({"attack": {"sets": {"hrm": {"data": "attack-data"}}, "lrs": [1e-3],
                                                 "snapshot_steps": [0, 1], "batch_size": 2}}))
    holder = Holder(run, tmp_path / "released")
    try:
        assert_user_error(run_cli("attack", tiny_sd_dir, config, "-o", run, "-q"), "run folder", f"pid {holder.pid}")
        assert not run.exists()
        assert_user_error(run_cli("demo", "--quick", "-o", run, "-q"), "run folder", f"pid {holder.pid}")
        assert not any(run.iterdir())  # the demo names its (empty) folder before it runs
    finally:
        holder.kill()


def test_a_runs_worker_processes_are_covered_by_its_lock(run_cli, tiny_sd_dir, tmp_path):
    from test_schedule import _grid

    config = _grid(tiny_sd_dir, tmp_path)
    run = tmp_path / "run"
    holder = Holder(run, tmp_path / "released")
    try:
        assert_user_error(run_cli("run", config, "-q", "--jobs", "2", "-o", run), f"pid {holder.pid}")
    finally:
        holder.kill()
    res = run_cli("run", config, "-q", "--jobs", "2", "-o", run)  # two worker processes under the run's lock
    assert res.exit_code == 0, res.stderr
    assert (run / "results.json").is_file() and not list(tmp_path.glob(".*.lock"))
    for stage in ("unlearn-uce-meta", "attack-uce-meta"):
        assert json.loads((run / "stages" / f"{stage}.json").read_text())["state"] == "done"


def test_a_redo_killed_between_its_model_and_its_record_is_not_taken_for_the_old_model(
        run_cli, tiny_sd_dir, tmp_path, monkeypatch):
    from metaunlearn.runs import RunDir

    out = tmp_path / "out"
    path = uce_config(tmp_path / "a.yaml", tiny_sd_dir)
    assert run_cli("unlearn", path, "-o", out, "-q").exit_code == 0
    first = json.loads((out / "model" / "unlearn_config.json").read_text())["settings_key"]

    def full_disk(self, stage, settings, **info):
        raise OSError(28, "No space left on device", str(self.path))

    monkeypatch.setattr(RunDir, "mark_done", full_disk)  # the other settings' model is saved, its record is not
    other = uce_config(tmp_path / "b.yaml", tiny_sd_dir, PROMPTS[:1])
    assert_user_error(run_cli("unlearn", other, "-o", out, "-q", "--overwrite"), "No space left")
    monkeypatch.undo()
    assert json.loads((out / "model" / "unlearn_config.json").read_text())["settings_key"] != first
    res = run_cli("unlearn", path, "-o", out, "-q")  # the original settings: their model is rebuilt, not assumed
    assert res.exit_code == 0 and "already done" not in res.stdout, res.stderr
    assert json.loads((out / "model" / "unlearn_config.json").read_text())["settings_key"] == first


def test_a_rendered_attack_set_never_replaces_a_folder_metaunlearn_did_not_make(tmp_path):
    from metaunlearn.errors import UserError
    from metaunlearn.experiment.demo import build_demo

    experiment = build_demo(robust=True, run_dir=tmp_path / "run")
    name, spec = next((n, s) for n, s in experiment.config.attack_data.items() if s.source == "render")
    folder = experiment.attack_folders()[name]
    folder.mkdir(parents=True)
    (folder / "mine.png").write_bytes(b"mine")
    with pytest.raises(UserError, match="did not make"):
        experiment._make_attack_set(None, spec, folder, False)
    assert (folder / "mine.png").read_bytes() == b"mine"
    (folder / "mine.png").unlink()
    experiment._make_attack_set(None, spec, folder, False)  # an empty folder, then its own folder, are replaced
    experiment._make_attack_set(None, spec, folder, False)
    assert (folder / "generation.json").is_file()


def test_a_generation_stopped_between_its_splits_reruns_without_overwrite(tiny_sd_dir, tmp_path, monkeypatch):
    import metaunlearn.data.generate as generate
    from metaunlearn.backbones.loading import load_backbone
    from metaunlearn.config import validate
    from metaunlearn.data.config import DataConfig

    sd = load_backbone(tiny_sd_dir)
    cfg = validate(DataConfig, {"root": str(tmp_path / "data"), "sampler": {"steps": 1, "guidance": 1.0},
                                "forget": {"prompts": [PROMPTS[0]], "images_per_prompt": 4, "test_fraction": 0.25}},
                   "c.yaml")
    real, calls = generate.replace_directory, []

    def stop_after_the_first(new, final):
        calls.append(final)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real(new, final)

    monkeypatch.setattr(generate, "replace_directory", stop_after_the_first)
    with pytest.raises(KeyboardInterrupt):
        generate.generate_role(sd, cfg, "forget", progress=False)
    monkeypatch.undo()
    assert (tmp_path / "data" / "forget" / "train").is_dir() and not (tmp_path / "data" / "forget" / "test").exists()
    folders = generate.generate_role(sd, cfg, "forget", progress=False)
    assert all((f / "metadata.jsonl").is_file() for f in folders.values())
