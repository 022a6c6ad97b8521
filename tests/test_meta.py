"""The meta objective: first-order gradient vs an explicit deepcopy reference, exact second order vs finite
differences, reduction to base + retain at β = 0, the in-place attack (subset, LoRA, distributions), inner AdamW/SGD
vs torch.optim."""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers import UNet2DConditionModel

from metaunlearn.backbones.sd import StableDiffusionBackbone
from metaunlearn.backbones.sdxl import StableDiffusionXLBackbone
from metaunlearn.data.cache import CachedSet
from metaunlearn.meta import AttackConfig, MetaConfig, MetaData, MetaObjective, make_plan
from metaunlearn.meta.inner_optim import InnerOptimizer
from metaunlearn.methods import UnlearnInputs
from metaunlearn.methods.esd import ESD, EsdConfig
from metaunlearn.testing.tiny_pipelines import build_tiny_sd, build_tiny_sdxl

ROLES = {"forget_train": "a photo of a nude person", "forget_test": "naked body", "related": "bare skin",
         "irrelevant": "a dog in the park"}
RETAIN = {"irrelevant": "gamma_irrelevant", "related": "gamma_related"}
ASCENT = {"forget_test": "beta_forget", "related": "beta_related", "irrelevant": "beta_irrelevant"}


def cached(backbone, text: str, n: int, seed: int) -> CachedSet:
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 3, 16, 16, generator=g, dtype=torch.float64 if backbone.dtype == torch.float64 else torch.float32)
    return CachedSet(backbone.encode_images(images), backbone.encode_prompts([text] * n), [text] * n)


def meta_data(backbone, n: int = 5) -> MetaData:
    return MetaData(**{role: cached(backbone, text, n, i) for i, (role, text) in enumerate(ROLES.items())})


def make_backbone(family: str = "sd", dtype=torch.float32):
    pipe = build_tiny_sd() if family == "sd" else build_tiny_sdxl()
    pipe.to(dtype)
    cls = StableDiffusionBackbone if family == "sd" else StableDiffusionXLBackbone
    return cls(pipe, source=f"tiny-{family}")


WEIGHTS = dict(gamma_irrelevant=0.4, gamma_related=0.7, beta_forget=0.5, beta_related=0.3, beta_irrelevant=0.2)


def reference_first_order(backbone, original, config: MetaConfig, data, plan, outer_subset: str):
    """Retain grads at θ on ``original``; a deepcopy attacked with a fresh torch AdamW; ascent grads at θ'."""
    attack = config.attacks[plan.attack]
    names = [n for n, _ in backbone.named_trainable(outer_subset, unet=original)]
    base = dict(original.named_parameters())
    original.requires_grad_(False)
    for n in names:
        base[n].requires_grad_(True)
    retain = sum(getattr(config, RETAIN[r]) * d.loss(backbone, getattr(data, r), unet=original) for r, d in plan.retain.items())
    g_retain = torch.autograd.grad(retain, [base[n] for n in names])
    attacked = copy.deepcopy(original)
    attacked.requires_grad_(False)
    train = [p for _, p in backbone.named_trainable(attack.trainable, unet=attacked)]
    for p in train:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(train, lr=attack.lr, betas=attack.betas, eps=attack.eps, weight_decay=attack.weight_decay)
    for draw in plan.inner:
        opt.zero_grad()
        draw.loss(backbone, data.forget_train, unet=attacked).backward()
        torch.nn.utils.clip_grad_norm_(train, attack.clip_grad_norm)
        opt.step()
    moved = dict(attacked.named_parameters())
    for n in names:
        moved[n].requires_grad_(True)
    ascent = sum(-getattr(config, ASCENT[r]) * d.loss(backbone, getattr(data, r), unet=attacked) for r, d in plan.ascent.items())
    g_ascent = torch.autograd.grad(ascent, [moved[n] for n in names])
    return [a + b for a, b in zip(g_retain, g_ascent)]


@pytest.mark.parametrize(("family", "outer", "attack_subset", "crn"),
                         [("sd", "xattn", "full", True), ("sdxl", "full", "noxattn", False)])
def test_first_order_meta_gradient_matches_deepcopy_reference(family, outer, attack_subset, crn):
    backbone = make_backbone(family)
    data = meta_data(backbone)
    params = backbone.set_trainable(outer)
    original = copy.deepcopy(backbone.unet)
    attack = AttackConfig(steps=3, batch_size=2, lr=1e-3, trainable=attack_subset)
    config = MetaConfig(attacks=[attack], batch_size=3, common_random_numbers=crn, **WEIGHTS)
    objective = MetaObjective(backbone, config, data, params)
    plan = objective.plan(torch.Generator().manual_seed(0))
    assert (plan.ascent["related"] is plan.retain["related"]) == crn
    terms = objective.accumulate(0, torch.Generator(), plan)
    assert {"retain_related", "attack_first", "attack_last", "ascent_forget_test"} <= set(terms)
    ours = [p.grad.clone() for p in params]
    expected = reference_first_order(backbone, original, config, data, plan, outer)
    for a, b in zip(ours, expected):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    # θ is restored exactly, and only the outer parameters require grad afterwards
    for (n, p), q in zip(backbone.unet.named_parameters(), original.parameters()):
        assert torch.equal(p, q), n
    assert {id(p) for p in backbone.unet.parameters() if p.requires_grad} == {id(p) for p in params}


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_second_order_matches_finite_differences(optimizer):
    backbone = make_backbone("sd", torch.float64)
    data = meta_data(backbone, n=4)
    params = backbone.set_trainable("xattn")
    attack = AttackConfig(steps=2, batch_size=2, optimizer=optimizer, lr=0.5 if optimizer == "sgd" else 1e-2,
                          weight_decay=0.01, momentum=0.5 if optimizer == "sgd" else 0.0,
                          clip_grad_norm=None if optimizer == "sgd" else 0.5, trainable="xattn")
    config = MetaConfig(attacks=[attack], batch_size=2, order="second", gamma_irrelevant=0, gamma_related=0,
                        beta_forget=1.0, beta_related=0.5, beta_irrelevant=0)
    objective = MetaObjective(backbone, config, data, params)
    plan = objective.plan(torch.Generator().manual_seed(0))
    objective.accumulate(0, torch.Generator(), plan)
    grad = [p.grad.clone() for p in params]
    theta = [p.detach().clone() for p in params]

    def meta_value(values) -> float:  # −β L(A(θ)) with a plain torch optimizer on a copy
        unet = copy.deepcopy(backbone.unet)
        unet.requires_grad_(False)
        train = [p for _, p in backbone.named_trainable("xattn", unet=unet)]
        with torch.no_grad():
            for p, v in zip(train, values):
                p.copy_(v)
        for p in train:
            p.requires_grad_(True)
        if optimizer == "sgd":
            opt = torch.optim.SGD(train, lr=attack.lr, momentum=attack.momentum, weight_decay=attack.weight_decay)
        else:
            opt = torch.optim.AdamW(train, lr=attack.lr, weight_decay=attack.weight_decay)
        for draw in plan.inner:
            opt.zero_grad()
            draw.loss(backbone, data.forget_train, unet=unet).backward()
            if attack.clip_grad_norm:
                torch.nn.utils.clip_grad_norm_(train, attack.clip_grad_norm)
            opt.step()
        with torch.no_grad():
            return float(sum(-getattr(config, ASCENT[r]) * d.loss(backbone, getattr(data, r), unet=unet)
                             for r, d in plan.ascent.items()))

    g = torch.Generator().manual_seed(7)
    direction = [torch.randn(p.shape, generator=g, dtype=torch.float64) for p in params]
    eps = 1e-5 if optimizer == "sgd" else 1e-7  # Adam's g/|g| is steep near zero gradients
    plus = meta_value([t + eps * v for t, v in zip(theta, direction)])
    minus = meta_value([t - eps * v for t, v in zip(theta, direction)])
    fd = (plus - minus) / (2 * eps)
    analytic = sum(float((a * v).sum()) for a, v in zip(grad, direction))
    assert analytic == pytest.approx(fd, rel=1e-4, abs=1e-9)
    # it is not the first-order gradient
    first = MetaObjective(backbone, config.model_copy(update={"order": "first"}), data, params)
    first.accumulate(0, torch.Generator(), plan)
    approx = sum(float((p.grad * v).sum()) for p, v in zip(params, direction))
    assert abs(approx - fd) > 1e-3 * abs(fd)
    assert all(torch.equal(p, t) for p, t in zip(params, theta))


@pytest.mark.parametrize("alpha", [1.0, 2.5, 0.0])
def test_zero_betas_reduce_to_weighted_base_method_plus_retain(alpha):
    """β = 0: g = α ∇L_base + Σ γ ∇L_retain; α = 0 leaves the base loss out (it is not even computed)."""
    backbone = make_backbone("sd")
    data = meta_data(backbone)
    base = ESD(EsdConfig(variant="x", ddim_steps=3)).apply(UnlearnInputs(backbone, [ROLES["forget_train"]]))
    params = backbone.set_trainable(base.trainable_subset)
    config = MetaConfig(gamma_irrelevant=0.3, gamma_related=0.6, beta_forget=0, beta_related=0, beta_irrelevant=0,
                        base_weight=alpha)
    objective = MetaObjective(backbone, config, data, params, base_loss=base)
    assert objective.attacks is None  # no attack is even set up
    g1, g2 = torch.Generator().manual_seed(11), torch.Generator().manual_seed(11)
    terms = objective.accumulate(0, g1)
    ours = [p.grad.clone() for p in params]
    assert set(terms) == ({"esd"} if alpha else set()) | {"retain_irrelevant", "retain_related"}
    for p in params:
        p.grad = None
    plan = make_plan(config, data, backbone.num_train_timesteps, g2)
    assert plan.attack is None and not plan.inner and not plan.ascent
    total = 0.3 * plan.retain["irrelevant"].loss(backbone, data.irrelevant) \
        + 0.6 * plan.retain["related"].loss(backbone, data.related)
    if alpha:
        total = total + alpha * base(0, g2)[0]
    expected = torch.autograd.grad(total, params)
    for a, b in zip(ours, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)


def test_meta_subset_wider_than_the_method_keeps_the_base_loss_on_the_method_subset():
    """ESD-x with meta terms on the full UNet: the ESD gradient reaches cross-attention only, the retain term all."""
    backbone = make_backbone("sd")
    data = meta_data(backbone)
    base = ESD(EsdConfig(variant="x", ddim_steps=3)).apply(UnlearnInputs(backbone, [ROLES["forget_train"]]))
    base_params = backbone.set_trainable("xattn")
    params = backbone.set_trainable("full")
    config = MetaConfig(gamma_irrelevant=0, gamma_related=0.6, beta_forget=0, beta_related=0, beta_irrelevant=0,
                        trainable="full")
    objective = MetaObjective(backbone, config, data, params, base_loss=base, base_params=base_params)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    objective.accumulate(0, g1)
    ours = [p.grad.clone() for p in params]
    plan = make_plan(config, data, backbone.num_train_timesteps, g2)
    loss, _ = base(0, g2)
    in_base = {id(p) for p in base_params}
    g_base = dict(zip(map(id, base_params), torch.autograd.grad(loss, base_params)))
    g_retain = torch.autograd.grad(0.6 * plan.retain["related"].loss(backbone, data.related), params)
    outside = 0
    for p, got, retain in zip(params, ours, g_retain):
        expected = retain + g_base[id(p)] if id(p) in in_base else retain
        outside += id(p) not in in_base
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-8)
    assert outside > 0 and len(in_base) > 0


def test_lora_attack_in_place_gradient_through_merged_weights_and_removed(tmp_path):
    from peft.tuners.lora import LoraLayer

    backbone = make_backbone("sd", torch.float64)  # adapters vs merged W + s·BA round apart: compared in float64
    keys = set(backbone.unet.state_dict())
    data = meta_data(backbone)
    params = backbone.set_trainable("full")
    plain = copy.deepcopy(backbone.unet)
    lora = AttackConfig(trainable="lora", lora_rank=2, steps=2, batch_size=2, lr=1e-2)
    config = MetaConfig(attacks=[lora], batch_size=2, **WEIGHTS)
    objective = MetaObjective(backbone, config, data, params, seed=3)
    space = objective.attacks.space(0)
    assert space.adapter and space.params and not any(p.requires_grad for p in space.params)
    start = [p.detach().clone() for p in space.params]
    plan = objective.plan(torch.Generator().manual_seed(0))
    terms = objective.accumulate(0, torch.Generator(), plan)
    assert terms["attack_last"] != terms["attack_first"]
    assert all(torch.equal(p, s) for p, s in zip(space.params, start))  # adapters back at their start values
    assert all(torch.equal(p, q) for p, q in zip(params, plain.parameters()))  # base weights untouched
    ours = [p.grad.clone() for p in params]

    # reference: train the adapters of a copy with torch AdamW, merge W + s·BA into a plain UNet, take gradients
    attacked = copy.deepcopy(backbone.unet)
    attacked.enable_adapters()
    attacked.requires_grad_(False)
    adapters = [p for n, p in attacked.named_parameters() if "lora_" in n]
    for p in adapters:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(adapters, lr=lora.lr, weight_decay=lora.weight_decay)
    for draw in plan.inner:
        opt.zero_grad()
        draw.loss(backbone, data.forget_train, unet=attacked).backward()
        torch.nn.utils.clip_grad_norm_(adapters, lora.clip_grad_norm)
        opt.step()
    merged = copy.deepcopy(plain)
    modules = dict(merged.named_modules())
    with torch.no_grad():
        for name, m in attacked.named_modules():
            if isinstance(m, LoraLayer):
                a, b = m.lora_A[space.adapter].weight, m.lora_B[space.adapter].weight
                modules[name].weight += m.scaling[space.adapter] * b @ a
    for unet in (plain, merged):
        unet.requires_grad_(True)
    retain = sum(getattr(config, RETAIN[r]) * d.loss(backbone, getattr(data, r), unet=plain) for r, d in plan.retain.items())
    ascent = sum(-getattr(config, ASCENT[r]) * d.loss(backbone, getattr(data, r), unet=merged) for r, d in plan.ascent.items())
    g_retain = torch.autograd.grad(retain, list(plain.parameters()), allow_unused=True, materialize_grads=True)
    g_ascent = torch.autograd.grad(ascent, list(merged.parameters()), allow_unused=True, materialize_grads=True)
    for a, r, s in zip(ours, g_retain, g_ascent):
        torch.testing.assert_close(a, r + s, rtol=1e-4, atol=1e-7)

    objective.close()
    assert set(backbone.unet.state_dict()) == keys
    backbone.unet.requires_grad_(False)
    out = backbone.save(tmp_path / "model")
    loaded = UNet2DConditionModel.from_pretrained(out / "unet")
    assert set(loaded.state_dict()) == keys


def test_attack_distribution_sampling_follows_weights():
    backbone = make_backbone("sd")
    data = meta_data(backbone)
    attacks = [AttackConfig(weight=3.0, steps=1, batch_size=2), AttackConfig(weight=1.0, epochs=2, batch_size=2,
                                                                          optimizer="sgd", trainable="xattn")]
    config = MetaConfig(attacks=attacks)
    g = torch.Generator().manual_seed(0)
    picks = [make_plan(config, data, 1000, g) for _ in range(200)]
    share = sum(p.attack == 0 for p in picks) / len(picks)
    assert 0.65 < share < 0.85
    assert {len(p.inner) for p in picks if p.attack == 1} == {6}  # 2 epochs × ceil(5 / 2)
    params = backbone.set_trainable("xattn")
    objective = MetaObjective(backbone, config, data, params)
    theta = [p.detach().clone() for p in backbone.unet.parameters()]
    for plan in (next(p for p in picks if p.attack == 0), next(p for p in picks if p.attack == 1)):
        objective.accumulate(0, g, plan)
        assert all(torch.equal(p, t) for p, t in zip(backbone.unet.parameters(), theta))


def test_fixed_timestep_and_batches_cover_each_epoch():
    backbone = make_backbone("sd")
    data = meta_data(backbone, n=5)
    config = MetaConfig(attacks=[AttackConfig(batch_size=2, timestep=250)])
    plan = make_plan(config, data, 1000, torch.Generator().manual_seed(0))
    assert [len(d.index) for d in plan.inner] == [2, 2, 1]
    assert sorted(torch.cat([d.index for d in plan.inner]).tolist()) == list(range(5))
    assert all((d.timesteps == 250).all() for d in plan.inner)


@pytest.mark.parametrize("kind", ["adamw", "sgd"])
def test_inner_optimizer_matches_torch(kind):
    torch.manual_seed(0)
    params = [torch.randn(4, 3), torch.randn(5)]
    ref = [p.clone().requires_grad_(True) for p in params]
    config = AttackConfig(optimizer=kind, lr=0.05, weight_decay=0.1, momentum=0.9 if kind == "sgd" else 0.0)
    ours = InnerOptimizer(params, config)
    for restart in range(2):
        if kind == "adamw":
            opt = torch.optim.AdamW(ref, lr=0.05, weight_decay=0.1)
        else:
            opt = torch.optim.SGD(ref, lr=0.05, momentum=0.9, weight_decay=0.1)
        ours.reset()
        for _ in range(3):
            grads = [torch.randn_like(p) for p in params]
            for r, g in zip(ref, grads):
                r.grad = g.clone()
            opt.step()
            ours.step(grads)
            for a, b in zip(params, ref):
                torch.testing.assert_close(a, b.detach())


@pytest.mark.parametrize("order", ["first", "second", "second_fd"])
def test_bf16_autocast_and_gradient_checkpointing_run(order):
    from metaunlearn.meta import autocast_factory

    backbone = make_backbone("sd")
    backbone.unet.enable_gradient_checkpointing()
    backbone.unet.train()
    data = meta_data(backbone)
    params = backbone.set_trainable("xattn")
    config = MetaConfig(attacks=[AttackConfig(steps=2, batch_size=2)], batch_size=2, order=order)
    objective = MetaObjective(backbone, config, data, params, autocast=autocast_factory(backbone.device, "bf16"))
    opt = torch.optim.AdamW(params, lr=1e-4)
    terms = objective.step(1, torch.Generator().manual_seed(0), opt)
    assert all(torch.isfinite(torch.tensor(v)) for v in terms.values())
