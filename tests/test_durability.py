"""Durability signals: each value against a direct computation; logged by the unlearn stage; Spearman in the report."""

from __future__ import annotations

import json

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from metaunlearn.training.durability import DurabilityProbe, SignalsConfig
from metaunlearn.unlearn import UnlearnConfig, run_unlearn

from test_meta import cached, make_backbone
from test_unlearn_cli import config_dict, world  # noqa: F401  (module fixture)


@sdpa_kernel([SDPBackend.MATH])  # double backward
def test_signals_match_direct_computation():
    backbone = make_backbone("sd", torch.float64)
    forget = cached(backbone, "a photo of a nude person", 5, 0)
    related = cached(backbone, "bare skin", 5, 1)
    config = SignalsConfig(batch_size=3, power_iterations=40, subset="xattn")
    params = dict(backbone.unet.named_parameters())
    names = [n for n, _ in backbone.named_trainable("xattn")]
    reference = {n: p.detach().clone() for n, p in params.items()}
    with torch.no_grad():
        params[names[0]].add_(0.5)
    probe = DurabilityProbe(backbone, config, forget, related, reference)
    backbone.unet.requires_grad_(False)
    out = probe()

    theta = [params[n] for n in names]
    for p in theta:
        p.requires_grad_(True)
    g_f = torch.autograd.grad(probe.forget_draw.loss(backbone, forget), theta, create_graph=True)
    g_r = torch.autograd.grad(probe.related_draw.loss(backbone, related), theta)
    flat_f = torch.cat([g.detach().flatten() for g in g_f])
    flat_r = torch.cat([g.flatten() for g in g_r])
    assert out["sig_forget_grad_norm"] == pytest.approx(float(flat_f.norm()), rel=1e-9)
    assert out["sig_forget_related_cos"] == pytest.approx(float(flat_f @ flat_r / flat_f.norm() / flat_r.norm()), rel=1e-9)
    assert out["sig_distance"] == pytest.approx(0.5 * params[names[0]].numel() ** 0.5, rel=1e-9)
    # the eigenvalue: an eigenpair of the Hessian, and no Rayleigh quotient of a random direction exceeds it
    lam = out["sig_forget_top_eig"]
    gen = torch.Generator().manual_seed(5)
    for _ in range(5):
        v = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in theta]
        hv = torch.autograd.grad(g_f, theta, grad_outputs=v, retain_graph=True)
        quotient = float(sum((a * b).sum() for a, b in zip(v, hv)) / sum((a * a).sum() for a in v))
        assert abs(quotient) <= abs(lam) * (1 + 1e-6)
    # flags and gradients are left as found
    assert all(p.requires_grad for p in theta) and all(p.grad is None for p in theta)


def test_unlearn_logs_signals_and_writes_the_final_ones(world, tmp_path):  # noqa: F811
    cfg = UnlearnConfig.model_validate(config_dict(
        world, "sd", "esd", True, tmp_path / "run", steps=4,
        signals={"every": 2, "batch_size": 2, "power_iterations": 2}))
    run_unlearn(cfg, progress=False)
    log = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert [("sig_forget_top_eig" in r) for r in log] == [False, True, False, True]
    final = json.loads((tmp_path / "run" / "signals.json").read_text())
    assert final["steps"] == 4 and final["sig_distance"] > 0
    assert final["sig_forget_top_eig"] == pytest.approx(log[-1]["sig_forget_top_eig"])
    # a closed-form edit alone still gets its final signals; none without the option
    run_unlearn(UnlearnConfig.model_validate(config_dict(world, "sd", "uce", False, tmp_path / "uce")), progress=False)
    assert json.loads((tmp_path / "uce" / "signals.json").read_text())["sig_distance"] > 0
    run_unlearn(UnlearnConfig.model_validate(config_dict(world, "sd", "uce", False, tmp_path / "uce-off", signals=None)),
                progress=False)
    assert not (tmp_path / "uce-off" / "signals.json").exists()


def test_report_correlates_final_signals_with_measured_forget_rate(tmp_path):
    from metaunlearn.attacks.sweep import write_jsonl
    from metaunlearn.experiment.report import ReportConfig, build_report
    from metaunlearn.experiment.signals_table import spearman

    # four models, two grid seeds: forget rate rises with the gradient norm and falls with the cosine
    for i, model in enumerate(["a-plain", "a-meta", "b-plain", "b-meta"]):
        for seed in (0, 1):
            key = model if seed == 0 else f"{model}.s{seed}"
            folder = tmp_path / "models" / key
            folder.mkdir(parents=True)
            signals = {"sig_forget_grad_norm": 1.0 + i + 0.1 * seed, "sig_forget_related_cos": -i - 0.1 * seed}
            (folder / "signals.json").write_text(json.dumps(signals))
            rows = [{"model": model, "method": model[0], "variant": "meta" if "meta" in model else "unlearn",
                     "attack_set": "hrm-m", "mode": "full", "lr": 1e-4, "seed": seed, "step": step,
                     "forget_rate": rate} for step, rate in ((0, 0.0), (25, 0.2 * i + 0.05 * seed), (100, 1.0))]
            write_jsonl(rows, tmp_path / "attacks" / model / "hrm-m" / f"full_lr0.0001_s{seed}.jsonl")
    files = build_report(tmp_path, config=ReportConfig(budget_steps=25))
    text = files.markdown.read_text()
    assert "Durability signals" in text and "hrm-m @25" in text
    line = next(x for x in text.splitlines() if "Spearman ρ vs worst" in x)
    assert "+1.00" in line and "-1.00" in line
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0, abs=1e-5)
    assert spearman([1, 2], [1, 2]) is None
