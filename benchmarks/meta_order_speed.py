"""CPU time of one meta step of the toy demo, per meta order, measured interleaved in one process.

    python benchmarks/meta_order_speed.py [--rounds 8] [--steps 5]

The demo's meta objective on the shipped toy model (retain γ 2/2 on related/irrelevant, ascent β 1/1/0.1, batch 8,
M AdamW inner steps at lr 1e-4 on the whole UNet), one objective per order on the same UNet. Each round runs one
meta-gradient evaluation (``MetaObjective.accumulate``: no outer step, so θ stays fixed) of every order in turn and
takes its process CPU time; the median over rounds is printed with its ratio to the full unroll. Interleaving
makes the ratios fair on a machine whose load changes during the run (absolute seconds are not, on a shared one).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

ROOT = Path(__file__).resolve().parents[1]
ORDERS = ("first", "second_unrolled", "second", "second_fd")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5, help="inner steps M")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--orders", nargs="+", default=list(ORDERS), choices=ORDERS)
    args = parser.parse_args()

    import torch

    from metaunlearn.backbones.loading import load_backbone
    from metaunlearn.data.cache import CachedSet
    from metaunlearn.meta import AttackConfig, MetaConfig, MetaData, MetaObjective

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    backbone = load_backbone(ROOT / "src/metaunlearn/assets/toy/model")
    backbone.unet.train()
    g = torch.Generator().manual_seed(0)
    sizes = {"forget_train": args.batch * args.steps, "forget_test": args.batch, "related": args.batch,
             "irrelevant": args.batch}
    data = {}
    for role, n in sizes.items():
        images = torch.rand(n, 3, backbone.resolution, backbone.resolution, generator=g)
        data[role] = CachedSet(backbone.encode_images(images), backbone.encode_prompts(["a red triangle"] * n),
                               ["x"] * n)
    data = MetaData(**data)
    params = backbone.set_trainable("full")
    attack = AttackConfig(steps=args.steps, batch_size=args.batch, lr=1e-4, weight_decay=0.0)
    objectives = {
        order: MetaObjective(backbone, MetaConfig(order=order, batch_size=args.batch, attacks=[attack],
                                                  gamma_irrelevant=2.0, gamma_related=2.0, beta_forget=1.0,
                                                  beta_related=1.0, beta_irrelevant=0.1), data, params)
        for order in args.orders
    }
    times: dict[str, list[float]] = {order: [] for order in args.orders}
    for round_ in range(args.rounds + 1):  # round 0 warms up
        for order, objective in objectives.items():
            start = time.process_time()
            objective.accumulate(round_, torch.Generator().manual_seed(round_))
            if round_:
                times[order].append(time.process_time() - start)
        for p in params:
            p.grad = None
    reference = statistics.median(times["second_unrolled"]) if "second_unrolled" in times else None
    print(f"toy model, M = {args.steps}, batch {args.batch}, {args.rounds} interleaved rounds, "
          f"{os.environ['OMP_NUM_THREADS']} thread(s), load average {os.getloadavg()[0]:.1f}")
    print(f"{'order':<18}{'median CPU s':>14}{'min':>8}{'max':>8}{'vs unroll':>11}")
    for order, values in times.items():
        median = statistics.median(values)
        ratio = f"{median / reference:>11.2f}" if reference else ""
        print(f"{order:<18}{median:>14.3f}{min(values):>8.3f}{max(values):>8.3f}{ratio}")


if __name__ == "__main__":
    main()
