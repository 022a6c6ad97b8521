"""Base unlearning methods: registry, ESD/SDD losses against their formulas, UCE/RECE edits against least squares."""

from __future__ import annotations

import copy

import pytest
import torch

from metaunlearn.backbones.sd import StableDiffusionBackbone
from metaunlearn.backbones.sdxl import StableDiffusionXLBackbone
from metaunlearn.errors import UserError
from metaunlearn.methods import METHODS, UnlearnInputs, get_method
from metaunlearn.methods import closed_form as cf
from metaunlearn.methods.config import MethodSpec
from metaunlearn.methods.esd import ESD, EsdConfig
from metaunlearn.methods.rece import RECE, ReceConfig, derive_embeddings
from metaunlearn.methods.sdd import SDD, SddConfig
from metaunlearn.methods.uce import UCE, UceConfig
from metaunlearn.testing.tiny_pipelines import build_tiny_sd, build_tiny_sdxl

FORGET = ["a photo of a nude person", "naked body"]
PRESERVE = ["a dog in the park", "a red car on the street"]


def make_backbone(family: str, dtype: torch.dtype = torch.float32):
    if family == "sd":
        return StableDiffusionBackbone(build_tiny_sd().to(dtype), source="tiny-sd")
    return StableDiffusionXLBackbone(build_tiny_sdxl().to(dtype), source="tiny-sdxl")


@pytest.fixture(params=["sd", "sdxl"])
def backbone(request):
    return make_backbone(request.param)


@pytest.fixture(params=["sd", "sdxl"])
def backbone64(request):
    """In float64: a loss recomputed from its formula (other batches, other reduction order) agrees to far below
    the tolerance, on any thread count."""
    return make_backbone(request.param, torch.float64)


def perturb(params, scale=0.05, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(scale * torch.randn(p.shape, generator=g))


# ---- registry and configs ------------------------------------------------------------------------------------------
def test_registry_and_unknown_method():
    assert set(METHODS) == {"esd", "sdd", "uce", "rece"}
    assert get_method("rece") is RECE
    with pytest.raises(UserError, match=r"^unknown method 'x' \(choose esd, sdd, uce, rece\)$"):
        get_method("x")


def test_method_spec_resolves_and_validates_params():
    spec = MethodSpec(name="esd", params={"eta": 3, "variant": "x"})
    assert spec.params == {**EsdConfig().model_dump(), "eta": 3.0, "variant": "x"}
    assert spec.build().trainable_subset == "xattn"
    with pytest.raises(ValueError, match="etta"):
        MethodSpec(name="esd", params={"etta": 3})
    with pytest.raises(ValueError, match="unknown method 'foo'"):
        MethodSpec(name="foo")
    assert MethodSpec(name="rece").params["epochs"] == ReceConfig().epochs


# ---- ESD ----------------------------------------------------------------------------------------------------------
def _capture_sample(loss):
    """Wrap the loss's partial sampler so the test sees the x_t, t and sampling network it used."""
    seen = {}
    original = loss.sampler.sample

    def sample(cond, null, stop, generator, unet=None):
        x_t, t = original(cond, null, stop, generator, unet=unet)
        seen.update(x_t=x_t, t=t, unet=unet, stop=stop, cond=cond)
        return x_t, t

    loss.sampler.sample = sample
    return seen


def test_esd_loss_equals_formula_with_frozen_teacher(backbone64):
    backbone = backbone64
    teacher = copy.deepcopy(backbone.unet)  # the original weights, independently
    eta = 3.0
    loss_fn = ESD(EsdConfig(variant="x", eta=eta, ddim_steps=4)).apply(UnlearnInputs(backbone, FORGET))
    params = backbone.set_trainable(loss_fn.trainable_subset)
    assert loss_fn.trainable_subset == "xattn"
    perturb(params)  # the student has moved away from the teacher
    seen = _capture_sample(loss_fn)
    loss, terms = loss_fn(0, torch.Generator().manual_seed(3))
    assert seen["unet"] is None  # x_t drawn by the student itself
    x_t, t, cond = seen["x_t"], seen["t"], seen["cond"]
    assert 0 <= seen["stop"] < 4
    null = backbone.null_cond(x_t.shape[0])
    with torch.no_grad():
        e0 = backbone.predict_noise(x_t, t, null, unet=teacher)
        ep = backbone.predict_noise(x_t, t, cond, unet=teacher)
        en = backbone.predict_noise(x_t, t, cond)
    expected = torch.nn.functional.mse_loss(en, e0 - eta * (ep - e0))
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-8)
    assert terms["esd"] == pytest.approx(float(expected), rel=1e-5)
    loss.backward()
    assert all(p.grad is not None for p in params)
    # t is the exact DDIM timestep of the reached state
    assert int(t[0]) == int(loss_fn.sampler.scheduler.timesteps[seen["stop"]])


def test_esd_variants_choose_subsets():
    assert [ESD(EsdConfig(variant=v)).trainable_subset for v in "uxf"] == ["noxattn", "xattn", "full"]


# ---- SDD ----------------------------------------------------------------------------------------------------------
def test_sdd_loss_formula_and_ema(backbone):
    decay = 0.9
    loss_fn = SDD(SddConfig(ddim_steps=3, ema_decay=decay)).apply(UnlearnInputs(backbone, FORGET))
    params = backbone.set_trainable(loss_fn.trainable_subset)
    start = [p.detach().clone() for p in params]
    perturb(params)
    seen = _capture_sample(loss_fn)
    loss, terms = loss_fn(0, torch.Generator().manual_seed(5))
    assert seen["unet"] is loss_fn.teacher  # x_t drawn by the EMA teacher
    x_t, t, cond = seen["x_t"], seen["t"], seen["cond"]
    with torch.no_grad():
        target = backbone.predict_noise(x_t, t, backbone.null_cond(x_t.shape[0]))
        pred = backbone.predict_noise(x_t, t, cond)
    torch.testing.assert_close(loss.detach(), torch.nn.functional.mse_loss(pred, target), rtol=1e-5, atol=1e-8)
    loss.backward()  # the target carries no gradient: only the conditional branch does
    assert any(float(p.grad.abs().sum()) > 0 for p in params)
    loss_fn.after_step()
    for ema, s, p in zip(loss_fn.ema.values(), start, params):
        torch.testing.assert_close(ema, decay * s + (1 - decay) * p.detach())
    state = {k: v.clone() for k, v in loss_fn.state_dict().items()}
    loss_fn.after_step()
    loss_fn.load_state_dict(state)
    assert all(torch.equal(v, state[f"ema.{i}"]) for i, v in enumerate(loss_fn.ema.values()))


# ---- UCE ----------------------------------------------------------------------------------------------------------
def _tokens(backbone, prompts):
    tok = backbone.pipe.tokenizer
    return [len(ids) for ids in tok(prompts)["input_ids"]]  # positions 0..EOS


def _reference_uce(backbone, w_old, forget, targets, preserve, cfg: UceConfig):
    """min s_e Σ‖W c_i − W_old c*_i‖² + λ Σ‖W c_j − W_old c_j‖² + μ‖W − W_old‖² via lstsq on stacked rows."""
    enc = lambda ps: backbone.encode_prompts(ps)["encoder_hidden_states"].double()  # noqa: E731
    e, tgt, pr = enc(forget), enc(targets * len(forget) if len(targets) == 1 else targets), enc(preserve)
    ne, nt, npr = _tokens(backbone, forget), _tokens(backbone, targets * len(forget)), _tokens(backbone, preserve)
    rows_in, rows_out = [], []
    w = w_old.double()
    for i in range(len(forget)):
        n = max(ne[i], nt[i])
        rows_in.append(cfg.erase_scale**0.5 * e[i, :n])
        rows_out.append(cfg.erase_scale**0.5 * tgt[i, :n] @ w.T)
    for j in range(len(preserve)):
        rows_in.append(cfg.preserve_scale**0.5 * pr[j, : npr[j]])
        rows_out.append(cfg.preserve_scale**0.5 * pr[j, : npr[j]] @ w.T)
    d = w.shape[1]
    rows_in.append(cfg.lamb**0.5 * torch.eye(d, dtype=torch.float64))
    rows_out.append(cfg.lamb**0.5 * w.T)
    a, b = torch.cat(rows_in), torch.cat(rows_out)
    return torch.linalg.lstsq(a, b).solution.T  # W_newᵀ solves A W_newᵀ = B


@pytest.mark.parametrize("target", ["", "a portrait of a man"])
def test_uce_edit_equals_regularised_least_squares(backbone, target):
    cfg = UceConfig(target_prompts=[target], erase_scale=2.0, preserve_scale=0.5, lamb=0.3)
    layers = cf.cross_attention_projections(backbone.unet)
    names = [n for n, _ in layers]
    assert names and all(n.endswith(("attn2.to_k", "attn2.to_v")) for n in names)
    before = {n: p.detach().clone() for n, p in backbone.unet.named_parameters()}
    old = [layer.weight.detach().clone() for _, layer in layers]
    UCE(cfg).apply(UnlearnInputs(backbone, FORGET, PRESERVE))
    for (name, layer), w_old in zip(layers, old):
        ref = _reference_uce(backbone, w_old, FORGET, [target], PRESERVE, cfg)
        torch.testing.assert_close(layer.weight.double(), ref, rtol=1e-4, atol=1e-5)
    changed = {n for n, p in backbone.unet.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {f"{n}.weight" for n in names}  # nothing but the K/V projections moved


def test_uce_all_tokens_and_singular_system(backbone):
    UCE(UceConfig(tokens="all")).apply(UnlearnInputs(backbone, FORGET))
    with pytest.raises(UserError, match="singular"):
        UCE(UceConfig(lamb=0.0, preserve_scale=0.0)).apply(UnlearnInputs(backbone, FORGET))
    with pytest.raises(UserError, match="one target prompt or one per erased prompt"):
        UCE(UceConfig(target_prompts=["a", "b", "c"])).apply(UnlearnInputs(backbone, FORGET))


# ---- RECE ---------------------------------------------------------------------------------------------------------
def test_rece_derived_embedding_is_the_regularised_argmin():
    torch.manual_seed(0)
    d, layers = 6, [torch.randn(5, 6, dtype=torch.float64), torch.randn(7, 6, dtype=torch.float64)]
    factor = torch.eye(d, dtype=torch.float64) + 0.3 * torch.randn(d, d, dtype=torch.float64)
    gram = sum(w.T @ w for w in layers)
    concept = torch.randn(3, d, dtype=torch.float64)
    derived, residual = derive_embeddings(concept, factor, gram, adv_reg=0.2)
    rho = 0.2 * torch.trace(factor.T @ gram @ factor) / d
    for c, c_new in zip(concept, derived):
        a = torch.cat([w @ factor for w in layers] + [rho.sqrt() * torch.eye(d, dtype=torch.float64)])
        b = torch.cat([w @ c for w in layers] + [torch.zeros(d, dtype=torch.float64)])
        torch.testing.assert_close(c_new, torch.linalg.lstsq(a, b.unsqueeze(1)).solution.squeeze(1))
    num = sum(((w @ factor @ derived.T) - (w @ concept.T)).pow(2).sum() for w in layers)
    den = sum((w @ concept.T).pow(2).sum() for w in layers)
    assert residual == pytest.approx(float(num / den))


def test_rece_iterates_uce_with_derived_embeddings(backbone):
    state = {k: v.clone() for k, v in backbone.unet.state_dict().items()}
    layers = cf.cross_attention_projections(backbone.unet)
    inputs = UnlearnInputs(backbone, FORGET, PRESERVE)
    RECE(ReceConfig(epochs=0)).apply(inputs)
    rece0 = [layer.weight.detach().clone() for _, layer in layers]
    backbone.unet.load_state_dict(state)
    UCE(UceConfig()).apply(inputs)
    assert all(torch.equal(a, layer.weight) for a, (_, layer) in zip(rece0, layers))  # epochs 0 == UCE
    backbone.unet.load_state_dict(state)
    method = RECE(ReceConfig(epochs=2))
    method.apply(inputs)
    assert set(method.edit_stats) == {"regen_0", "regen_1"}
    # the embedding derived against the UCE edit no longer regenerates the concept after RECE erased it
    w_old = [state[f"{n}.weight"].double() for n, _ in layers]
    gram = sum(w.T @ w for w in w_old)
    erase = cf.erase_tokens(backbone, FORGET, [""], "eos")
    concept = erase.inputs
    cfg = UceConfig()
    x_uce = cf.edit_factor(erase, cf.preserve_tokens(backbone, PRESERVE, "eos"), cfg.erase_scale, cfg.preserve_scale, cfg.lamb)
    derived, _ = derive_embeddings(concept, x_uce, gram, ReceConfig().adv_reg)

    def regen(weights):
        return sum(((derived @ w.double().T) - (concept @ wo.T)).pow(2).sum() for w, wo in zip(weights, w_old))

    assert regen([layer.weight for _, layer in layers]) > regen(rece0)
