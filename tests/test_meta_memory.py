"""The meta step's memory plan: its parameter-copy arithmetic, offload and M, and a loose check against the peak
resident memory of a real step on the tiny SD pipeline."""

from __future__ import annotations

import torch

from metaunlearn.meta import AttackConfig, MetaConfig, MetaObjective
from metaunlearn.meta.memory import plan_meta_memory, process_rss
from tests.test_meta import make_backbone, meta_data


def plan(backbone, **meta):
    attack = {"steps": 3, "batch_size": 2, **meta.pop("attack", {})}
    config = MetaConfig(batch_size=2, attacks=[AttackConfig(**attack)], **meta)
    latents = (4, 8, 8)
    return plan_meta_memory(backbone, config, "full", latent_shape=latents, cond_shapes={"encoder_hidden_states": (16, 32)},
                            other_modules_bytes=0)


def test_plan_arithmetic_offload_and_steps():
    backbone = make_backbone("sd")
    S = sum(p.numel() * 4 for p in backbone.unet.parameters())
    first = plan(backbone, order="first")
    assert first.parts["weights"] == S and first.parts["outer optimizer"] == 2 * S
    assert first.parts["attack params"] == S and first.parts["inner state"] == 2 * S
    assert first.host == S  # the saved θ
    second = plan(backbone, order="second")
    assert second.peak > first.peak
    assert second.host == S + 3 * S  # saved θ + ĝ_1 … ĝ_3
    longer = plan(backbone, order="second", attack={"steps": 20})
    # device memory does not grow with M (the traced activations may differ by a few bytes between traces)
    assert abs(longer.peak - second.peak) < 4096 and longer.host == S + 20 * S
    on_device = plan(backbone, order="second", offload=False)
    assert abs(on_device.peak - (second.peak + S + 3 * S)) < 4096
    sgd = plan(backbone, order="second", attack={"optimizer": "sgd"})
    assert sgd.parts["inner state"] == 0 and sgd.peak < second.peak


def test_plan_loosely_matches_a_measured_step():
    """Resident memory is coarse at this size (allocator and library pages): the step's growth must stay within
    the plan's prediction plus 150 MiB, and the plan must not exceed the whole process."""
    backbone = make_backbone("sd")
    data = meta_data(backbone)
    params = backbone.set_trainable("full")
    config = MetaConfig(order="second", batch_size=2, attacks=[AttackConfig(steps=3, batch_size=2)])
    objective = MetaObjective(backbone, config, data, params)
    predicted = plan_meta_memory(backbone, config, "full", latent_shape=tuple(data.forget_train.latents.shape[1:]),
                                 cond_shapes={"encoder_hidden_states": tuple(data.forget_train.cond["encoder_hidden_states"].shape[1:])})
    before = process_rss()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    objective.accumulate(0, torch.Generator().manual_seed(0))
    peak = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    assert peak - before <= predicted.peak + 150 * 2**20
    assert predicted.peak <= peak
