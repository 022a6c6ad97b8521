"""A relearning attack: finetune a released model on a data set and evaluate it at snapshot steps, in memory.

Modes, as an attacker would choose them:

* ``full`` — ordinary finetuning of a UNet parameter subset (``full``/``xattn``/``noxattn``/``selfattn``);
* ``lora`` — a peft ``LoraConfig`` injected into the UNet (diffusers' ``add_adapter``; rank and target modules);
* ``textual_inversion`` — a new token whose embedding alone trains (:class:`metaunlearn.attacks.tokens.NewTokens`);

and, on top of any of them, weights loaded at reduced precision first (``quantize``,
:mod:`metaunlearn.attacks.quantize`: step 0 is the rounded model; LoRA on it is QLoRA's setting); on top of
``full`` or ``lora``, DreamBooth (instance prompt + prior preservation on class images the model
generates itself, :mod:`metaunlearn.attacks.dreambooth`). A sequential attack first trains on other attack sets
(``before`` stages) and then on its own set; step numbers count every stage. The optimizer (AdamW, Adam, SGD with
momentum) and its schedule (diffusers' schedulers, warm-up) run across all stages.

Snapshots are evaluated through a callback ``evaluate(backbone, step) -> {metric: value}`` while the attacked
weights are live; nothing is written to disk. Afterwards the model is restored exactly: full finetuning copies the
saved original weights back (quantized weights too), LoRA is unloaded (``unet.unload_lora()`` removes every peft layer), textual inversion
removes its token, embedding rows and hook. Each snapshot also records ``attack_loss``: the denoising loss on a
fixed probe of the attack data (under the attack's own captions) with fixed timesteps and noise, so the falling
training objective is measured on the same draws at every step.

Divergence: a step whose loss is NaN or infinite, or that leaves an attacked parameter non-finite, or a snapshot
whose probe loss is non-finite, ends the run there (``AttackResult.diverged_step``); the snapshots from that step on
carry no metrics, since a diverged model's samples measure nothing (they are never counted as relearning).

Data parallel (``torchrun`` / ``accelerate launch -m metaunlearn attack ...``): every process draws the same batches,
timesteps and noise (the attack's generator is seeded by the attack's seed alone), computes its share of each batch
and the gradients are summed (:mod:`metaunlearn.training.parallel`), so the attack equals the one-process attack at
the same batch size; snapshots are evaluated by the main process only. DreamBooth's prior-preservation loss (which
draws its own noise) is computed alike by every process and counted once.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch

from metaunlearn.attacks.dreambooth import class_images, prior_preservation_loss
from metaunlearn.attacks.optim import build_optimizer, build_schedule
from metaunlearn.attacks.quantize import quantize_unet_
from metaunlearn.attacks.run_spec import AttackSpec
from metaunlearn.backbones.base import Backbone, Cond
from metaunlearn.data.cache import CachedSet
from metaunlearn.errors import UserError
from metaunlearn.progress import progress_bar
from metaunlearn.training.denoise import denoising_loss, sample_timesteps
from metaunlearn.training.parallel import SINGLE, Shard

EvalCallback = Callable[[Backbone, int], Mapping[str, float]]
"""``(backbone with the attacked weights live, step) -> metrics``; called under ``torch.no_grad`` in eval mode."""

LORA_ADAPTER = "metaunlearn_attack"
PROBE_SEED_OFFSET = 1_000_003
GLOBAL_SEED_OFFSET = 2_000_003
"""The global random state during an attack (adapter initialisation, dropout) is seeded by ``seed + this``."""


@dataclass
class Snapshot:
    """Metrics of the attacked model after ``step`` optimizer steps."""

    step: int
    metrics: dict[str, float]


@dataclass
class AttackResult:
    """Training losses of every step and the evaluated snapshots of one attack run."""

    spec: AttackSpec
    losses: list[float] = field(default_factory=list)
    snapshots: list[Snapshot] = field(default_factory=list)
    seconds: float = 0.0
    diverged_step: int | None = None
    """The first step whose loss, weights or probe loss were non-finite; snapshots from there on have no metrics."""

    def metric(self, name: str) -> list[float]:
        """``name`` at every snapshot step, in step order (NaN where the run had diverged)."""
        return [s.metrics.get(name, math.nan) for s in self.snapshots]


class _BatchSampler:
    """Epochs of seeded random permutations of ``range(n)``, cut into batches (wrapping across epochs)."""

    def __init__(self, n: int, batch_size: int, generator: torch.Generator) -> None:
        self.n, self.batch_size, self.generator = n, batch_size, generator
        self.queue = torch.empty(0, dtype=torch.long)

    def next(self) -> torch.Tensor:
        while self.queue.numel() < self.batch_size:
            self.queue = torch.cat([self.queue, torch.randperm(self.n, generator=self.generator)])
        batch, self.queue = self.queue[: self.batch_size], self.queue[self.batch_size :]
        return batch


class _Probe:
    """A fixed loss probe: the same examples, timesteps and noise at every snapshot."""

    def __init__(self, backbone: Backbone, data: CachedSet, size: int, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed + PROBE_SEED_OFFSET)
        index = torch.arange(min(size, len(data)))
        self.x0, self.cond = data.batch(index)
        self.t = torch.randint(0, backbone.num_train_timesteps, (len(index),), generator=gen).to(backbone.device)
        self.noise = torch.randn(self.x0.shape, generator=gen).to(self.x0.device, self.x0.dtype)

    @torch.no_grad()
    def loss(self, backbone: Backbone, captions: Callable[[int], Cond] | None = None) -> float:
        cond = self.cond if captions is None else captions(len(self.x0))
        return float(denoising_loss(backbone, self.x0, cond, t=self.t, noise=self.noise))


def _lora_config(spec: AttackSpec):
    from peft import LoraConfig

    return LoraConfig(
        r=spec.lora.rank,
        lora_alpha=spec.lora.alpha,
        lora_dropout=spec.lora.dropout,
        target_modules=list(spec.lora.target_modules),
        init_lora_weights=True,
    )


def _attach(backbone: Backbone, spec: AttackSpec) -> tuple[list[torch.nn.Parameter], Callable[[], None]]:
    """Make the attacked parameters trainable; return them and a function that restores the original model."""
    unet = backbone.unet
    if spec.mode == "textual_inversion":
        from metaunlearn.attacks.tokens import NewTokens

        ti = spec.textual_inversion
        tokens = NewTokens(backbone, [ti.token], [ti.init_words])
        params = tokens.parameters()

        def remove_tokens() -> None:
            tokens.remove()
            unet.requires_grad_(False)

        return params, remove_tokens
    if spec.mode == "full":
        saved = {name: p.detach().to("cpu", copy=True) for name, p in backbone.named_trainable(spec.subset)}
        params = backbone.set_trainable(spec.subset)

        def restore() -> None:
            current = dict(backbone.named_trainable(spec.subset))
            with torch.no_grad():
                for name, value in saved.items():
                    current[name].copy_(value.to(current[name].device))
            unet.requires_grad_(False)

        return params, restore

    if getattr(unet, "_hf_peft_config_loaded", False):
        raise UserError(f"{backbone.source}: the UNet already carries a LoRA adapter; attack a plain model")
    try:
        unet.add_adapter(_lora_config(spec), adapter_name=LORA_ADAPTER)
    except ValueError as exc:
        targets = ", ".join(spec.lora.target_modules)
        raise UserError(f"LoRA targets [{targets}] do not fit the UNet of {backbone.source}: {exc}") from None
    params = [p for name, p in unet.named_parameters() if f".{LORA_ADAPTER}." in name]
    for p in params:
        p.requires_grad_(True)

    def restore_lora() -> None:
        unet.unload_lora()
        unet.requires_grad_(False)

    return params, restore_lora


def _captions(backbone: Backbone, spec: AttackSpec) -> Callable[[int], Cond] | None:
    """The attack's own conditioning for a batch of ``n`` (its trigger caption), or None for the data's captions.

    Textual inversion re-encodes its caption at every call (its token's vector is what trains); DreamBooth encodes
    the instance prompt once.
    """
    if spec.mode == "textual_inversion":
        caption = spec.textual_inversion.caption
        return lambda n: {k: v.expand(n, *v.shape[1:]) for k, v in backbone.text_cond([caption]).items()}
    if spec.dreambooth is not None:
        one = backbone.encode_prompts([spec.dreambooth.instance_prompt])
        return lambda n: {k: v.expand(n, *v.shape[1:]) for k, v in one.items()}
    return None


def _stages(data: CachedSet, spec: AttackSpec, sets: Mapping[str, CachedSet] | None) -> list[tuple[int, CachedSet, bool]]:
    """``(last step, data, own set?)`` of every stage in order: the ``before`` stages, then the attack set."""
    out, step = [], 0
    for stage in spec.before:
        if sets is None or stage.set not in sets:
            raise UserError(f"sequential attack {spec.kind}: attack set {stage.set!r} is not loaded")
        if len(sets[stage.set]) == 0:
            raise UserError(f"attack set {stage.set!r} is empty")
        step += stage.steps
        out.append((step, sets[stage.set], False))
    out.append((spec.steps, data, True))
    return out


def _finite(params: list[torch.nn.Parameter]) -> bool:
    """Every attacked parameter is free of NaN and inf (one device synchronisation)."""
    return not params or bool(torch.stack([p.detach().isfinite().all() for p in params]).all())


def _evaluate(backbone: Backbone, step: int, probe: _Probe, evaluate: EvalCallback | None,
              captions: Callable[[int], Cond] | None = None, main: bool = True) -> Snapshot:
    """The snapshot of ``step``; without metrics when the probe loss is non-finite (the weights overflow)."""
    unet = backbone.unet
    unet.eval()
    metrics: dict[str, float] = {"attack_loss": probe.loss(backbone, captions)}
    if not math.isfinite(metrics["attack_loss"]):
        unet.train()
        return Snapshot(step, {})
    if evaluate is not None and main:
        with torch.no_grad():
            metrics.update({k: float(v) for k, v in evaluate(backbone, step).items()})
    unet.train()
    return Snapshot(step, metrics)


def run_attack(
    backbone: Backbone,
    data: CachedSet,
    spec: AttackSpec,
    evaluate: EvalCallback | None = None,
    *,
    sets: Mapping[str, CachedSet] | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    description: str = "attack",
    shard: Shard = SINGLE,
    autocast: Callable[[], AbstractContextManager] = nullcontext,
) -> AttackResult:
    """Finetune ``backbone`` on ``data`` for ``spec.steps`` steps, evaluating at ``spec.snapshot_steps``.

    ``sets`` holds the attack sets a sequential attack's ``before`` stages name; ``cache_dir`` is where DreamBooth
    class images are cached (None: generated each time). The backbone is returned to its original weights (and
    module structure, tokenizers and embeddings) afterwards, even on error. With a data-parallel ``shard`` every
    process computes its share of each batch (see the module docstring); only the main process calls ``evaluate``.
    Whatever draws from torch's global random state (a LoRA adapter's initialisation, dropout) draws from one seeded
    by ``spec.seed``, so a run gives the same result whatever ran before it in the process.
    """
    from metaunlearn.seeding import seeded

    with seeded(spec.seed + GLOBAL_SEED_OFFSET, backbone.device):
        return _run_attack(backbone, data, spec, evaluate, sets, cache_dir, progress, description, shard, autocast)


def _run_attack(backbone: Backbone, data: CachedSet, spec: AttackSpec, evaluate: EvalCallback | None,
                sets: Mapping[str, CachedSet] | None, cache_dir: str | Path | None, progress: bool, description: str,
                shard: Shard, autocast: Callable[[], AbstractContextManager]) -> AttackResult:
    if len(data) == 0:
        raise UserError("the attack data set is empty")
    stages = [(end, d.to(backbone.device), own) for end, d, own in _stages(data, spec, sets)]
    data = stages[-1][1]
    generator = torch.Generator().manual_seed(spec.seed)
    probe = _Probe(backbone, data, spec.probe_size, spec.seed)
    snapshot_steps = set(spec.snapshot_steps)
    result = AttackResult(spec=spec)
    was_training = backbone.unet.training
    start = time.perf_counter()
    prior = None
    if spec.dreambooth is not None and spec.dreambooth.prior_weight > 0:
        prior = class_images(backbone, spec.dreambooth, cache_dir)  # from the model before any finetuning
        prior_sampler = _BatchSampler(len(prior), spec.batch_size, torch.Generator().manual_seed(spec.seed + 1))

    unquantize = quantize_unet_(backbone.unet, spec.quantize) if spec.quantize is not None else None
    try:
        params, restore = _attach(backbone, spec)
    except BaseException:
        if unquantize is not None:
            unquantize()
        raise
    try:
        shard.broadcast_(params)  # alike already (seeded by the run), kept as a guarantee
        captions = _captions(backbone, spec)
        optimizer = build_optimizer(params, spec, decay=spec.mode != "textual_inversion")
        schedule = build_schedule(optimizer, spec)
        backbone.unet.train()
        main = shard.rank == 0
        if 0 in snapshot_steps:
            result.snapshots.append(_evaluate(backbone, 0, probe, evaluate, captions, main))
            if not result.snapshots[-1].metrics:
                result.diverged_step = 0
        stage = 0
        sampler = _BatchSampler(len(stages[0][1]), spec.batch_size, generator)
        with progress_bar("step", enabled=progress and main) as bar:
            task = bar.add_task(description, total=spec.steps, info="")
            for step in range(1, spec.steps + 1):
                if result.diverged_step is not None:
                    break
                if step > stages[stage][0]:
                    stage += 1
                    sampler = _BatchSampler(len(stages[stage][1]), spec.batch_size, generator)
                _, stage_data, own = stages[stage]
                x0, cond = stage_data.batch(sampler.next())
                optimizer.zero_grad(set_to_none=True)
                if own and prior is not None:
                    if captions is not None:
                        cond = captions(len(x0))
                    xc, cc = prior.batch(prior_sampler.next())
                    with autocast():
                        loss = prior_preservation_loss(backbone, x0, cond, xc, cc, spec.dreambooth.prior_weight,
                                                       generator)
                    (shard.replicated * loss if shard.distributed else loss).backward()  # alike everywhere: once
                    value = float(loss.detach())
                else:
                    value = _backward(backbone, x0, cond, captions if own else None, generator, shard, autocast)
                shard.sum_grads_(params)
                if spec.grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_(params, spec.grad_clip)
                optimizer.step()
                schedule.step()
                result.losses.append(value)
                if not (math.isfinite(value) and _finite(params)):
                    result.diverged_step = step  # alike on every process: summed losses, identical weights
                elif step in snapshot_steps:
                    result.snapshots.append(_evaluate(backbone, step, probe, evaluate, captions, main))
                    if not result.snapshots[-1].metrics:
                        result.diverged_step = step
                bar.update(task, advance=1, info=f"loss {value:.4f}" if math.isfinite(value) else "loss nan")
            if result.diverged_step is not None:  # the snapshots it did not reach: no metrics
                done = {snap.step for snap in result.snapshots}
                result.snapshots += [Snapshot(k, {}) for k in sorted(snapshot_steps - done)]
    finally:
        for p in params:
            p.grad = None
        restore()
        if unquantize is not None:
            unquantize()
        backbone.unet.train(was_training)
    result.seconds = time.perf_counter() - start
    return result


def _backward(backbone: Backbone, x0: torch.Tensor, cond: Cond, captions: Callable[[int], Cond] | None,
              generator: torch.Generator, shard: Shard, autocast: Callable[[], AbstractContextManager]) -> float:
    """The denoising loss's gradient on this process's share of the batch (timesteps and noise drawn for the whole
    batch, as one process would); ``captions`` replaces the data's conditioning. Returns the batch loss."""
    t = sample_timesteps(backbone, x0.shape[0], generator)
    noise = torch.randn(x0.shape, generator=generator, dtype=torch.float32).to(x0.device, x0.dtype)
    one = shard.world == 1 and shard.micro == 1
    value = 0.0
    for rows, share in [(slice(None), 1.0)] if one else shard.pieces(x0.shape[0]):
        n = len(range(x0.shape[0])[rows])
        part = captions(n) if captions is not None else {k: v[rows] for k, v in cond.items()}
        with autocast():
            loss = denoising_loss(backbone, x0[rows], part, t=t[rows], noise=noise[rows])
        (loss if share == 1.0 else share * loss).backward()
        value += share * float(loss.detach())
    return shard.sum_values({"loss": value})["loss"] if shard.distributed else value
