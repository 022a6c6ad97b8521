"""Time and memory of one meta-unlearning outer step: metaunlearn's vs an official-style step.

    python benchmarks/meta_step.py                       # tiny random SD pipeline
    python benchmarks/meta_step.py --size small          # a bigger random UNet (see SIZES)
    python benchmarks/meta_step.py --model DIR           # a local diffusers SD folder

Both variants do the same work per outer step — retain terms at θ, a simulated attack of one epoch of AdamW over
forget-train on the full UNet, ascent terms at θ', an outer AdamW step — with the same data sizes:

* ``ours``: :class:`metaunlearn.meta.MetaObjective` on cached latents/conditioning, the attack in place with
  preallocated inner optimizer state and one saved copy of θ.
* ``official``: as the official code does it — ``copy.deepcopy(unet)`` every step, two fresh ``torch.optim.AdamW``
  (attack and meta-gradient) every step, every image re-encoded through the VAE in every pass.

Each variant runs in its own subprocess (so its peak RSS is its own). Time is split into UNet forward + backward
passes (forward hooks, and timers around ``Tensor.backward``/``autograd.grad``) and everything else.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

SIZES = {
    "tiny": dict(block_out_channels=(8, 16), sample_size=8, cross_attention_dim=32, attention_head_dim=4, norm=4),
    "small": dict(block_out_channels=(32, 64), sample_size=16, cross_attention_dim=32, attention_head_dim=8, norm=8),
    "medium": dict(block_out_channels=(64, 128, 128), sample_size=32, cross_attention_dim=32, attention_head_dim=8, norm=16),
    # many parameters on small latents: parameter-proportional memory (copies, optimizer state) dominates
    "wide": dict(block_out_channels=(128, 256, 512), sample_size=8, cross_attention_dim=32, attention_head_dim=16, norm=32),
}


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (Linux ``clear_refs``); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mib(reset_ok: bool) -> float:
    """Peak RSS since :func:`reset_peak_rss` (``VmHWM``), else over the process lifetime."""
    if reset_ok:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---- timing instrumentation --------------------------------------------------------------------------------------
class PassTimer:
    """Accumulates wall time spent in UNet forward passes and in backward passes."""

    def __init__(self) -> None:
        self.forward = 0.0
        self.backward = 0.0
        self._starts: list[float] = []
        self._depth = 0

    def hook(self, unet: torch.nn.Module) -> None:
        unet.register_forward_pre_hook(lambda *a: self._starts.append(time.perf_counter()))
        unet.register_forward_hook(lambda *a: self._end_forward())

    def _end_forward(self) -> None:
        self.forward += time.perf_counter() - self._starts.pop()

    def patch_autograd(self) -> None:
        original_backward, original_grad = torch.Tensor.backward, torch.autograd.grad
        timer = self

        def timed(fn):
            def wrapper(*args, **kwargs):
                timer._depth += 1
                start = time.perf_counter()
                try:
                    return fn(*args, **kwargs)
                finally:
                    timer._depth -= 1
                    if timer._depth == 0:
                        timer.backward += time.perf_counter() - start
            return wrapper

        torch.Tensor.backward = timed(original_backward)
        torch.autograd.grad = timed(original_grad)


# ---- set-up --------------------------------------------------------------------------------------------------------
def build_backbone(args):
    from metaunlearn.backbones.sd import StableDiffusionBackbone

    if args.model:
        from metaunlearn.backbones.loading import load_backbone

        return load_backbone(args.model)
    from diffusers import UNet2DConditionModel

    from metaunlearn.testing.tiny_pipelines import build_tiny_sd

    pipe = build_tiny_sd()
    s = SIZES[args.size]
    if args.size != "tiny":
        torch.manual_seed(0)
        n = len(s["block_out_channels"])
        pipe.unet = UNet2DConditionModel(
            block_out_channels=s["block_out_channels"], layers_per_block=1, sample_size=s["sample_size"],
            in_channels=4, out_channels=4, down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n - 1),
            up_block_types=("CrossAttnUpBlock2D",) * (n - 1) + ("UpBlock2D",), cross_attention_dim=s["cross_attention_dim"],
            attention_head_dim=s["attention_head_dim"], norm_num_groups=s["norm"],
        )
    return StableDiffusionBackbone(pipe, source=f"random-{args.size}")


def make_images(backbone, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    side = backbone.resolution
    return torch.rand(n, 3, side, side, generator=g)


def official_step(backbone, unet, outer_opt, images, texts, cfg, timer, g) -> None:
    """One outer step the way the official code does it (see the module docstring)."""
    from metaunlearn.training.denoise import denoising_loss

    def loss_on(net, imgs, txt):
        latents = backbone.encode_images(imgs)  # re-encoded every pass
        return denoising_loss(backbone, latents, backbone.encode_prompts(txt), unet=net, generator=g)

    def batch(name):
        idx = torch.randperm(len(texts[name]), generator=g)[: cfg["batch"]]
        return images[name][idx], [texts[name][i] for i in idx]

    outer_opt.zero_grad()
    for name, w in (("irrelevant", cfg["gamma"]), ("related", cfg["gamma"])):
        (w * loss_on(unet, *batch(name))).backward()
    attacked = copy.deepcopy(unet)
    attacked.requires_grad_(True)
    inner_opt = torch.optim.AdamW(attacked.parameters(), lr=1e-5, weight_decay=1e-4)
    n = len(texts["forget_train"])
    perm = torch.randperm(n, generator=g)
    for i in range(0, n, cfg["inner_batch"]):
        idx = perm[i : i + cfg["inner_batch"]]
        inner_opt.zero_grad()
        loss_on(attacked, images["forget_train"][idx], [texts["forget_train"][j] for j in idx]).backward()
        torch.nn.utils.clip_grad_norm_(attacked.parameters(), 1.0)
        inner_opt.step()
    meta_opt = torch.optim.AdamW(attacked.parameters(), lr=1e-5)  # the second fresh optimizer
    meta_opt.zero_grad()
    for name, w in (("forget_test", cfg["beta"]), ("related", cfg["beta"]), ("irrelevant", cfg["beta"])):
        (-w * loss_on(attacked, *batch(name))).backward()
    for p, q in zip(unet.parameters(), attacked.parameters()):
        if q.grad is not None:
            p.grad = q.grad.clone() if p.grad is None else p.grad + q.grad
    torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
    outer_opt.step()
    del attacked, inner_opt, meta_opt


def run_variant(args) -> dict:
    from metaunlearn.data.cache import CachedSet
    from metaunlearn.meta import AttackConfig, MetaConfig, MetaData, MetaObjective, autocast_factory

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    backbone = build_backbone(args)
    sizes = {"forget_train": args.forget_train, "forget_test": args.batch, "related": args.batch * 2,
             "irrelevant": args.batch * 2}
    words = {"forget_train": "naked body", "forget_test": "a photo of a nude person", "related": "bare skin",
             "irrelevant": "a dog in the park"}
    images = {k: make_images(backbone, n, i) for i, (k, n) in enumerate(sizes.items())}
    texts = {k: [words[k]] * n for k, n in sizes.items()}
    params = backbone.set_trainable("full")
    unet = backbone.unet
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    outer_opt = torch.optim.AdamW(params, lr=1e-5)
    timer = PassTimer()
    g = torch.Generator().manual_seed(0)
    cfg = {"gamma": 1.0, "beta": 0.1, "batch": args.batch, "inner_batch": args.inner_batch}
    if args.variant == "ours":
        def encode(k):  # once, in batches no larger than the training batches
            chunks = [backbone.encode_images(images[k][i : i + args.inner_batch]) for i in range(0, sizes[k], args.inner_batch)]
            return CachedSet(torch.cat(chunks), backbone.encode_prompts(texts[k]), texts[k])

        data = MetaData(**{k: encode(k) for k in sizes})
        meta = MetaConfig(batch_size=args.batch, attacks=[AttackConfig(batch_size=args.inner_batch)])
        objective = MetaObjective(backbone, meta, data, params,
                                  autocast=autocast_factory(backbone.device, "bf16" if args.bf16 else "no"))
        step = lambda: objective.step(0, g, outer_opt)  # noqa: E731
    else:
        step = lambda: official_step(backbone, unet, outer_opt, images, texts, cfg, timer, g)  # noqa: E731
    timer.hook(unet)
    timer.patch_autograd()
    step()  # warm-up (allocations, lazy init)
    timer.forward = timer.backward = 0.0
    import gc

    gc.collect()
    reset_ok = reset_peak_rss()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    total = (time.perf_counter() - start) / args.steps
    unet_time = (timer.forward + timer.backward) / args.steps
    return {
        "variant": args.variant,
        "unet_params": sum(p.numel() for p in unet.parameters()),
        "step_s": total,
        "unet_fwd_bwd_s": unet_time,
        "other_s": total - unet_time,
        "peak_rss_mib": peak_rss_mib(reset_ok),
        "peak_scope": "timed steps" if reset_ok else "process lifetime",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="local diffusers SD folder (default: a random UNet of --size)")
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--steps", type=int, default=3, help="timed outer steps (after one warm-up step)")
    parser.add_argument("--forget-train", type=int, default=20, help="forget-train images (attack: one epoch)")
    parser.add_argument("--inner-batch", type=int, default=10)
    parser.add_argument("--batch", type=int, default=8, help="batch of each retain/ascent term")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (ours)")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--variant", choices=["ours", "official"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args)))
        return
    rows = {}
    for variant in ("ours", "official"):
        cmd = [sys.executable, __file__, "--variant", variant] + [a for a in sys.argv[1:]]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"{variant} failed:\n{proc.stderr[-2000:]}")
        rows[variant] = json.loads(proc.stdout.strip().splitlines()[-1])
    o = rows["ours"]
    print(f"model: {args.model or 'random ' + args.size} UNet, {o['unet_params']:,} parameters; "
          f"forget-train {args.forget_train} (attack batch {args.inner_batch}), term batch {args.batch}, "
          f"{args.steps} timed steps; peak RSS over the {o['peak_scope']}")
    header = f"{'variant':<10}{'step s':>10}{'UNet fwd+bwd s':>16}{'other s':>10}{'peak RSS MiB':>14}"
    print(header)
    for name, r in rows.items():
        print(f"{name:<10}{r['step_s']:>10.3f}{r['unet_fwd_bwd_s']:>16.3f}{r['other_s']:>10.3f}{r['peak_rss_mib']:>14.0f}")
    off = rows["official"]
    print(f"official / ours: step time {off['step_s'] / o['step_s']:.2f}x, "
          f"non-UNet time {off['other_s'] / max(o['other_s'], 1e-9):.2f}x, "
          f"peak RSS {off['peak_rss_mib'] / o['peak_rss_mib']:.2f}x")


if __name__ == "__main__":
    main()
