"""The shared training loop: checkpoints, bit-identical resume after SIGKILL, NaN stops, accumulation; run folders."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from metaunlearn.atomic import atomic_directory
from metaunlearn.errors import UserError
from metaunlearn.runs import PlannedStage, RunDir, create_run_dir, latest_run_dir, print_plan
from metaunlearn.training.checkpoint import decode_state, encode_state
from metaunlearn.training.loop import TrainingDiverged, TrainingSettings, TrainLoop, read_log

TRAIN_SCRIPT = r'''
import json, sys, time
import torch
from safetensors.torch import save_file
from metaunlearn.training.loop import TrainLoop

out, steps, sleep = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Dropout(0.1), torch.nn.GELU(), torch.nn.Linear(32, 8))
model[0].requires_grad_(False)  # a frozen part: only trainable parameters are checkpointed
loop = TrainLoop(out, steps, checkpoint_every=4, seed=3, progress=False, cpu=True)
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=1e-2)
sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 / (1 + 0.1 * s))
model, opt = loop.prepare(model=model, optimizer=opt)
loop.track("scheduler", sched)
X = torch.randn(64, 8, generator=torch.Generator().manual_seed(1))

def step_fn(step):
    idx = torch.randint(64, (16,), generator=loop.generator)   # the loop's generator
    x = X[idx] + 0.1 * torch.randn(16, 8)                      # torch's global RNG (and dropout)
    loss = ((model(x) - x.flip(1)) ** 2).mean()
    loop.accelerator.backward(loss)
    opt.step(); sched.step(); opt.zero_grad()
    time.sleep(sleep)
    return {"loss": loss.item()}

result = loop.run(step_fn)
save_file({k: v.contiguous() for k, v in loop.unwrap(model).state_dict().items()}, out + "/final.safetensors")
print(json.dumps({"resumed_from": result.resumed_from, "step": result.step}))
'''


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def _train(script: Path, out: Path, steps: int, sleep: float = 0.0) -> dict:
    proc = subprocess.run(
        [sys.executable, str(script), str(out), str(steps), str(sleep)],
        capture_output=True, text=True, env=_env(), timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _train_in_process(script: Path, out: Path, steps: int, monkeypatch, capsys) -> dict:
    import runpy

    capsys.readouterr()
    monkeypatch.setattr(sys, "argv", [str(script), str(out), str(steps), "0"])
    runpy.run_path(str(script), run_name="__main__")
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_resume_after_sigkill_is_bit_identical(tmp_path, monkeypatch, capsys):
    script = tmp_path / "train.py"
    script.write_text(TRAIN_SCRIPT)
    steps = 24
    out = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, str(script), str(out), str(steps), "0.15"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env(),
    )
    # The uninterrupted reference run, in this process while the other one starts up.
    straight = _train_in_process(script, tmp_path / "straight", steps, monkeypatch, capsys)
    assert straight == {"resumed_from": 0, "step": steps}

    state = out / "checkpoint" / "state.json"
    deadline = time.time() + 60
    killed_at = None
    while time.time() < deadline and proc.poll() is None:
        if state.is_file():
            step = json.loads(state.read_text())["step"]
            if step >= 8:
                proc.send_signal(signal.SIGKILL)
                killed_at = step
                break
        time.sleep(0.02)
    proc.wait(timeout=30)
    assert killed_at is not None and proc.returncode == -signal.SIGKILL, "run finished before it could be killed"
    assert not (out / "final.safetensors").exists()

    resumed = _train(script, out, steps)
    assert resumed["resumed_from"] >= 8 and resumed["step"] == steps
    a, b = load_file(str(tmp_path / "straight" / "final.safetensors")), load_file(str(out / "final.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume"
    # The log has each step exactly once and the same losses as the uninterrupted run.
    log_a, log_b = read_log(tmp_path / "straight"), read_log(out)
    assert [r["step"] for r in log_b] == list(range(1, steps + 1))
    assert [r["loss"] for r in log_a] == [r["loss"] for r in log_b]


def _tiny_setup(tmp_path: Path, **loop_kwargs):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 4)
    loop = TrainLoop(tmp_path / "run", progress=False, cpu=True, **loop_kwargs)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model, opt = loop.prepare(model=model, optimizer=opt)
    return loop, model, opt


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    loop, model, opt = _tiny_setup(tmp_path, steps=20, checkpoint_every=5)
    snapshots = {}

    def step_fn(step):
        x = torch.randn(8, 4, generator=loop.generator)
        loss = (model(x) ** 2).mean()
        if step == 7:
            loss = loss * float("nan")
        loop.accelerator.backward(loss)
        opt.step()
        opt.zero_grad()
        snapshots[step] = model.weight.detach().clone()
        return {"loss": loss.item(), "aux": 1.0}

    with pytest.raises(TrainingDiverged) as info:
        loop.run(step_fn)
    message = str(info.value)
    assert isinstance(info.value, UserError) and "\n" not in message
    assert "'loss' became nan at step 7" in message
    assert f"last good checkpoint kept at {tmp_path / 'run' / 'checkpoint'}" in message
    state = json.loads((tmp_path / "run" / "checkpoint" / "state.json").read_text())
    assert state["step"] == 5
    saved = load_file(str(tmp_path / "run" / "checkpoint" / "module.model.safetensors"))
    assert torch.equal(saved["weight"], snapshots[5])
    assert [r["step"] for r in read_log(tmp_path / "run")] == [1, 2, 3, 4, 5, 6]


def test_weights_overflowing_at_a_finite_loss_are_never_checkpointed(tmp_path):
    """SGD at a huge but finite learning rate: step 2's loss is finite yet its update overflows the weights to
    -inf. The run stops at step 2 and the checkpoint kept is step 1's, with finite weights."""
    torch.manual_seed(0)
    model = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    loop = TrainLoop(tmp_path / "run", 10, checkpoint_every=1, progress=False, cpu=True)
    opt = torch.optim.SGD(model.parameters(), lr=2e38)  # float32 holds 2e38 but not 4e38
    model, opt = loop.prepare(model=model, optimizer=opt)
    losses = []

    def step_fn(step):
        loss = model(torch.ones(1, 1)).mean()  # the weight itself: gradient 1
        loop.accelerator.backward(loss)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
        return {"loss": loss.item()}

    with pytest.raises(TrainingDiverged) as info:
        loop.run(step_fn)
    message = str(info.value)
    assert "'model.weight' became non-finite (nan or inf) at step 2" in message and "\n" not in message
    assert f"last good checkpoint kept at {tmp_path / 'run' / 'checkpoint'}" in message
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    assert json.loads((tmp_path / "run" / "checkpoint" / "state.json").read_text())["step"] == 1
    saved = load_file(str(tmp_path / "run" / "checkpoint" / "module.model.safetensors"))
    assert torch.isfinite(saved["weight"]).all() and saved["weight"].abs().max() > 1e37


def test_inf_before_any_checkpoint(tmp_path):
    loop, model, opt = _tiny_setup(tmp_path, steps=5, checkpoint_every=0)
    with pytest.raises(TrainingDiverged, match="became inf at step 1; no checkpoint had been written yet"):
        loop.run(lambda step: {"loss": float("inf")})


def test_gradient_accumulation_matches_large_batch(tmp_path):
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(0))

    def train(accum: int, out: str) -> torch.Tensor:
        loop, model, opt = _tiny_setup(tmp_path / out, steps=3, gradient_accumulation_steps=accum, checkpoint_every=0)
        part = {"i": 0}

        def step_fn(step):
            rows = x if accum == 1 else x[part["i"] % 2 * 4 : part["i"] % 2 * 4 + 4]
            part["i"] += 1
            loss = (model(rows) ** 2).mean()
            loop.accelerator.backward(loss)
            opt.step()
            opt.zero_grad()
            return {"loss": loss.item()}

        loop.run(step_fn)
        assert int(opt.state_dict()["state"][0]["step"]) == 3  # one optimizer step per loop step
        return loop.unwrap(model).weight.detach().clone()

    assert torch.allclose(train(1, "big"), train(2, "accum"), atol=1e-6)


def test_resume_refuses_a_checkpoint_of_another_run(tmp_path):
    loop, model, opt = _tiny_setup(tmp_path, steps=2)

    def step_fn(step):
        loss = model(torch.ones(1, 4)).sum()
        loop.accelerator.backward(loss)
        opt.step()
        opt.zero_grad()
        return {"loss": loss.item()}

    loop.run(step_fn)
    other = TrainLoop(tmp_path / "run", steps=4, progress=False, cpu=True)
    other.prepare(unet=torch.nn.Linear(4, 4))
    with pytest.raises(UserError, match="holds .*'model'.* but this run trains .*'unet'"):
        other.run(step_fn)
    # A finished run is not repeated.
    again = TrainLoop(tmp_path / "run", steps=2, progress=False, cpu=True)
    again.prepare(model=torch.nn.Linear(4, 4), optimizer=torch.optim.Adam(torch.nn.Linear(4, 4).parameters()))
    assert again.run(lambda s: pytest.fail("stepped again")).resumed_from == 2


def test_bf16_mixed_precision_and_settings(tmp_path):
    settings = TrainingSettings(steps=2, checkpoint_every=1, mixed_precision="bf16")
    torch.manual_seed(0)
    loop = TrainLoop.from_settings(tmp_path / "bf16", settings, progress=False, cpu=True)
    model = torch.nn.Linear(4, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model, opt = loop.prepare(model=model, optimizer=opt)

    def step_fn(step):
        out = model(torch.randn(2, 4, generator=loop.generator))
        loss = out.float().pow(2).mean()
        loop.accelerator.backward(loss)
        opt.step()
        opt.zero_grad()
        return {"loss": loss.item()}

    result = loop.run(step_fn)
    assert loop.accelerator.mixed_precision == "bf16" and result.step == 2
    # The next stage in the same process may use other settings.
    plain = TrainLoop(tmp_path / "plain", steps=1, progress=False, cpu=True)
    assert plain.accelerator.mixed_precision == "no"
    with pytest.raises(UserError, match="unknown mixed precision"):
        TrainLoop(tmp_path / "x", steps=1, mixed_precision="fp8", cpu=True)


def test_state_encoding_round_trip():
    state = {
        "state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(2, 2)}, 1: {"momentum": None}},
        "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "params": [0, 1], "nesterov": False}],
        "nested": [(1, "a"), {"x": float("inf")}],
    }
    tensors: dict = {}
    document = json.loads(json.dumps(encode_state(state, tensors)))
    back = decode_state(document, tensors)
    assert set(back["state"]) == {0, 1} and back["param_groups"][0]["betas"] == (0.9, 0.999)
    assert torch.equal(back["state"][0]["exp_avg"], state["state"][0]["exp_avg"])
    assert back["state"][0]["step"].dtype == torch.float32 and back["nested"][0] == (1, "a")
    with pytest.raises(TypeError, match="cannot store"):
        encode_state({"f": object()}, {})


# ---- run folders ------------------------------------------------------------------------------------------------
def test_run_dirs_markers_and_plan(tmp_path, capsys):
    first = create_run_dir(tmp_path, "toy esd")
    second = create_run_dir(tmp_path, "toy esd")
    assert first.name == "00000-toy-esd" and second.name == "00001-toy-esd"
    assert latest_run_dir(tmp_path, "toy esd") == second and latest_run_dir(tmp_path, "other") is None

    run = RunDir(second)
    run.write_config(TrainingSettings(steps=3))
    assert json.loads((second / "config.json").read_text())["steps"] == 3
    settings = TrainingSettings(steps=3)
    assert not run.is_done("unlearn", settings)
    run.mark_done("unlearn", settings, model="out/model")
    assert run.is_done("unlearn", settings) and run.is_done("unlearn")
    assert not run.is_done("unlearn", TrainingSettings(steps=4))  # changed settings re-run the stage
    run.clear_done("unlearn")
    assert not run.is_done("unlearn")

    print_plan([PlannedStage("unlearn", model="base", data=["forget/train"], outputs=["runs/x/model"], done=True)])
    out = capsys.readouterr().out
    assert "unlearn" in out and "done (skip)" in out and "forget/train" in out


def test_atomic_directory_keeps_old_on_error(tmp_path):
    target = tmp_path / "out"
    with atomic_directory(target) as tmp:
        (tmp / "a.txt").write_text("good")
    with pytest.raises(RuntimeError):
        with atomic_directory(target) as tmp:
            (tmp / "a.txt").write_text("half")
            raise RuntimeError("crash")
    assert (target / "a.txt").read_text() == "good"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
