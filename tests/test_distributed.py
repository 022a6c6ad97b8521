"""Two CPU processes under torchrun (gloo DDP) run the same training loop; gradients are synchronised."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = r'''
import hashlib, json, sys
import torch
from metaunlearn.training.loop import TrainLoop

out = sys.argv[1]
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 8))
loop = TrainLoop(out, 6, checkpoint_every=3, seed=0, progress=False, cpu=True)
opt = torch.optim.SGD(model.parameters(), lr=0.1)
model, opt = loop.prepare(model=model, optimizer=opt)
rank = loop.accelerator.process_index
local = []

def step_fn(step):
    x = torch.randn(4, 8, generator=loop.generator) + rank   # each rank sees different data
    loss = ((model(x) - x) ** 2).mean()
    loop.accelerator.backward(loss)
    opt.step()
    opt.zero_grad()
    local.append(loss.item())
    return {"loss": loss.item()}

result = loop.run(step_fn)
weights = torch.cat([p.detach().flatten() for p in loop.unwrap(model).parameters()])
report = {
    "rank": rank,
    "world": loop.accelerator.num_processes,
    "wrapper": type(model).__name__,
    "digest": hashlib.sha256(weights.numpy().tobytes()).hexdigest(),
    "local_losses": local,
    "logged_loss": result.terms["loss"],
}
with open(f"{out}/report.rank{rank}.json", "w") as f:  # one file per rank: two ranks' stdout lines interleave
    json.dump(report, f)
'''

TORCHRUN = Path(sys.executable).with_name("torchrun")


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun not installed next to this Python")
def test_two_process_cpu_data_parallel(tmp_path):
    script = tmp_path / "ddp_train.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    # Own process group, so the workers die with torchrun if the test times out.
    proc = subprocess.Popen(
        [str(TORCHRUN), "--standalone", "--nproc_per_node", "2", str(script), str(tmp_path / "run")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail("torchrun did not finish within 120 s")
    assert proc.returncode == 0, stderr[-3000:]
    reports = [json.loads((tmp_path / "run" / f"report.rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["rank"] for r in reports] == [0, 1]
    assert all(r["world"] == 2 and r["wrapper"] == "DistributedDataParallel" for r in reports)
    # Different data on each rank, yet identical weights: the gradients were all-reduced.
    assert reports[0]["local_losses"] != reports[1]["local_losses"]
    assert reports[0]["digest"] == reports[1]["digest"]
    # The logged loss is the mean over ranks, and each rank's RNG state is in the checkpoint.
    mean_last = (reports[0]["local_losses"][-1] + reports[1]["local_losses"][-1]) / 2
    assert reports[0]["logged_loss"] == pytest.approx(mean_last, rel=1e-6)
    checkpoint = tmp_path / "run" / "checkpoint"
    assert (checkpoint / "rng.rank0.safetensors").is_file() and (checkpoint / "rng.rank1.safetensors").is_file()
    assert json.loads((checkpoint / "state.json").read_text())["world_size"] == 2
    shutil.rmtree(tmp_path / "run")
