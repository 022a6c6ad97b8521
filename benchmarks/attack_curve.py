"""Cost of a relearning curve on the toy world: a 100-step attack with 3 snapshots against a 300-step attack with
6, with each prompt set sampled in its own pipeline call (as before) or all sets in shared batched calls.

    python benchmarks/attack_curve.py              # the shipped toy model, the demo's evaluation (88 samples)
    python benchmarks/attack_curve.py --repeat 2

Prints, per variant, wall and CPU seconds of the whole curve, of the training steps and of the evaluations (one
torch thread; CPU seconds are the steadier figure on a shared machine), and one evaluation's cost in training steps.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

VARIANTS = {
    "100 steps, 3 snapshots, per-set sampling": ([0, 25, 100], False),
    "100 steps, 3 snapshots, batched sampling": ([0, 25, 100], True),
    "300 steps, 6 snapshots, batched sampling": ([0, 25, 50, 100, 200, 300], True),
}


class _Clock:
    def __init__(self) -> None:
        self.wall = self.cpu = 0.0

    def __enter__(self):
        self._w, self._c = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        self.wall += time.perf_counter() - self._w
        self.cpu += time.process_time() - self._c


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(1)

    from metaunlearn.attacks.config import AttackSpec
    from metaunlearn.attacks.finetune import run_attack
    from metaunlearn.backbones.loading import load_backbone
    from metaunlearn.config import read_yaml
    from metaunlearn.data.cache import CachedSet
    from metaunlearn.experiment.demo import demo_config_path
    from metaunlearn.metrics.config import EvalConfig
    from metaunlearn.metrics.evaluate import Evaluator

    cfg = read_yaml(demo_config_path())
    backbone = load_backbone(demo_config_path().parent / cfg["model"])
    prompts = ["red triangle", "a picture of a red triangle"] * 8  # the demo's HRM-m attack set
    images = backbone.sample(prompts, steps=10, guidance=4.0, seed=102)
    data = CachedSet(backbone.encode_images(images), backbone.encode_prompts(prompts), prompts)
    def evaluator_for(share: bool) -> Evaluator:
        raw = {**cfg["eval"], "sampler": {**cfg["eval"]["sampler"], "share_batches": share}}
        return Evaluator(EvalConfig.model_validate(raw), base_dir=demo_config_path().parent)

    evaluator, per_set = evaluator_for(True), evaluator_for(False)
    evaluator.evaluate(backbone)  # warm-up (reference features, first calls)
    per_set.evaluate(backbone)
    samples = sum(len(v) for v in evaluator.prompt_sets.values()) * evaluator.config.samples_per_prompt
    print(f"toy model, evaluation of {samples} samples × {evaluator.config.sampler.steps} DDIM steps; "
          f"attack batch 8, full finetuning, AdamW")
    for _ in range(args.repeat):
        for name, (snapshots, batched) in VARIANTS.items():
            judge = evaluator if batched else per_set
            total, evals = _Clock(), _Clock()

            def evaluate(bb, step, judge=judge, evals=evals):
                with evals:
                    return judge(bb, step)

            spec = AttackSpec(lr=1e-4, batch_size=8, snapshot_steps=snapshots, seed=0)
            with total:
                run_attack(backbone, data, spec, evaluate, progress=False)
            steps = spec.steps
            train_wall, train_cpu = total.wall - evals.wall, total.cpu - evals.cpu
            per_step = train_cpu / steps
            print(f"{name:44s} total {total.wall:6.1f} s wall {total.cpu:6.1f} s CPU | training {train_cpu:6.1f} s "
                  f"CPU | {len(snapshots)} evaluations {evals.cpu:6.1f} s CPU "
                  f"(one = {evals.cpu / len(snapshots) / per_step:4.0f} training steps)", flush=True)


if __name__ == "__main__":
    main()
