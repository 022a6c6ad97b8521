"""Pretraining and evaluation of the toy text-to-image model: a real, pixel-space ``StableDiffusionPipeline``.

The model is a standard diffusers pipeline folder:

- ``unet``: ``UNet2DConditionModel`` on 16×16 RGB pixels (in/out channels 3), cross-attention at 8×8 and in the
  mid block, text conditioning of width 32;
- ``text_encoder``: a 2-layer ``CLIPTextModel`` trained from scratch jointly with the UNet;
- ``tokenizer``: a ``CLIPTokenizer`` trained once on the world's captions and saved with the model;
- ``scheduler``: ``DDIMScheduler`` (cosine "squaredcos_cap_v2" betas, ε-prediction; samples clamped to [-1, 1] afterwards);
- ``vae``: a dummy 1-block ``AutoencoderKL`` (vae_scale_factor 1) that is never used: sampling with
  ``output_type="latent"`` returns the pixel images in ``[-1, 1]``. ``metaunlearn.json`` (``{"pixel_space": true}``)
  tells the project's backbone adapter to skip it.

Captions are dropped to ``""`` 10% of the time, so classifier-free guidance (and ESD/SDD's ε(x, ∅)) works.
Default sampler: DDIM, :data:`DEFAULT_STEPS` steps, guidance :data:`DEFAULT_GUIDANCE`.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from ..errors import UserError
from ..tokenizer import train_clip_tokenizer
from .defaults import DEFAULT_GUIDANCE, DEFAULT_STEPS, PRETRAIN_STEPS
from .detector import ConceptDetector
from .taxonomy import CONCEPTS, Concept, caption_corpus, concept_of_prompt
from .world import IMAGE_SIZE, render, to_tensor

MAX_TOKENS = 16
MARKER_FILE = "metaunlearn.json"

StepCallback = Callable[[int, int, float], None]


@dataclass
class ToyModelConfig:
    """Architecture and training recipe of the toy text-to-image model."""

    block_out_channels: tuple[int, ...] = (32, 64)
    down_block_types: tuple[str, ...] = ("DownBlock2D", "CrossAttnDownBlock2D")
    up_block_types: tuple[str, ...] = ("CrossAttnUpBlock2D", "UpBlock2D")
    layers_per_block: int = 1
    attention_head_dim: int = 8
    norm_num_groups: int = 8
    text_width: int = 32
    text_layers: int = 2
    text_heads: int = 4
    steps: int = PRETRAIN_STEPS
    batch_size: int = 64
    lr: float = 1e-3
    warmup: int = 100
    weight_decay: float = 1e-4
    caption_dropout: float = 0.1
    ema_decay: float = 0.998
    images_per_concept: int = 2000
    exclude: tuple[str, ...] = ()
    """Concepts whose images (and so captions) are never shown: the retrain-from-scratch reference of unlearning."""


def build_scheduler() -> DDIMScheduler:
    """The toy model's DDIM scheduler (also its training noise schedule)."""
    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_schedule="squaredcos_cap_v2",
        prediction_type="epsilon",
        clip_sample=False,  # StableDiffusionPipeline resets it to False anyway; samples are clamped after.
        set_alpha_to_one=False,
        steps_offset=1,
    )


def build_pipeline(tokenizer: CLIPTokenizer, config: ToyModelConfig, seed: int = 0) -> StableDiffusionPipeline:
    """A randomly initialised pixel-space pipeline with the given tokenizer."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=IMAGE_SIZE,
        in_channels=3,
        out_channels=3,
        block_out_channels=tuple(config.block_out_channels),
        down_block_types=tuple(config.down_block_types),
        up_block_types=tuple(config.up_block_types),
        layers_per_block=config.layers_per_block,
        cross_attention_dim=config.text_width,
        attention_head_dim=config.attention_head_dim,
        norm_num_groups=config.norm_num_groups,
    )
    text_config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=config.text_width,
        intermediate_size=config.text_width * 2,
        num_hidden_layers=config.text_layers,
        num_attention_heads=config.text_heads,
        max_position_embeddings=tokenizer.model_max_length,
        projection_dim=config.text_width,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    text_encoder = CLIPTextModel(text_config)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=3,
        block_out_channels=(8,),
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        layers_per_block=1,
        norm_num_groups=4,
        sample_size=IMAGE_SIZE,
        scaling_factor=1.0,
    )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=build_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def build_tokenizer() -> CLIPTokenizer:
    """Train the toy tokenizer on every caption of the world (done once, then saved with the model)."""
    return train_clip_tokenizer(caption_corpus(), vocab_size=200, max_length=MAX_TOKENS)


def tokenize(tokenizer: CLIPTokenizer, prompts: list[str]) -> torch.Tensor:
    """Token ids exactly as ``StableDiffusionPipeline`` makes them (padded to ``model_max_length``)."""
    return tokenizer(
        prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids


@dataclass
class CaptionedImages:
    """Training images ``[N, 3, 16, 16]`` in ``[-1, 1]`` with their concept index."""

    images: torch.Tensor
    concept_index: torch.Tensor


def render_training_set(per_concept: int, seed: int) -> CaptionedImages:
    """Fresh renders of every concept of the world."""
    images = [to_tensor(render(c.name, per_concept, seed)) * 2 - 1 for c in CONCEPTS]
    index = [torch.full((per_concept,), i, dtype=torch.long) for i in range(len(CONCEPTS))]
    return CaptionedImages(torch.cat(images), torch.cat(index))


def concept_indices(names: tuple[str, ...] | list[str]) -> list[int]:
    """Indices in ``CONCEPTS`` of the named concepts (a one-line error for an unknown name)."""
    known = [c.name for c in CONCEPTS]
    unknown = sorted(set(names) - set(known))
    if unknown:
        raise UserError(f"unknown concept(s): {', '.join(unknown)} (known: {', '.join(known)})")
    return [known.index(n) for n in names]


def _without(data: CaptionedImages, exclude: tuple[str, ...]) -> CaptionedImages:
    """``data`` minus every image of the concepts named in ``exclude``."""
    if not exclude:
        return data
    keep = ~torch.isin(data.concept_index, torch.tensor(concept_indices(exclude)))
    return CaptionedImages(data.images[keep], data.concept_index[keep])


def _ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters(), strict=True):
            e.lerp_(p, 1.0 - decay)


def train_model(
    config: ToyModelConfig | None = None, seed: int = 0, on_step: StepCallback | None = None
) -> StableDiffusionPipeline:
    """Train text encoder + UNet jointly from scratch on captioned renders; returns the (EMA) pipeline."""
    config = config or ToyModelConfig()
    tokenizer = build_tokenizer()
    pipe = build_pipeline(tokenizer, config, seed=seed)
    unet, text_encoder, scheduler = pipe.unet, pipe.text_encoder, pipe.scheduler
    data = _without(render_training_set(config.images_per_concept, seed=seed + 1), config.exclude)

    # Every caption of every concept, tokenized once; index -1 of the table is the empty caption.
    captions = [list(c.all_prompts) for c in CONCEPTS]
    flat = [p for group in captions for p in group] + [""]
    ids = tokenize(tokenizer, flat)
    offsets = np.cumsum([0] + [len(g) for g in captions])
    counts = torch.tensor([len(g) for g in captions])
    starts = torch.tensor(offsets[:-1])

    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)

    def lr_at(step: int) -> float:
        if step < config.warmup:
            return (step + 1) / config.warmup
        progress = (step - config.warmup) / max(1, config.steps - config.warmup)
        return 0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * progress))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    ema_unet, ema_text = copy.deepcopy(unet).requires_grad_(False), copy.deepcopy(text_encoder).requires_grad_(False)
    gen = torch.Generator().manual_seed(seed)
    alphas = scheduler.alphas_cumprod
    unet.train()
    text_encoder.train()
    for step in range(config.steps):
        b = config.batch_size
        idx = torch.randint(0, len(data.images), (b,), generator=gen)
        x0 = data.images[idx]
        x0 = torch.where((torch.rand(b, generator=gen) < 0.5)[:, None, None, None], x0.flip(-1), x0)
        concept = data.concept_index[idx]
        which = starts[concept] + (torch.rand(b, generator=gen) * counts[concept]).long()
        which = torch.where(torch.rand(b, generator=gen) < config.caption_dropout, len(flat) - 1, which)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (b,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        a = alphas[t].sqrt()[:, None, None, None]
        s = (1 - alphas[t]).sqrt()[:, None, None, None]
        xt = a * x0 + s * noise
        cond = text_encoder(ids[which])[0]
        loss = F.mse_loss(unet(xt, t, cond).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        _ema_update(ema_unet, unet, config.ema_decay)
        _ema_update(ema_text, text_encoder, config.ema_decay)
        if on_step is not None:
            on_step(step + 1, config.steps, float(loss.detach()))
    pipe.register_modules(unet=ema_unet.eval(), text_encoder=ema_text.eval())
    return pipe


def save_model(pipe: StableDiffusionPipeline, path: str | Path) -> None:
    """Save the pipeline folder (safetensors) with its ``metaunlearn.json`` pixel-space marker."""
    path = Path(path)
    pipe.save_pretrained(str(path), safe_serialization=True)
    (path / MARKER_FILE).write_text(json.dumps({"pixel_space": True, "image_size": IMAGE_SIZE,
                                                "default_steps": DEFAULT_STEPS,
                                                "default_guidance": DEFAULT_GUIDANCE}, indent=2) + "\n")


def load_model(path: str | Path) -> StableDiffusionPipeline:
    """Load a toy pipeline folder with plain ``StableDiffusionPipeline.from_pretrained``."""
    pipe = StableDiffusionPipeline.from_pretrained(str(path), safety_checker=None, feature_extractor=None,
                                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def sample(
    pipe: StableDiffusionPipeline,
    prompt: str | list[str],
    n: int,
    seed: int = 0,
    steps: int = DEFAULT_STEPS,
    guidance: float = DEFAULT_GUIDANCE,
) -> torch.Tensor:
    """``n`` samples per prompt as float images ``[n * len(prompts), 3, 16, 16]`` in ``[0, 1]``, prompt-major."""
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(seed)
    latents = pipe(
        [p for p in prompts for _ in range(n)],
        height=IMAGE_SIZE,
        width=IMAGE_SIZE,
        num_inference_steps=steps,
        guidance_scale=guidance,
        generator=generator,
        output_type="latent",
    ).images
    return ((latents.float() + 1) / 2).clamp(0, 1)


def sample_grid(pipe: StableDiffusionPipeline, prompts: list[str], n: int = 10, seed: int = 0,
                scale: int = 4) -> np.ndarray:
    """A ``uint8`` picture with one row of ``n`` samples per prompt, upscaled ``scale``× (nearest)."""
    images = sample(pipe, prompts, n, seed=seed).permute(0, 2, 3, 1).numpy()
    images = np.rint(images * 255).astype(np.uint8).reshape(len(prompts), n, IMAGE_SIZE, IMAGE_SIZE, 3)
    grid = np.concatenate([np.concatenate(list(row), axis=1) for row in images], axis=0)
    return grid.repeat(scale, axis=0).repeat(scale, axis=1)


def evaluation_prompts() -> list[tuple[Concept, str]]:
    """Main prompt of every concept, then the forget concept's paraphrases and held-out paraphrases."""
    rows = [(c, c.prompt) for c in CONCEPTS]
    rows += [(c, p) for c in CONCEPTS if c.role == "forget" for p in (*c.paraphrases, *c.heldout_paraphrases)]
    return rows


def evaluate_model(
    pipe: StableDiffusionPipeline,
    detector: ConceptDetector,
    n: int = 32,
    seed: int = 0,
    steps: int = DEFAULT_STEPS,
    guidance: float = DEFAULT_GUIDANCE,
    prompts: list[str] | None = None,
) -> list[dict[str, object]]:
    """For each prompt: fraction of ``n`` samples the detector classifies as the prompt's concept."""
    rows = evaluation_prompts() if prompts is None else [(concept_of_prompt(p), p) for p in prompts]
    table: list[dict[str, object]] = []
    for i, (concept, prompt) in enumerate(rows):
        images = sample(pipe, prompt, n, seed=seed + i, steps=steps, guidance=guidance)
        predicted = detector.predict(images)
        table.append({
            "concept": concept.name,
            "role": concept.role,
            "prompt": prompt,
            "n": n,
            "accuracy": sum(p == concept.name for p in predicted) / n,
            "most_confused_with": _most_common_other(predicted, concept.name),
        })
    return table


def _most_common_other(predicted: list[str], target: str) -> str | None:
    others = [p for p in predicted if p != target]
    return max(set(others), key=others.count) if others else None


def config_dict(config: ToyModelConfig) -> dict[str, object]:
    """JSON-ready dict of a config."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(config).items()}
