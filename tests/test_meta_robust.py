"""Simulated-attack distributions (lr / step ranges, several forget sets), the normalised-step (radius) attacker,
ascent terms along the inner trajectory and bounded ascent terms: each checked against an independent computation."""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch

from metaunlearn.errors import UserError
from metaunlearn.meta import AttackConfig, MetaConfig, MetaObjective, make_plan
from metaunlearn.meta.inner_optim import InnerOptimizer
from metaunlearn.meta.simulated_attack import set_requires_grad

from test_meta import cached, make_backbone, meta_data

ASCENT_ONLY = dict(gamma_irrelevant=0, gamma_related=0, beta_forget=1.0, beta_related=0.5, beta_irrelevant=0)


def grads_of(objective: MetaObjective, plan) -> list[torch.Tensor]:
    for p in objective.params:
        p.grad = None
    objective._ascent(plan)
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in objective.params]


def test_lr_and_steps_ranges_are_sampled_per_outer_step():
    backbone = make_backbone("sd")
    data = meta_data(backbone, n=5)
    attack = AttackConfig(lr_range=(1e-5, 1e-3), steps_range=(2, 4), batch_size=2)
    config = MetaConfig(attacks=[attack], **ASCENT_ONLY)
    gen = torch.Generator().manual_seed(0)
    plans = [make_plan(config, data, 1000, gen) for _ in range(300)]
    lrs = [p.attack_config.lr for p in plans]
    assert all(1e-5 <= lr <= 1e-3 for lr in lrs)
    # log-uniform: a third of the draws in each decade-and-a-half third, median near the geometric mean 1e-4
    logs = sorted(math.log10(lr) for lr in lrs)
    assert abs(logs[len(logs) // 2] - (-4)) < 0.25
    assert sum(lr < 1e-4 for lr in lrs) / len(lrs) == pytest.approx(0.5, abs=0.1)
    assert {len(p.inner) for p in plans} == {2, 3, 4}
    assert all(len(p.inner) == p.attack_config.steps for p in plans)
    # without ranges the attack is used as configured and no extra random number is drawn
    fixed = MetaConfig(attacks=[AttackConfig(steps=3, batch_size=2)], **ASCENT_ONLY)
    a, b = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    plan = make_plan(fixed, data, 1000, a)
    assert plan.attack_config is fixed.attacks[0]
    torch.testing.assert_close(plan.inner[0].noise, make_plan(fixed, data, 1000, b).inner[0].noise)
    with pytest.raises(ValueError):
        AttackConfig(lr_range=(1e-3, 1e-5))


def test_attack_on_another_forget_set():
    backbone = make_backbone("sd")
    data = meta_data(backbone, n=5)
    data.attack_sets["renders"] = cached(backbone, "a rendered nude", 3, 9)
    config = MetaConfig(attacks=[AttackConfig(steps=4, batch_size=2, data="renders")], **ASCENT_ONLY)
    plan = make_plan(config, data, 1000, torch.Generator().manual_seed(0))
    assert max(int(d.index.max()) for d in plan.inner) < 3  # rows of the 3-image set
    params = backbone.set_trainable("xattn")
    objective = MetaObjective(backbone, config, data, params)
    assert objective.accumulate(0, torch.Generator(), plan)["attack_steps"] == 4
    missing = MetaConfig(attacks=[AttackConfig(steps=1, data="nowhere")], **ASCENT_ONLY)
    with pytest.raises(UserError, match="nowhere"):
        MetaObjective(backbone, missing, data, params)


@pytest.mark.parametrize(("optimizer", "momentum"), [("sgd", 0.0), ("sgd", 0.9), ("adamw", 0.0)])
def test_radius_step_has_fixed_norm_along_the_optimizer_direction(optimizer, momentum):
    torch.manual_seed(0)
    params = [torch.randn(5, 3), torch.randn(7)]
    start = [p.clone() for p in params]
    config = AttackConfig(optimizer=optimizer, momentum=momentum, radius=0.05, lr=123.0, weight_decay=0.5)
    opt = InnerOptimizer(params, config)
    g = [torch.randn_like(p) for p in params]
    opt.step([x.clone() for x in g])
    delta = [p - s for p, s in zip(params, start)]
    norm = torch.sqrt(sum((d * d).sum() for d in delta))
    assert float(norm) == pytest.approx(0.05, rel=1e-5)
    if optimizer == "sgd":  # first step: along −g
        g_norm = torch.sqrt(sum((x * x).sum() for x in g))
        for d, x in zip(delta, g):
            torch.testing.assert_close(d, -0.05 * x / g_norm)
    else:  # first AdamW step: m̂/√v̂ = sign(g) (up to ε)
        n = sum(x.numel() for x in g)
        for d, x in zip(delta, g):
            torch.testing.assert_close(d, -0.05 * torch.sign(x) / math.sqrt(n), rtol=1e-4, atol=1e-7)
    before = [p.clone() for p in params]
    opt.step([torch.randn_like(p) for p in params])
    second = torch.sqrt(sum(((p - b) ** 2).sum() for p, b in zip(params, before)))
    assert float(second) == pytest.approx(0.05, rel=1e-5)


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_second_order_radius_attacker_matches_finite_differences(optimizer):
    backbone = make_backbone("sd", torch.float64)
    data = meta_data(backbone, n=4)
    params = backbone.set_trainable("xattn")
    # a large Adam ε keeps m̂/(√v̂+ε) smooth enough for central differences (at ε ≈ 0 it is sign(g))
    attack = AttackConfig(steps=2, batch_size=2, optimizer=optimizer, radius=0.05, trainable="xattn", eps=1e-3,
                          momentum=0.5 if optimizer == "sgd" else 0.0, clip_grad_norm=None)
    config = MetaConfig(attacks=[attack], batch_size=2, order="second_unrolled", **ASCENT_ONLY)
    with pytest.raises(ValueError, match="radius"):  # reverse mode has no adjoint of the rescaled step
        MetaConfig(attacks=[attack], order="second")
    objective = MetaObjective(backbone, config, data, params)
    plan = objective.plan(torch.Generator().manual_seed(0))
    grad = grads_of(objective, plan)
    theta = [p.detach().clone() for p in params]

    def value(values) -> float:  # −Σβ L(A(θ)) with the first-order (in-place) radius attack on a copy
        with torch.no_grad():
            for p, v in zip(params, values):
                p.copy_(v)
        first = MetaConfig(attacks=[attack], batch_size=2, **ASCENT_ONLY)
        runner = MetaObjective(backbone, first, data, params)
        runner.attacks.run(0, plan.inner, data.forget_train, frozen=params, config=attack)
        with torch.no_grad():
            out = -sum(config.beta_forget * plan.ascent["forget_test"].loss(backbone, data.forget_test)
                       + config.beta_related * plan.ascent["related"].loss(backbone, data.related) for _ in [0])
        runner.attacks.undo()
        return float(out)

    _check_directional_derivative(value, grad, theta, params)


@pytest.mark.parametrize("order", ["first", "second", "second_unrolled"])
def test_trajectory_ascent_is_the_mean_of_end_ascents_over_prefixes(order):
    dtype = torch.float64
    backbone = make_backbone("sd", dtype)
    data = meta_data(backbone, n=4)
    params = backbone.set_trainable("xattn")
    attack = AttackConfig(steps=4, batch_size=2, lr=1e-2, trainable="xattn" if order != "first" else "full")
    along = MetaConfig(attacks=[attack], batch_size=2, order=order, ascent_along="trajectory", trajectory_stride=2,
                       **ASCENT_ONLY)
    assert along.trajectory_points(4) == [2, 4] and along.trajectory_points(5) == [2, 4, 5]
    objective = MetaObjective(backbone, along, data, params)
    plan = objective.plan(torch.Generator().manual_seed(0))
    ours = grads_of(objective, plan)
    end = MetaObjective(backbone, along.model_copy(update={"ascent_along": "end"}), data, params)
    parts = [grads_of(end, dataclasses.replace(plan, inner=plan.inner[:k])) for k in (2, 4)]
    for a, b, c in zip(ours, *parts):
        torch.testing.assert_close(a, (b + c) / 2, rtol=1e-5, atol=1e-9)
    assert any(float(g.abs().max()) > 0 for g in ours)


@pytest.mark.parametrize("order", ["first", "second", "second_unrolled"])
def test_bounded_ascent_caps_and_saturates(order):
    dtype = torch.float64
    backbone = make_backbone("sd", dtype)
    data = meta_data(backbone, n=4)
    params = backbone.set_trainable("xattn")
    weights = dict(ASCENT_ONLY, beta_related=0.0)  # one ascent term: forget-test
    attack = AttackConfig(steps=2, batch_size=2, lr=1e-2, trainable="xattn")
    plain = MetaConfig(attacks=[attack], batch_size=2, order=order, **weights)
    objective = MetaObjective(backbone, plain, data, params)
    plan = objective.plan(torch.Generator().manual_seed(0))
    free = grads_of(objective, plan)
    loss = objective._ascent(plan)["ascent_forget_test"]
    for p in params:
        p.grad = None

    def bounded(kind: str, cap: float) -> list[torch.Tensor]:
        cfg = plain.model_copy(update={"ascent_bound": kind, "ascent_cap": cap})
        return grads_of(MetaObjective(backbone, cfg, data, params), plan)

    assert all(float(g.abs().max()) == 0 for g in bounded("cap", loss / 2))  # past the cap: no reward
    for a, b in zip(bounded("cap", loss * 2), free):
        torch.testing.assert_close(a, b)
    cap = loss * 0.8
    factor = 1 - math.tanh(loss / cap) ** 2  # d/dL c·tanh(L/c)
    for a, b in zip(bounded("tanh", cap), free):
        torch.testing.assert_close(a, factor * b, rtol=1e-4, atol=1e-9)
    tiny = copy.deepcopy(plain)
    assert tiny.bounded(torch.tensor(3.0)) == 3.0


def ascent_run(objective: MetaObjective, plan) -> tuple[list[torch.Tensor], dict[str, float]]:
    for p in objective.params:
        p.grad = None
    logged = objective._ascent(plan)
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in objective.params], logged


@pytest.mark.parametrize("order", ["first", "second", "second_fd", "second_unrolled"])
def test_relative_cap_is_r_times_the_unattacked_loss_on_the_same_draw(order):
    """``ascent_cap_ratio`` r: each ascent term's cap is r·L(θ; its own draw), the loss before the attack on the same
    batch, noise and timesteps (logged as ``cap_<set>``). With r between the two terms' attacked / unattacked loss
    ratios, the term past r·L(θ) gets no gradient and the one below keeps its unbounded gradient; under tanh each
    term's gradient is scaled by 1 − tanh²(L/c) with its own c."""
    dtype = torch.float64
    backbone = make_backbone("sd", dtype)
    data = meta_data(backbone, n=4)
    params = backbone.set_trainable("xattn")
    attack = AttackConfig(steps=2, batch_size=2, lr=1e-2, trainable="xattn")
    free = MetaConfig(attacks=[attack], batch_size=2, order=order, **ASCENT_ONLY)  # β_f 1, β_rel 0.5
    roles = {"forget_test": "beta_forget", "related": "beta_related"}
    plan = MetaObjective(backbone, free, data, params).plan(torch.Generator().manual_seed(0))
    with torch.no_grad():  # the unattacked model's losses on the ascent draws, computed independently
        before = {role: float(plan.ascent[role].loss(backbone, data.get(role))) for role in roles}

    def run(**update) -> tuple[list[torch.Tensor], dict[str, float]]:
        cfg = MetaConfig.model_validate({**free.model_dump(), **update})
        return ascent_run(MetaObjective(backbone, cfg, data, params), plan)

    both, logged = run()
    alone = {role: run(**{attr: 0.0 for r, attr in roles.items() if r != role})[0] for role in roles}
    ratio = {role: logged[f"ascent_{role}"] / before[role] for role in roles}
    past, below = sorted(roles, key=ratio.get, reverse=True)
    assert ratio[past] > 1.01 * ratio[below], ratio  # room for an r between them
    r = math.sqrt(ratio[past] * ratio[below])

    capped, capped_log = run(ascent_bound="cap", ascent_cap_ratio=r)
    for role in roles:
        assert capped_log[f"cap_{role}"] == pytest.approx(r * before[role], rel=1e-6)
    assert any(float((a - b).abs().max()) > 0 for a, b in zip(both, alone[below]))  # the capped term did count
    for a, b in zip(capped, alone[below]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-12)
    if order == "second_fd":  # finite-difference HVPs are not linear in the seed to 1e-4: the cap alone is checked
        return
    smooth, _ = run(ascent_bound="tanh", ascent_cap_ratio=r)
    factor = {role: 1 - math.tanh(logged[f"ascent_{role}"] / (r * before[role])) ** 2 for role in roles}
    for a, *parts in zip(smooth, *(alone[role] for role in roles)):
        expected = sum(factor[role] * g for role, g in zip(roles, parts))
        torch.testing.assert_close(a, expected, rtol=1e-4, atol=1e-9)


def test_relative_cap_along_the_trajectory_uses_one_cap_per_draw():
    """Along the trajectory every iterate's term on a draw is bounded by the same c = r·L(θ): the mean of the end
    objectives of the prefixes (each of which takes its cap at θ), not a cap re-taken at each iterate."""
    backbone = make_backbone("sd", torch.float64)
    data = meta_data(backbone, n=4)
    params = backbone.set_trainable("xattn")
    attack = AttackConfig(steps=4, batch_size=2, lr=1e-2, trainable="xattn")
    along = MetaConfig(attacks=[attack], batch_size=2, order="second", ascent_along="trajectory", trajectory_stride=2,
                       ascent_bound="tanh", ascent_cap_ratio=1.0, **ASCENT_ONLY)
    objective = MetaObjective(backbone, along, data, params)
    plan = objective.plan(torch.Generator().manual_seed(0))
    ours, logged = ascent_run(objective, plan)
    end = MetaObjective(backbone, along.model_copy(update={"ascent_along": "end"}), data, params)
    parts = [ascent_run(end, dataclasses.replace(plan, inner=plan.inner[:k])) for k in (2, 4)]
    for a, b, c in zip(ours, parts[0][0], parts[1][0]):
        torch.testing.assert_close(a, (b + c) / 2, rtol=1e-6, atol=1e-12)
    assert logged["cap_forget_test"] == parts[0][1]["cap_forget_test"] == parts[1][1]["cap_forget_test"]
    assert any(float(g.abs().max()) > 0 for g in ours)


def test_relative_cap_from_start_is_r_times_the_start_models_loss_after_theta_moved():
    """``ascent_cap_reference: start``: after two outer steps moved θ, each logged ``cap_<set>`` is r·L(θ0; its draw),
    the loss of a saved copy of the model the objective was built on, on the same batch, noise and timesteps — not
    r·L(θ) of the moved model (what ``current`` logs on the same plan)."""
    backbone = make_backbone("sd")
    data = meta_data(backbone, n=4)
    params = backbone.set_trainable("full")
    start_unet = copy.deepcopy(backbone.unet)  # θ0, kept apart as an independent model
    r = 2.5
    config = MetaConfig(attacks=[AttackConfig(steps=1, batch_size=2, lr=1e-2)], batch_size=2, ascent_bound="cap",
                        ascent_cap_ratio=r, ascent_cap_reference="start", **ASCENT_ONLY)
    objective = MetaObjective(backbone, config, data, params)
    assert objective.start is not None
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    for step in (1, 2):
        objective.step(step, gen, optimizer)
    plan = objective.plan(gen)
    roles = ("forget_test", "related")
    with torch.no_grad():  # computed independently: the saved start model and the moved model on the same draws
        at_start = {role: float(plan.ascent[role].loss(backbone, data.get(role), unet=start_unet)) for role in roles}
        moved = {role: float(plan.ascent[role].loss(backbone, data.get(role))) for role in roles}
    _, logged = ascent_run(objective, plan)
    current = MetaObjective(backbone, config.model_copy(update={"ascent_cap_reference": "current"}), data, params)
    assert current.start is None  # no copy of θ0 without a use for it
    _, logged_current = ascent_run(current, plan)
    for role in roles:
        assert logged[f"cap_{role}"] == pytest.approx(r * at_start[role], rel=1e-5)
        assert logged_current[f"cap_{role}"] == pytest.approx(r * moved[role], rel=1e-5)
        assert abs(at_start[role] - moved[role]) > 1e-3 * at_start[role]  # θ did move: the two references differ
    with pytest.raises(ValueError, match="ascent_cap_reference 'start' applies to a relative bound only"):
        MetaConfig(ascent_bound="cap", ascent_cap=0.05, ascent_cap_reference="start")
    with pytest.raises(ValueError, match="ascent_cap_reference 'start' applies to a relative bound only"):
        MetaConfig(ascent_cap_reference="start")
    # the default is left out of the settings dump (stages recorded before the option keep their settings key)
    assert "ascent_cap_reference" not in config.model_copy(update={"ascent_cap_reference": "current"}).model_dump()
    assert config.model_dump(mode="json")["ascent_cap_reference"] == "start"
    assert MetaConfig.model_validate(config.model_dump(mode="json")) == config


def test_relative_cap_validation_and_settings_record():
    with pytest.raises(ValueError, match="exactly one of ascent_cap .* and ascent_cap_ratio"):
        MetaConfig(ascent_bound="cap")
    with pytest.raises(ValueError, match="exactly one of ascent_cap .* and ascent_cap_ratio"):
        MetaConfig(ascent_bound="tanh", ascent_cap=0.05, ascent_cap_ratio=2.5)
    with pytest.raises(ValueError, match="greater than 0"):
        MetaConfig(ascent_bound="cap", ascent_cap_ratio=0.0)
    relative = MetaConfig(ascent_bound="cap", ascent_cap_ratio=2.5)
    assert relative.relative_cap and relative.cap_for(0.02) == pytest.approx(0.05)
    with pytest.raises(ValueError, match="unattacked"):
        relative.cap_for(None)
    absolute = MetaConfig(ascent_bound="cap", ascent_cap=0.05)
    assert not absolute.relative_cap and absolute.cap_for(0.02) == 0.05
    # recorded when used (settings hash); a config without it records exactly as before the option existed
    assert relative.model_dump()["ascent_cap_ratio"] == 2.5
    assert "ascent_cap_ratio" not in absolute.model_dump(mode="json")
    assert MetaConfig.model_validate(relative.model_dump(mode="json")) == relative


def test_reverse_mode_distribution_over_parameter_spaces():
    """A distribution mixing the full UNet and a subset: each attack keeps its own gradient record."""
    backbone = make_backbone("sd", torch.float64)
    data = meta_data(backbone, n=4)
    params = backbone.set_trainable("full")
    attacks = [AttackConfig(steps=2, batch_size=2, lr=1e-3), AttackConfig(steps=3, batch_size=2, lr=1e-3, trainable="xattn")]
    config = MetaConfig(attacks=attacks, order="second", batch_size=2, **ASCENT_ONLY)
    objective = MetaObjective(backbone, config, data, params)
    unrolled = MetaObjective(backbone, config.model_copy(update={"order": "second_unrolled"}), data, params)
    gen = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(12):
        plan = objective.plan(gen)
        if plan.attack in seen:
            continue
        seen.add(plan.attack)
        for a, b in zip(grads_of(objective, plan), grads_of(unrolled, plan)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-10)
    assert seen == {0, 1}


@pytest.mark.parametrize("anchor_to", ["current", "start"])
@pytest.mark.parametrize("order", ["first", "second", "second_unrolled"])
def test_anchored_forget_term_holds_the_attacked_prediction_at_the_released_one(order, anchor_to):
    """forget_term anchor: +β_f·‖ε_A(θ)(x_t, c) − sg ε_anchor(x_t, c)‖² on forget-test, the target taken before the
    attack at θ (anchor_to current) or at θ0, the weights the objective was built with, after θ has moved (start);
    exact orders against central differences of that function with the target held fixed, first order against the
    gradient at the attacked weights."""
    dtype = torch.float64
    backbone = make_backbone("sd", dtype)
    data = meta_data(backbone, n=4)
    params = backbone.set_trainable("xattn")
    start_unet = copy.deepcopy(backbone.unet)  # θ0, kept apart as an independent model
    # a large Adam ε keeps m̂/(√v̂+ε) smooth enough for central differences (at ε ≈ 0 it is sign(g))
    attack = AttackConfig(steps=2, batch_size=2, lr=1e-2, trainable="xattn" if order != "first" else "full", eps=1e-3,
                          clip_grad_norm=None)
    config = MetaConfig(attacks=[attack], batch_size=2, order=order, forget_term="anchor", anchor_to=anchor_to,
                        **ASCENT_ONLY)
    objective = MetaObjective(backbone, config, data, params)
    if anchor_to == "start":  # θ moves away from θ0 after the objective was built
        with torch.no_grad():
            g = torch.Generator().manual_seed(3)
            for p in params:
                p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    plan = objective.plan(torch.Generator().manual_seed(0))
    forget, related = plan.ascent["forget_test"], plan.ascent["related"]
    now = forget.anchored(backbone, data.forget_test, objective.shard).target  # ε_θ on the batch, now
    with torch.no_grad():
        assert float(dataclasses.replace(forget, target=now).loss(backbone, data.forget_test)) < 1e-20
        target = now
        if anchor_to == "start":  # ε_θ0: the saved copy's prediction, away from ε_θ
            x0, cond = forget._inputs(backbone, data.forget_test)
            x_t = backbone.noise_scheduler.add_noise(x0, forget.noise.to(dtype), forget.timesteps)
            target = backbone.predict_noise(x_t, forget.timesteps, cond, unet=start_unet)
            assert float(((target - now) ** 2).mean()) > 1e-3 * float((now ** 2).mean())
    grad = grads_of(objective, plan)
    logged = objective._ascent(plan)
    for p in params:
        p.grad = None
    assert "anchor_forget_test" in logged and "ascent_forget_test" not in logged
    theta = [p.detach().clone() for p in params]
    fixed = dataclasses.replace(forget, target=target)
    runner = MetaObjective(backbone, config.model_copy(update={"order": "first"}), data, params)

    def attacked(values):
        with torch.no_grad():
            for p, v in zip(params, values):
                p.copy_(v)
        runner.attacks.run(0, plan.inner, data.forget_train, frozen=params, config=attack)

    def value(values) -> float:  # β_f·‖ε_A(θ) − target‖² − β_rel·L(A(θ); related), target fixed
        attacked(values)
        with torch.no_grad():
            out = (config.beta_forget * fixed.loss(backbone, data.forget_test)
                   - config.beta_related * related.loss(backbone, data.related))
        runner.attacks.undo()
        return float(out)

    assert logged["anchor_forget_test"] == pytest.approx(
        (value(theta) + config.beta_related * logged["ascent_related"]) / config.beta_forget, rel=1e-5)
    assert logged["anchor_forget_test"] > 0  # the attack moved the forget prediction
    if order == "first":  # the gradient at the attacked weights, applied to θ
        attacked(theta)
        set_requires_grad(params, True)
        out = (config.beta_forget * fixed.loss(backbone, data.forget_test)
               - config.beta_related * related.loss(backbone, data.related))
        expected = torch.autograd.grad(out, params)
        runner.attacks.undo()
        for a, b in zip(grad, expected):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
        return
    _check_directional_derivative(value, grad, theta, params)


def test_anchor_to_start_keeps_the_target_of_the_start_model_through_outer_steps():
    """anchor_to start: after two outer steps (θ moved, a LoRA attack's adapters wrapped the UNet's layers) the
    forget term's target is still the prediction of a saved copy of the model the objective was built on; under
    anchor_to current it is the moved model's own; the validator and the settings dump know the option."""
    backbone = make_backbone("sd")
    data = meta_data(backbone, n=4)
    params = backbone.set_trainable("full")
    start_unet = copy.deepcopy(backbone.unet)
    attacks = [AttackConfig(steps=1, batch_size=2, lr=1e-2), AttackConfig(steps=1, batch_size=2, lr=1e-2, trainable="lora")]
    config = MetaConfig(attacks=attacks, batch_size=2, forget_term="anchor", anchor_to="start", **ASCENT_ONLY)
    objective = MetaObjective(backbone, config, data, params)
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    for step in (1, 2):
        objective.step(step, gen, optimizer)
    assert objective.attacks.has_lora  # the UNet's parameter names changed since θ0 was taken
    plan = objective.plan(gen)
    forget = plan.ascent["forget_test"]
    (term,) = [t for t in objective._outer_terms(plan) if t.name == "anchor_forget_test"]
    with torch.no_grad():
        expected = forget.anchored(backbone, data.forget_test, objective.shard, unet=start_unet).target
        moved = forget.anchored(backbone, data.forget_test, objective.shard).target
    torch.testing.assert_close(term.draw.target, expected, rtol=1e-5, atol=1e-6)
    assert float(((moved - expected) ** 2).mean()) > 1e-3 * float((expected ** 2).mean())  # θ did move
    objective.close()  # the adapters are removed; θ stays where the steps took it
    current = MetaObjective(backbone, config.model_copy(update={"anchor_to": "current", "attacks": attacks[:1]}),
                            data, params)
    (term,) = [t for t in current._outer_terms(plan) if t.name == "anchor_forget_test"]
    torch.testing.assert_close(term.draw.target, moved)
    with pytest.raises(ValueError, match="anchor_to"):
        MetaConfig(anchor_to="start")  # forget_term ascent has no anchor
    # the default is left out of the settings dump (stages recorded before the option keep their settings key)
    assert "anchor_to" not in MetaConfig().model_dump(mode="json")
    assert config.model_dump(mode="json")["anchor_to"] == "start"


def _check_directional_derivative(value, grad, theta, params, eps: float = 1e-5) -> None:
    """``grad`` · d equals the central difference of ``value`` along a fixed random direction d at ``theta``
    (the parameters are put back to ``theta`` afterwards)."""
    direction = [torch.randn_like(t, generator=torch.Generator().manual_seed(i)) for i, t in enumerate(theta)]
    plus = value([t + eps * d for t, d in zip(theta, direction)])
    minus = value([t - eps * d for t, d in zip(theta, direction)])
    with torch.no_grad():
        for p, t in zip(params, theta):
            p.copy_(t)
    numeric = (plus - minus) / (2 * eps)
    analytic = float(sum((g * d).sum() for g, d in zip(grad, direction)))
    assert analytic == pytest.approx(numeric, rel=1e-4, abs=1e-9)
