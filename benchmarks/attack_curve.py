"""Cost of a relearning curve on the toy world: today's 100-step curve with 3 snapshots against a 300-step curve
with 6, on the shipped toy model with the demo's evaluation (88 samples × 10 DDIM steps, one call per prompt set).

    python benchmarks/attack_curve.py                 # the four curves below, once
    python benchmarks/attack_curve.py --repeat 2
    python benchmarks/attack_curve.py --batches       # also: UNet forward CPU ms per sample at batch 2 … 256
    python benchmarks/attack_curve.py --curves 4      # curve 1 (the reference) and curve 4 only

Curves (full finetuning, AdamW lr 1e-4, batch 8, on the demo's HRM-m images; the same model, data and seed):

1. ``before``: 100 steps, snapshots 0/25/100, every snapshot on the full evaluation, AdamW as a loop over the
   parameter tensors (the attack's optimizer before it used torch's fused kernel);
2. ``100 full``: the same curve with the fused optimizer;
3. ``300 full``: 300 steps, snapshots 0/25/50/100/200/300, every snapshot on the full evaluation;
4. ``300 budget``: the same with an evaluation budget — the full evaluation at step 0 and at the snapshots the
   report's headline uses (the budget 25, 4× the budget 100, the last step 300), ``--reduced`` samples per prompt
   (default 2 of 8) at 50 and 200 (``attack.snapshot_samples: {50: 2, 200: 2}``).

Prints each curve's CPU seconds (one torch thread; CPU seconds are the steadier figure on a shared machine; wall
seconds beside them) split into training and evaluations, once with its own step-0 evaluation and once without it
(a sweep evaluates the unattacked model once per model and evaluation setting and every run shares it), and each
total as a multiple of curve 1's. The machine's load average is printed at start and end.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

SHORT = [0, 25, 100]
LONG = [0, 25, 50, 100, 200, 300]


class _Clock:
    def __init__(self) -> None:
        self.wall = self.cpu = 0.0

    def __enter__(self):
        self._w, self._c = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        self.wall += time.perf_counter() - self._w
        self.cpu += time.process_time() - self._c


def _per_tensor_optimizer(params, spec, *, decay=True):
    """The attack's optimizer as it was built before (torch's default on CPU: a Python loop over the tensors)."""
    wd = spec.weight_decay if decay else 0.0
    return torch.optim.AdamW(params, lr=spec.lr, weight_decay=wd, foreach=False)


def _batches(backbone) -> None:
    unet = backbone.unet.eval()
    cond = backbone.encode_prompts(["a red triangle"])
    print("UNet forward (no grad), CPU ms per sample:", flush=True)
    for b in (2, 8, 16, 32, 64, 128, 256):
        x = torch.randn(b, unet.config.in_channels, 16, 16)
        t = torch.full((b,), 500)
        kwargs = backbone.unet_kwargs({k: v.expand(b, *v.shape[1:]) for k, v in cond.items()})
        reps = max(2, 512 // b)
        with torch.no_grad():
            unet(x, t, **kwargs)
            start = time.process_time()
            for _ in range(reps):
                unet(x, t, **kwargs)
        print(f"  batch {b:4d}: {1000 * (time.process_time() - start) / reps / b:6.2f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--reduced", type=int, default=2, help="samples per prompt at the intermediate snapshots")
    parser.add_argument("--batches", action="store_true", help="also time UNet forwards per sample by batch size")
    parser.add_argument("--curves", default="1,2,3,4", help="which curves to run (curve 1 always: the reference)")
    args = parser.parse_args()
    torch.set_num_threads(1)

    import metaunlearn.attacks.finetune as finetune
    from metaunlearn.attacks.run_spec import AttackSpec
    from metaunlearn.backbones.loading import load_backbone
    from metaunlearn.config import read_yaml
    from metaunlearn.data.cache import CachedSet
    from metaunlearn.experiment.demo import demo_config_path
    from metaunlearn.metrics.config import EvalConfig
    from metaunlearn.metrics.evaluate import Evaluator

    print(f"load average at start: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    cfg = read_yaml(demo_config_path())
    backbone = load_backbone(demo_config_path().parent / cfg["model"])
    prompts = ["red triangle", "a picture of a red triangle"] * 8  # the demo's HRM-m attack set
    images = backbone.sample(prompts, steps=10, guidance=4.0, seed=102)
    data = CachedSet(backbone.encode_images(images), backbone.encode_prompts(prompts), prompts)
    evaluator = Evaluator(EvalConfig.model_validate(cfg["eval"]), base_dir=demo_config_path().parent)
    evaluator.evaluate(backbone)  # warm-up (reference features, first calls)
    full = evaluator.config.samples_per_prompt
    samples = sum(len(v) for v in evaluator.prompt_sets.values()) * full
    sampler = evaluator.config.sampler
    print(f"toy model; evaluation: {samples} samples ({full} per prompt) × {sampler.steps} DDIM steps, guidance "
          f"{sampler.guidance}, one sampling call per prompt set; attack: full finetuning, AdamW lr 1e-4, batch 8")
    if args.batches:
        _batches(backbone)
    budget = {50: args.reduced, 200: args.reduced}
    curves = {
        "1 before: 100 steps, 0/25/100, full evals, per-tensor AdamW": (SHORT, {}, True),
        "2 100 steps, 0/25/100, full evals": (SHORT, {}, False),
        "3 300 steps, 0/25/50/100/200/300, full evals": (LONG, {}, False),
        f"4 300 steps, 6 snapshots, {args.reduced}/prompt at 50, 200": (LONG, budget, False),
    }
    wanted = {"1", *args.curves.split(",")}
    curves = {name: curve for name, curve in curves.items() if name.split()[0] in wanted}
    fused = finetune.build_optimizer
    for _ in range(args.repeat):
        reference = None
        for name, (snapshots, reduced, old_optimizer) in curves.items():
            total, evals = _Clock(), _Clock()
            by_step: dict[int, _Clock] = {}

            def evaluate(bb, step, evals=evals, by_step=by_step, reduced=reduced):
                with evals, by_step.setdefault(step, _Clock()):
                    return evaluator.evaluate(bb, reduced.get(step)).metrics

            spec = AttackSpec(lr=1e-4, batch_size=8, snapshot_steps=snapshots, seed=0, snapshot_samples=reduced)
            finetune.build_optimizer = _per_tensor_optimizer if old_optimizer else fused
            try:
                with total:
                    result = finetune.run_attack(backbone, data, spec, evaluate, progress=False)
            finally:
                finetune.build_optimizer = fused
            train = total.cpu - evals.cpu
            with_0, without_0 = total.cpu, total.cpu - by_step[0].cpu
            reference = reference or (with_0, without_0)
            last = result.snapshots[-1].metrics
            print(f"{name:52s} CPU s: total {with_0:6.1f} (wall {total.wall:6.1f}) | training {train:5.1f} "
                  f"({1000 * train / spec.steps:5.1f} ms/step) | {len(snapshots)} evaluations {evals.cpu:5.1f}, "
                  f"step 0 {by_step[0].cpu:4.1f} | without step 0 {without_0:6.1f} | × curve 1: "
                  f"{with_0 / reference[0]:.2f} with step 0, {without_0 / reference[1]:.2f} without | forget rate at "
                  f"{spec.steps}: {last['forget_rate']:.3f}", flush=True)
            print("    evaluation CPU s by step: " + ", ".join(
                f"{step}: {clock.cpu:.1f}" + (f" ({reduced[step]}/prompt)" if step in reduced else "")
                for step, clock in by_step.items()), flush=True)
    print(f"load average at end: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
