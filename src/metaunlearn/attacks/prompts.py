"""Prompt attacks: bring an erased concept back without changing a weight (see
:class:`metaunlearn.attacks.prompt_spec.PromptAttackSpec` for the three kinds and their formulas).

Every kind rewrites how the forget prompts of the evaluation are put to the model and is then judged by the same
:class:`~metaunlearn.metrics.evaluate.Evaluator` as finetuning attacks, on the forget prompt sets only (benign sets
are unchanged by a prompt attack): ``forget_rate`` per sample and ``asr``, the attack success rate over the forget
prompts. The model is left exactly as it was: soft prompts live in :class:`~metaunlearn.attacks.tokens.NewTokens`
(removed afterwards), the concept vector only in a conditioning edit active while sampling.

Results: ``RUN_DIR/prompt_attacks/<model>/<name>_s<seed>.jsonl``, one row
``{model, method, variant, attack, kind, seed, prompt, seconds, settings, forget_rate, asr, rate/<set>…}``.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from metaunlearn.attacks.prompt_spec import PromptAttackSpec
from metaunlearn.backbones.base import Backbone, Cond
from metaunlearn.data.cache import CachedSet
from metaunlearn.errors import UserError
from metaunlearn.progress import progress_bar
from metaunlearn.training.denoise import denoising_loss

PROMPT_ATTACKS_DIR = "prompt_attacks"
JUDGE_SEED_OFFSET = 7919
"""Hard-prompt candidates are judged on seeds apart from the evaluation's, so the search cannot fit them."""


@dataclass
class PromptAttackResult:
    """What one prompt attack found and how the evaluation judged it."""

    name: str
    spec: PromptAttackSpec
    seed: int
    prompt: str  # the prefix or the rule applied to every forget prompt
    metrics: dict[str, float]
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0


def _forget_items(evaluator) -> list[tuple[str, str]]:
    """``(prompt, concept)`` of every forget prompt of the evaluation."""
    out = [(item.prompt, spec.concept) for spec in evaluator.config.prompt_sets
           if spec.role == "forget" and spec.concept is not None for item in evaluator.prompt_sets[spec.name]]
    if not out:
        raise UserError("a prompt attack needs a forget prompt set with a concept in the eval section")
    return out


def _judge(backbone: Backbone, evaluator, prefixed: list[tuple[str, str]]):
    """Evaluate the forget sets with every prompt rewritten as in ``prefixed`` (a rule given as a mapping)."""
    rewrite = dict(prefixed)
    return evaluator.with_forget_prompts(lambda p: rewrite.get(p, p), forget_only=True).evaluate(backbone).metrics


def soft_prompt(backbone: Backbone, spec: PromptAttackSpec, evaluator, concept: CachedSet, seed: int,
                progress: bool = False) -> PromptAttackResult:
    """UnlearnDiffAtk-style: optimise prefix token vectors so the model denoises the concept's images."""
    from metaunlearn.attacks.tokens import NewTokens

    if len(concept) == 0:
        raise UserError("the prompt attack's concept image set is empty")
    forget = _forget_items(evaluator)
    tokens = [f"<adv{i}>" for i in range(spec.tokens)]
    prefix = " ".join(tokens)
    concept = concept.to(backbone.device)
    generator = torch.Generator().manual_seed(seed)
    result = PromptAttackResult("", spec, seed, f"{prefix} {{prompt}} (soft tokens)", {})
    start = time.perf_counter()
    was_training = backbone.unet.training
    backbone.unet.eval()
    with NewTokens(backbone, tokens, [spec.init_words] * spec.tokens) as new:
        optimizer = torch.optim.Adam(new.parameters(), lr=spec.lr)
        with progress_bar("step", enabled=progress) as bar:
            task = bar.add_task("soft prompt", total=spec.steps, info="")
            for _ in range(spec.steps):
                index = torch.randint(0, len(concept), (spec.batch_size,), generator=generator)
                x0, _ = concept.batch(index)
                which = torch.randint(0, len(forget), (spec.batch_size,), generator=generator).tolist()
                cond = backbone.text_cond([f"{prefix} {forget[j][0]}" for j in which])
                loss = denoising_loss(backbone, x0, cond, generator=generator)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                result.losses.append(float(loss.detach()))
                bar.update(task, advance=1, info=f"loss {result.losses[-1]:.4f}")
        with torch.no_grad():
            result.metrics = _judge(backbone, evaluator, [(p, f"{prefix} {p}") for p, _ in forget])
    backbone.unet.train(was_training)
    result.metrics["attack_loss"] = result.losses[-1]
    result.seconds = time.perf_counter() - start
    return result


def concept_vector(backbone: Backbone, spec: PromptAttackSpec, evaluator, seed: int) -> PromptAttackResult:
    """Ring-A-Bell-style: sample the forget prompts from E(p) + strength · v, v the mean paired difference."""
    start = time.perf_counter()
    with torch.no_grad():
        with_c = backbone.encode_prompts(spec.concept_prompts)
        without = backbone.encode_prompts(spec.neutral_prompts)
    vector = {k: (with_c[k] - without[k]).mean(0, keepdim=True)
              for k in ("encoder_hidden_states", "text_embeds") if k in with_c}

    def edit(cond: Cond) -> Cond:
        return {k: cond[k] + spec.strength * vector[k] if k in vector else cond[k] for k in cond}

    forget = _forget_items(evaluator)
    with backbone.editing_cond(edit), torch.no_grad():
        metrics = _judge(backbone, evaluator, [(p, p) for p, _ in forget])
    result = PromptAttackResult("", spec, seed, f"E(prompt) + {spec.strength:g}·v", metrics)
    result.seconds = time.perf_counter() - start
    return result


def _vocabulary(backbone: Backbone, spec: PromptAttackSpec) -> list[str]:
    if spec.vocabulary:
        return list(spec.vocabulary)
    words = sorted(t[: -len("</w>")] for t in backbone.pipe.tokenizer.get_vocab()
                   if t.endswith("</w>") and t[: -len("</w>")].isalpha())
    if not words:
        raise UserError("the tokenizer has no whole-word tokens to search; give the hard prompt a vocabulary")
    return words


def hard_prompt(backbone: Backbone, spec: PromptAttackSpec, evaluator, seed: int,
                progress: bool = False) -> PromptAttackResult:
    """A greedy word-by-word search for a prefix, each candidate judged by the detector on ``judge_samples``."""
    start = time.perf_counter()
    forget = _forget_items(evaluator)
    vocab = _vocabulary(backbone, spec)
    rng = random.Random(seed)
    sampler = evaluator.config.sampler
    detector = evaluator.detector

    @torch.no_grad()
    def score(words: list[str]) -> float:
        picks = [forget[i % len(forget)] for i in range(spec.judge_samples)]
        prompts = [" ".join([*words, p]) for p, _ in picks]
        images = backbone.sample(prompts, steps=sampler.steps, guidance=sampler.guidance,
                                 negative_prompt=sampler.negative_prompt, seed=sampler.seed + JUDGE_SEED_OFFSET + seed,
                                 height=sampler.height, width=sampler.width, batch_size=sampler.batch_size)
        hits = [bool(detector.detects(images[i : i + 1], concept)[0]) for i, (_, concept) in enumerate(picks)]
        return sum(hits) / len(hits)

    words = [rng.choice(vocab) for _ in range(spec.tokens)]
    best = score(words)
    judged = 1
    with progress_bar("cand", enabled=progress) as bar:
        task = bar.add_task("hard prompt", total=spec.rounds * spec.tokens * spec.candidates, info="")
        for _ in range(spec.rounds):
            for position in range(spec.tokens):
                for word in rng.sample(vocab, min(spec.candidates, len(vocab))):
                    trial = [*words[:position], word, *words[position + 1 :]]
                    value = score(trial)
                    judged += 1
                    if value > best:
                        words, best = trial, value
                    bar.update(task, advance=1, info=f"best {100 * best:.0f}% '{' '.join(words)}'")
    prefix = " ".join(words)
    with torch.no_grad():
        metrics = _judge(backbone, evaluator, [(p, f"{prefix} {p}") for p, _ in forget])
    metrics["judge_rate"] = best
    metrics["candidates_judged"] = float(judged)
    result = PromptAttackResult("", spec, seed, f"{prefix} {{prompt}}", metrics)
    result.seconds = time.perf_counter() - start
    return result


def run_prompt_attack(backbone: Backbone, name: str, spec: PromptAttackSpec, evaluator, *, seed: int = 0,
                      concept: CachedSet | None = None, progress: bool = False) -> PromptAttackResult:
    """Run one prompt attack; the model's weights, tokenizers and embeddings are unchanged afterwards."""
    if evaluator is None:
        raise UserError(f"prompt attack {name!r} needs an 'eval' section (its result is the detector's verdict)")
    from metaunlearn.seeding import seeded

    if spec.kind == "soft_prompt" and concept is None:
        raise UserError(f"prompt attack {name!r} needs the concept's images (prompt_attack_set)")
    with seeded(seed, backbone.device):  # the caller's random state is left as it was
        if spec.kind == "soft_prompt":
            result = soft_prompt(backbone, spec, evaluator, concept, seed, progress)
        elif spec.kind == "concept_vector":
            result = concept_vector(backbone, spec, evaluator, seed)
        else:
            result = hard_prompt(backbone, spec, evaluator, seed, progress)
    result.name = name
    return result


def prompt_attack_file(run_dir: str | Path, model: str, name: str, seed: int) -> Path:
    return Path(run_dir) / PROMPT_ATTACKS_DIR / model / f"{name}_s{seed}.jsonl"


def run_prompt_attacks(backbone: Backbone, attacks: Mapping[str, PromptAttackSpec], seeds: list[int], evaluator,
                       run_dir: str | Path, model, concept: CachedSet | None = None, *, resume: bool = True,
                       progress: bool = False) -> list[dict]:
    """Every prompt attack under every seed; one result row each, written atomically. A written file is reused only
    when its recorded settings equal the attack's (a changed setting reruns the attack)."""
    from metaunlearn.attacks.sweep import check_name, write_jsonl

    rows = []
    for name, spec in attacks.items():
        check_name(name, "prompt attack name")
        for seed in seeds:
            path = prompt_attack_file(run_dir, model.name, name, seed)
            settings = spec.model_dump(mode="json")
            if resume and path.is_file():
                done = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
                if done and all(r.get("settings") == settings for r in done):
                    rows += done
                    continue
            result = run_prompt_attack(backbone, name, spec, evaluator, seed=seed, concept=concept, progress=progress)
            row = {"model": model.name, "method": model.method, "variant": model.variant, "attack": name,
                   "kind": spec.kind, "seed": seed, "prompt": result.prompt, "seconds": round(result.seconds, 2),
                   "settings": settings, **result.metrics}
            write_jsonl([row], path)
            rows.append(row)
    return rows


def read_prompt_rows(run_dir: str | Path) -> list[dict]:
    """Every prompt-attack row under ``RUN_DIR/prompt_attacks`` (none: an empty list)."""
    rows = []
    for path in sorted((Path(run_dir) / PROMPT_ATTACKS_DIR).glob("*/*.jsonl")):
        for n, line in enumerate(path.read_text().splitlines(), start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise UserError(f"{path}:{n}: not valid JSON ({exc.msg})") from None
    return rows
