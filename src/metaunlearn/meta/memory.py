"""The meta step's memory plan: predicted peak device memory, by phase, before anything is loaded.

Parameter-sized buffers are counted exactly from the model's parameter shapes; activations are measured by tracing
one forward + backward (or one double backward) of the UNet on PyTorch's ``meta`` device at the configured batch and
latent size (:mod:`metaunlearn.meta.activations`) — no weights are loaded and nothing is computed.

Phases (S_x: the attack's parameters x, P: the outer parameters θ, Z: outer parameters the attack does not move):

Every phase adds the start weights θ0 (one copy of P) with ``forget_term: anchor``, ``anchor_to: start``, or with
``ascent_cap_reference: start``.

* first order — attack: weights + outer optimizer state + saved x + inner state + inner gradients + activations;
  ascent/retain: … + outer gradients + activations of a term batch (the terms run one after the other, from the
  second on with the outer gradients held).
* second order — the ascent terms at θ' are one loss, so their graphs are alive together (n terms × activations).
* second order (reverse mode) — the same attack, then per inner step a replay (inner state, ā_x and the adjoints
  of the inner state, one scratch copy) and one Hessian-vector product (ā_x, adjoint state, w, the graph gradient g,
  Z's gradients, double-backward activations). The inner-step gradients live in host memory with ``offload``
  (device memory then does not grow with M), and so does the saved x (every order).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from metaunlearn.meta.activations import activation_bytes, parameter_bytes
from metaunlearn.meta.config import MetaConfig

OVERLAP = 0.25
"""During a backward pass the saved activations are freed as the gradients appear: measured on the SD-1.4 UNet
(batch 1, 32×32 and 64×64 latents) the peak above the weights is max(A, G + 0.25·A) for activations A, gradients G
(3386 and 3779 MiB measured; 3397 and 3747 predicted)."""


def _backward_peak(activations: int, gradients: int) -> int:
    return max(activations, gradients + int(OVERLAP * activations))


def _accumulated_peak(activations: int, gradients: int, terms: int) -> int:
    """``terms`` forward + backward passes one after the other, each adding into the same ``.grad``: from the second
    on, the gradients are held through the whole forward pass."""
    return _backward_peak(activations, gradients) if terms <= 1 else gradients + activations


@dataclass
class MemoryPlan:
    """Predicted peak memory of one meta step (bytes) and what it is made of."""

    phases: dict[str, int] = field(default_factory=dict)
    parts: dict[str, int] = field(default_factory=dict)
    host: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def phase(self) -> str:
        return max(self.phases, key=self.phases.get)

    @property
    def peak(self) -> int:
        return max(self.phases.values())

    def fits(self, device_gib: float) -> bool:
        return self.peak <= device_gib * 2**30

    @property
    def runtime(self) -> int:
        return self.parts.get("runtime", 0)

    @property
    def tensors(self) -> int:
        """The predicted peak of live tensors: what ``torch.cuda.max_memory_allocated`` would report."""
        return self.peak - self.runtime

    def lines(self, device_gib: float | None = None) -> list[str]:
        out = [f"meta step memory plan: peak {_size(self.peak)} ({self.phase})"
               + (f", host {_size(self.host)}" if self.host else "")]
        if self.runtime:
            out.append(f"  = tensors {_size(self.tensors)} (live tensors at the peak: a GPU allocator's max allocated) "
                       f"+ runtime {_size(self.runtime)} (this process's resident memory before the step)")
        else:
            out.append("  tensors only (live tensors at the peak: torch.cuda.max_memory_allocated); the CUDA context "
                       "and the allocator's cached blocks come on top")
        out.append("  " + ", ".join(f"{k} {_size(v)}" for k, v in self.parts.items() if k != "runtime"))
        out.append("  phases: " + ", ".join(f"{k} {_size(v)}" for k, v in self.phases.items()))
        out += [f"  note: {n}" for n in self.notes]
        if device_gib is not None:
            verdict = "fits" if self.fits(device_gib) else "does NOT fit"
            out.append(f"  {verdict} in --device-memory {device_gib:g} GiB")
        return out


def _size(n: int) -> str:
    if n >= 2**30:
        return f"{n / 2**30:.2f} GiB"
    return f"{n / 2**20:.0f} MiB" if n >= 10 * 2**20 else f"{n / 2**20:.1f} MiB"


# ---- the plan ---------------------------------------------------------------------------------------------------------
def _lora_bytes(unet: torch.nn.Module, rank: int, targets: list[str]) -> int:
    total = 0
    for name, module in unet.named_modules():
        if any(name == t or name.endswith("." + t) for t in targets):
            weight = getattr(module, "weight", None)
            if weight is not None and weight.dim() >= 2:
                total += rank * (weight.shape[0] + weight.shape[1]) * weight.element_size()
    return total


def plan_meta_memory(
    backbone,
    config: MetaConfig,
    defence_subset: str,
    *,
    inner_batch: int | None = None,
    batch: int | None = None,
    latent_shape: tuple[int, ...],
    cond_shapes: Mapping[str, tuple[int, ...]],
    mixed_precision: str = "no",
    gradient_checkpointing: bool = False,
    outer_optimizer: str = "adamw",
    other_modules_bytes: int | None = None,
    data_bytes: int = 0,
    runtime_bytes: int = 0,
    base_loss: bool = True,
) -> MemoryPlan:
    """The plan for one meta step of ``config`` on ``backbone`` (its UNet may live on the meta device).

    ``defence_subset``: the outer parameters θ (a :data:`~metaunlearn.backbones.base.TRAINABLE_SUBSETS` name).
    ``other_modules_bytes``: text encoder(s) and VAE on the device (default: the backbone's own modules).
    ``runtime_bytes``: a constant for the framework itself (the CUDA context, or the process on CPU).
    ``base_loss``: whether the method adds a loss to the step (a closed-form edit does not).
    """
    if config.needs_attack and len(config.attacks) > 1:  # a distribution: the step that peaks is the largest attack's
        plans = [plan_meta_memory(backbone, config.model_copy(update={"attacks": [a]}), defence_subset,
                                  inner_batch=inner_batch, batch=batch, latent_shape=latent_shape,
                                  cond_shapes=cond_shapes, mixed_precision=mixed_precision,
                                  gradient_checkpointing=gradient_checkpointing, outer_optimizer=outer_optimizer,
                                  other_modules_bytes=other_modules_bytes, data_bytes=data_bytes,
                                  runtime_bytes=runtime_bytes, base_loss=base_loss) for a in config.attacks]
        largest = max(plans, key=lambda p: p.peak)
        largest.host = max(p.host for p in plans)
        return largest
    plan = MemoryPlan()
    unet = backbone.unet
    attack = config.attacks[0] if config.attacks else None
    inner_batch = inner_batch or (attack.batch_size if attack else 1)
    batch = batch or config.batch_size
    weights = parameter_bytes(unet.parameters())
    if other_modules_bytes is None:  # the pipeline's other modules (a backbone holds them in its ``pipe``)
        holder = getattr(backbone, "pipe", backbone)
        other_modules_bytes = sum(parameter_bytes(m.parameters()) + parameter_bytes(m.buffers()) for m in
                                  (getattr(holder, n, None) for n in ("vae", "text_encoder", "text_encoder_2"))
                                  if m is not None)
    outer = list(dict((id(p), p) for _, p in backbone.named_trainable(defence_subset)).values())
    P = parameter_bytes(outer)
    plan.parts = {"runtime": runtime_bytes} if runtime_bytes else {}
    plan.parts["weights"] = weights + other_modules_bytes + data_bytes
    optimizer_state = 2 * P if outer_optimizer == "adamw" else 2 * P // 4 + P // 64
    plan.parts["outer optimizer"] = optimizer_state
    act_dtype = torch.bfloat16 if mixed_precision == "bf16" else torch.float32
    act = dict(latent_shape=latent_shape, cond_shapes=cond_shapes, checkpointing=gradient_checkpointing, dtype=act_dtype)
    a_term = activation_bytes(unet, batch=batch, **act)
    base = runtime_bytes + plan.parts["weights"] + optimizer_state
    if mixed_precision == "bf16":
        base += weights // 2  # autocast's bf16 copies of the weights, cached for a forward with grad
        plan.notes.append("bf16 autocast: activations traced in bf16, plus the autocast cache of bf16 weights")
    if config.needs_start_weights:  # forget anchor's target / relative caps' reference: θ as the meta stage began
        plan.parts["start weights θ0"] = P
        base += P
    n_ascent = sum(w > 0 for w in (config.beta_forget, config.beta_related, config.beta_irrelevant))
    n_retain = sum(w > 0 for w in (config.gamma_irrelevant, config.gamma_related)) + (base_loss and config.base_weight > 0)
    if not config.needs_attack:
        plan.phases["retain"] = base + _accumulated_peak(a_term, P, n_retain)
        return plan
    if attack.trainable == "lora":
        X = _lora_bytes(unet, attack.lora_rank, attack.lora_targets)
        Z = P
        saved = 0  # adapters start from their initial values, kept anyway
        base += X
    else:
        attacked = {id(p): p for _, p in backbone.named_trainable(attack.trainable)}
        X = parameter_bytes(attacked.values())
        Z = parameter_bytes(p for p in outer if id(p) not in attacked)
        saved = X
    inner_state = 2 * X if attack.optimizer == "adamw" else (X if attack.momentum > 0 else 0)
    plan.parts.update({"attack params": X, "inner state": inner_state})
    a_inner = activation_bytes(unet, batch=inner_batch, **act)
    offload = config.offload
    if offload:
        plan.host = saved
        saved = 0
    steps = attack.steps or 1
    persistent = base + saved + inner_state
    plan.phases["attack"] = persistent + _backward_peak(a_inner, X)
    # first order: every ascent and retain term adds into .grad; second order: the retain terms add to the meta gradient
    terms = n_ascent + n_retain if config.order == "first" else 1 + n_retain
    plan.phases["ascent/retain"] = persistent + _accumulated_peak(a_term, P, terms)
    plan.parts["activations (inner batch)"] = a_inner
    if config.order == "first":
        return plan
    if config.order == "second_unrolled":
        a2 = activation_bytes(unet, batch=inner_batch, double_backward=True, math_attention=True, **act)
        plan.phases["unrolled"] = persistent + steps * (a2 + 4 * X) + a_term
        plan.notes.append("second_unrolled: every inner step's graph stays alive (grows with M)")
        return plan
    trajectory = steps * X
    if offload:
        plan.host += trajectory
    else:
        persistent += trajectory
        plan.phases["attack"] += trajectory
        plan.phases["ascent/retain"] += trajectory
    adj_state = 2 * X if attack.optimizer == "adamw" else (X if attack.momentum > 0 else 0)
    plan.phases["ascent at θ'"] = persistent + _backward_peak(max(n_ascent, 1) * a_term, X + Z)
    plan.phases["reverse: replay"] = persistent + X + adj_state + X + Z
    reverse = persistent - inner_state + X + adj_state + X + Z  # ā_x, adjoint state, w; inner state released
    if config.order == "second_fd":
        plan.phases["reverse: HVP"] = reverse + _backward_peak(a_inner, X)
    else:
        a2 = activation_bytes(unet, batch=inner_batch, double_backward=True, **act)
        plan.phases["reverse: HVP"] = reverse + X + a2  # + the graph gradient g
        plan.parts["double-backward activations"] = a2
    return plan


def plan_from_unet_config(unet_config: Mapping, *args, **kwargs) -> MemoryPlan:
    """:func:`plan_meta_memory` for a UNet given by its ``config.json`` (built on the meta device)."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(dict(unet_config))
    return plan_meta_memory(_MetaBackbone(unet), *args, **kwargs)


class _MetaBackbone:
    """Just what the plan needs of a backbone: the UNet and its trainable subsets."""

    def __init__(self, unet) -> None:
        self.unet = unet

    def named_trainable(self, subset: str = "full"):
        from metaunlearn.backbones.base import Backbone

        return Backbone.named_trainable(self, subset)


def _folder_module_bytes(folder: Path, components=("vae", "text_encoder", "text_encoder_2")) -> int:
    """fp32 bytes of the floating-point weights of ``components`` (read from safetensors headers; nothing loaded)."""
    from safetensors import safe_open

    total = 0
    for component in components:
        for path in (Path(folder) / component).glob("*.safetensors"):
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    part = f.get_slice(key)
                    if part.get_dtype().startswith(("F", "BF")):
                        n = 1
                        for d in part.get_shape():
                            n *= d
                        total += 4 * n
    return total


def plan_for_model_folder(
    folder: str | Path,
    config: MetaConfig,
    defence_subset: str,
    *,
    mixed_precision: str = "no",
    gradient_checkpointing: bool = False,
    outer_optimizer: str = "adamw",
    runtime_bytes: int = 0,
    base_loss: bool = True,
) -> MemoryPlan:
    """The plan for a diffusers model folder: the UNet from its ``config.json`` (on the meta device), the text
    encoder(s) and VAE from their safetensors headers, latent and conditioning shapes from the configs."""
    folder = Path(folder)
    unet_config = json.loads((folder / "unet" / "config.json").read_text())
    side = unet_config.get("sample_size") or 64
    side = side[0] if isinstance(side, (list, tuple)) else side
    latent = (unet_config.get("in_channels", 4), side, side)
    tokens = 77
    tokenizer = folder / "tokenizer" / "tokenizer_config.json"
    if tokenizer.exists():
        tokens = int(json.loads(tokenizer.read_text()).get("model_max_length", 77))
    cond: dict[str, tuple[int, ...]] = {"encoder_hidden_states": (tokens, unet_config["cross_attention_dim"])}
    if unet_config.get("addition_embed_type") == "text_time":
        pooled = unet_config["projection_class_embeddings_input_dim"] - 6 * unet_config["addition_time_embed_dim"]
        cond.update({"text_embeds": (pooled,), "time_ids": (6,)})
    return plan_from_unet_config(
        unet_config, config, defence_subset, latent_shape=latent, cond_shapes=cond, mixed_precision=mixed_precision,
        gradient_checkpointing=gradient_checkpointing, other_modules_bytes=_folder_module_bytes(folder),
        outer_optimizer=outer_optimizer, runtime_bytes=runtime_bytes, base_loss=base_loss,
    )


def process_rss() -> int:
    """This process's resident memory (Linux; 0 elsewhere): the runtime a CPU plan adds."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0
