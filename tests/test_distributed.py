"""Two CPU processes under torchrun (gloo DDP) run the same training loop; gradients are synchronised."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from metaunlearn.errors import UserError

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


# ---- the unlearn stage, data parallel ----------------------------------------------------------------------------------
TEXTS = {"forget": ["a photo of a nude person", "naked body"], "related": ["bare skin", "a woman on the beach"],
         "irrelevant": ["a dog in the park", "a red car on the street"]}
# Batches of 3 rows over 2 processes × 2 micro-batches: uneven shares and empty micro-batches; the exact
# second-order meta gradient, so the inner all-reduce runs inside the autograd graph; ESD's loss on every process.
# The simulated attack is SGD: through AdamW's first steps (≈ sign of the gradient) the fp32 second-order gradient
# amplifies rounding differences of near-zero gradient entries (checked in float64 below instead). The ascent terms
# are bounded relative to the unattacked loss (tanh, c = 1 × L(θ)), whose whole-batch loss is summed across processes.
META_SECOND_ORDER = {"order": "second", "batch_size": 3, "beta_forget": 1.0, "beta_related": 0.5,
                     "ascent_bound": "tanh", "ascent_cap_ratio": 1.0,
                     "attacks": [{"steps": 2, "batch_size": 3, "optimizer": "sgd", "lr": 0.05, "momentum": 0.5}]}


def _unlearn_config(tiny_sd_dir: Path, root: Path, out: Path, steps: int) -> dict:
    from metaunlearn.data.imagefolder import write_imagefolder

    data = root / "data"
    if not data.exists():
        g = torch.Generator().manual_seed(0)
        for role, texts in TEXTS.items():
            for split in ("train", "test"):
                write_imagefolder(data / role / split, torch.rand(4, 3, 16, 16, generator=g), [texts[i % 2] for i in range(4)])
    return {
        "model": str(tiny_sd_dir), "out": str(out),
        "method": {"name": "esd", "params": {"ddim_steps": 3}},
        "meta": META_SECOND_ORDER,
        "data": {**{r: {"train": str(data / r / "train"), "test": str(data / r / "test")} for r in TEXTS},
                 "cache_dir": str(root / "cache")},
        "forget_prompts": TEXTS["forget"], "steps": steps, "lr": 1e-3, "checkpoint_every": 1, "device": "cpu",
    }


def _unet(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model" / "unet" / "diffusion_pytorch_model.safetensors"))


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun not installed next to this Python")
def test_two_process_meta_unlearn_equals_one_process(tiny_sd_dir, tmp_path):
    """``torchrun --nproc_per_node 2 -m metaunlearn unlearn CONFIG --meta`` (2 gloo ranks, gradient accumulation 2
    from accelerate's environment variable), resumed from a one-process checkpoint, ends with the weights of an
    uninterrupted one-process run at the same batch sizes."""
    from metaunlearn.unlearn import UnlearnConfig, run_unlearn

    single = tmp_path / "single"
    run_unlearn(UnlearnConfig.model_validate(_unlearn_config(tiny_sd_dir, tmp_path, single, 3)), progress=False)
    # one process for step 1 ...
    parallel = tmp_path / "parallel"
    first = _unlearn_config(tiny_sd_dir, tmp_path, parallel, 1)
    run_unlearn(UnlearnConfig.model_validate(first), progress=False)
    # ... then two processes resume for steps 2 and 3
    meta_file = tmp_path / "meta.yaml"
    meta_file.write_text(yaml.safe_dump({**first, "steps": 3}))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "2"}
    proc = subprocess.Popen(
        [str(TORCHRUN), "--standalone", "--nproc_per_node", "2", "-m", "metaunlearn", "unlearn", str(meta_file),
         "--meta", "-q"],  # resumes: the same settings, more steps
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail("torchrun did not finish within 240 s")
    assert proc.returncode == 0, stderr[-3000:]
    assert stdout.count("model:") == 1  # one process reports (and writes)
    state = json.loads((parallel / "checkpoint" / "state.json").read_text())
    assert state["world_size"] == 2 and state["step"] == 3
    resolved = json.loads((parallel / "config.json").read_text())
    assert resolved["gradient_accumulation_steps"] == 2 and resolved["mixed_precision"] == "no"
    log = [json.loads(line) for line in (parallel / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3]
    reference = [json.loads(line) for line in (single / "train_log.jsonl").read_text().splitlines()]
    for key in ("esd", "retain_related", "attack_first", "ascent_forget_test", "cap_forget_test", "grad_norm"):
        assert log[-1][key] == pytest.approx(reference[-1][key], rel=1e-5), key  # measured ≤ 5e-7
    a, b = _unet(single), _unet(parallel)
    original = load_file(str(tiny_sd_dir / "unet" / "diffusion_pytorch_model.safetensors"))
    moved = max(float((a[k] - original[k]).abs().max()) for k in a)
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert moved > 1e-3  # the weights did train
    assert diff <= 1e-5, (diff, moved)  # measured 2e-7 (weights of magnitude up to 1)


CAP = 1.044  # between the related (1.042) and the forget (1.046) ascent loss of this set-up: one capped, one not
# relative cap between the attacked / unattacked loss ratios of the forget (0.99832) and the related and irrelevant
# (0.99859, 0.99904) ascent terms: the forget term below its cap, the others past it
RATIO = 0.99845

@pytest.mark.parametrize("order", ["first", "second", "second_unrolled"])
@pytest.mark.parametrize("optimizer, forget_term", [("adamw", "ascent"), ("sgd", "ascent"), ("adamw", "anchor"),
                                                     ("adamw", "tanh"), ("adamw", "cap"), ("adamw", "ratio"),
                                                     ("adamw", "ratio-tanh"), ("adamw", "ratio-start")])
def test_split_batches_give_the_same_meta_gradient(order, optimizer, forget_term):
    """One process cutting every batch into 2 or 3 micro-batches (shares 1/3 + 2/3, an empty part) gets the meta
    gradient of the whole batch: to 1e-9 in float64, also through AdamW's steps under both exact second orders
    (reverse mode: summed adjoint, clip gradient and Hessian-vector products; unrolled: all-reduce in the graph),
    and with the anchored forget term (each part's target predicted for its own rows) and bounded ascent terms (the
    bound acts on the whole batch's loss: tanh, and a cap between the related and the forget loss; a relative cap,
    r × the whole batch's unattacked loss, with the cap and tanh, and measured at the start weights' copy)."""
    from metaunlearn.backbones.sd import StableDiffusionBackbone
    from metaunlearn.data.cache import CachedSet
    from metaunlearn.meta import AttackConfig, MetaConfig, MetaData, MetaObjective
    from metaunlearn.testing.tiny_pipelines import build_tiny_sd
    from metaunlearn.training.parallel import Shard

    backbone = StableDiffusionBackbone(build_tiny_sd().to(torch.float64), source="tiny-sd")
    g = torch.Generator().manual_seed(0)
    texts = {"forget_train": "naked body", "forget_test": "a nude person", "related": "bare skin",
             "irrelevant": "a dog"}
    data = MetaData(**{role: CachedSet(backbone.encode_images(torch.rand(4, 3, 16, 16, generator=g, dtype=torch.float64)),
                                       backbone.encode_prompts([t] * 4), [t] * 4) for role, t in texts.items()})
    params = backbone.set_trainable("xattn")
    attack = AttackConfig(steps=2, batch_size=3, optimizer=optimizer, lr=1e-3 if optimizer == "adamw" else 0.5,
                          momentum=0.0 if optimizer == "adamw" else 0.5, trainable="xattn")
    bound = {"tanh": {"ascent_bound": "tanh", "ascent_cap": 1.0}, "cap": {"ascent_bound": "cap", "ascent_cap": CAP},
             "ratio": {"ascent_bound": "cap", "ascent_cap_ratio": RATIO},
             "ratio-tanh": {"ascent_bound": "tanh", "ascent_cap_ratio": 1.0},
             "ratio-start": {"ascent_bound": "tanh", "ascent_cap_ratio": 1.0, "ascent_cap_reference": "start"}}
    config = MetaConfig(attacks=[attack], batch_size=3, order=order, beta_forget=1.0, beta_related=0.5,
                        forget_term="anchor" if forget_term == "anchor" else "ascent", **bound.get(forget_term, {}))
    grads, terms = [], []
    for shard in (Shard(), Shard(0, 1, 2), Shard(0, 1, 4)):
        objective = MetaObjective(backbone, config, data, params, shard=shard)
        plan = objective.plan(torch.Generator().manual_seed(0))
        terms.append(objective.accumulate(0, torch.Generator(), plan))
        grads.append(torch.cat([p.grad.flatten() for p in params]))
    scale = float(grads[0].abs().max())
    assert scale > 0
    for grad, logged in zip(grads[1:], terms[1:]):
        assert float((grad - grads[0]).abs().max()) <= 1e-9 * scale
        assert logged == pytest.approx(terms[0], rel=1e-12)
    if forget_term == "ratio":  # one term on each side of its cap
        assert terms[0]["ascent_forget_test"] < terms[0]["cap_forget_test"]
        assert terms[0]["ascent_related"] > terms[0]["cap_related"]


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_split_attack_batches_train_the_same_attack(mode):
    """A relearning attack cutting each batch of 3 into 2 micro-batches (the shares a 2-process launch computes)
    reaches the same weights and losses as the whole-batch attack (float64: to 1e-10)."""
    from metaunlearn.attacks.config import AttackSpec
    from metaunlearn.attacks.finetune import run_attack
    from metaunlearn.backbones.sd import StableDiffusionBackbone
    from metaunlearn.data.cache import CachedSet
    from metaunlearn.testing.tiny_pipelines import build_tiny_sd
    from metaunlearn.training.parallel import Shard

    backbone = StableDiffusionBackbone(build_tiny_sd().to(torch.float64), source="tiny-sd")
    texts = ["naked body", "a nude person", "bare skin", "a dog"]
    images = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    data = CachedSet(backbone.encode_images(images), backbone.encode_prompts(texts), texts)
    spec = AttackSpec(mode=mode, lr=1e-3, batch_size=3, snapshot_steps=[0, 3], seed=1)
    after = []

    def weights(bb, step):
        if step == 3:
            after.append(torch.cat([p.detach().flatten().clone() for p in bb.unet.parameters()]))
        return {}

    torch.manual_seed(0)  # LoRA adapters are initialised from the global RNG
    whole = run_attack(backbone, data, spec, weights, progress=False)
    torch.manual_seed(0)
    split = run_attack(backbone, data, spec, weights, progress=False, shard=Shard(0, 1, 2))
    assert split.losses == pytest.approx(whole.losses, rel=1e-10)
    assert float((after[0] - after[1]).abs().max()) <= 1e-10


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun not installed next to this Python")
def test_two_process_attack_equals_one_process(tiny_sd_dir, tmp_path, run_cli):
    """``torchrun --nproc_per_node 2 -m metaunlearn attack MODEL CONFIG`` trains each attack on both processes (batches
    of 3 split 2 + 1) to the losses of the one-process command; the main process alone writes the results."""
    from metaunlearn.data.imagefolder import write_imagefolder

    write_imagefolder(tmp_path / "hrm", torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0)),
                      ["naked body", "a nude person"] * 2)
    config = tmp_path / "attack.yaml"
    config.write_text(yaml.safe_dump({"attack": {
        "sets": {"hrm": {"data": "hrm"}}, "modes": ["full"], "lrs": [1e-3], "snapshot_steps": [0, 3],
        "batch_size": 3, "grid_images": 0}}))
    one = run_cli("attack", tiny_sd_dir, config, "--run-dir", tmp_path / "one", "--name", "m", "-q", "--device", "cpu")
    assert one.exit_code == 0, one.stderr
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(
        [str(TORCHRUN), "--standalone", "--nproc_per_node", "2", "-m", "metaunlearn", "attack", str(tiny_sd_dir),
         str(config), "--run-dir", str(tmp_path / "two"), "--name", "m", "-q", "--device", "cpu"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail("torchrun did not finish within 240 s")
    assert proc.returncode == 0, stderr[-3000:]
    assert stdout.count("results:") == 1  # one process reports
    files = sorted((tmp_path / "one" / "attacks" / "m" / "hrm").glob("*.jsonl"))
    assert [f.name for f in files] == [f.name for f in sorted((tmp_path / "two" / "attacks" / "m" / "hrm").glob("*.jsonl"))]
    for f in files:
        a = [json.loads(line) for line in f.read_text().splitlines()]
        b = [json.loads(line) for line in (tmp_path / "two" / "attacks" / "m" / "hrm" / f.name).read_text().splitlines()]
        assert [r["step"] for r in a] == [r["step"] for r in b] == [0, 3]
        assert a[0]["attack_loss"] != a[1]["attack_loss"]  # it trained
        for x, y in zip(a, b):
            assert y["attack_loss"] == pytest.approx(x["attack_loss"], rel=1e-5)


def test_launcher_bf16_and_accumulation_are_used_and_recorded(tiny_sd_dir, tmp_path, monkeypatch):
    """``accelerate launch --mixed_precision bf16`` and ``ACCELERATE_GRADIENT_ACCUMULATION_STEPS=2`` (the environment
    a launch gives the processes) set a config that leaves both unset; the model's config.json records them."""
    from metaunlearn.unlearn import UnlearnConfig, run_unlearn

    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    monkeypatch.setenv("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "2")
    cfg = {**_unlearn_config(tiny_sd_dir, tmp_path, tmp_path / "out", 1), "method": {"name": "uce"},
           "meta": {"batch_size": 3, "attacks": [{"steps": 1, "batch_size": 3, "lr": 1e-3}]}}
    result = run_unlearn(UnlearnConfig.model_validate(cfg), progress=False)
    resolved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert resolved["mixed_precision"] == "bf16" and resolved["gradient_accumulation_steps"] == 2
    assert all(math.isfinite(v) for v in result.terms.values())
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    with pytest.raises(UserError, match="bf16 or fp32, not fp16"):
        run_unlearn(UnlearnConfig.model_validate(cfg), progress=False)
