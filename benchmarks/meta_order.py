"""Peak memory and step time of one meta step: first order, the full-unroll second order and the reverse-mode one.

    python benchmarks/meta_order.py                          # tiny SD pipeline and the shipped toy model
    python benchmarks/meta_order.py --sd14 --latent 32       # SD-1.4-architecture UNet (random init; minutes)
    python benchmarks/meta_order.py --parts --latent 32 64   # per-copy sizes + activations, SD-1.4 and SDXL shape
    python benchmarks/meta_order.py --parts --part-models sd14 --sd14-narrow 4 --latent 64 --math
                                   # SD-1.4's shape (same heads and tokens), channels ÷ 4; --math adds the double
                                   # backward on PyTorch's math attention kernel beside the chunked one

Every row runs in a fresh subprocess (its peak RSS is its own) with glibc's mmap threshold fixed, so freed tensors
go back to the OS and RSS follows live memory. Peak RSS is the CPU proxy for device memory: the table prints it
minus the process's RSS after imports (the Python/torch runtime; on a GPU the CUDA context replaces it), and minus
what the step keeps in host memory (``offload``: the saved θ and the inner-step gradients of second order), next to
the memory plan's prediction (:func:`metaunlearn.meta.memory.plan_meta_memory`). A watchdog kills a row whose RSS
passes ``--max-rss`` GiB.

The meta step: retain terms on two benign sets at θ, M inner AdamW steps of the simulated attack, ascent terms on
three sets at θ', an outer AdamW step whose state exists before the timed step.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from contextlib import nullcontext
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

GIB = 2**30
MIB = 2**20
ROOT = Path(__file__).resolve().parents[1]

SD14_UNET = dict(
    block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, sample_size=64, in_channels=4, out_channels=4,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=768, attention_head_dim=8,
)
SDXL_UNET = dict(
    block_out_channels=(320, 640, 1280), layers_per_block=2, sample_size=128, in_channels=4, out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
    use_linear_projection=True,
)


def rss_bytes(field: str = "VmRSS") -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def narrow(config: dict, factor: int) -> dict:
    """The same UNet shape with every channel count divided by ``factor`` (heads keep their count)."""
    out = dict(config)
    out["block_out_channels"] = tuple(c // factor for c in config["block_out_channels"])
    out["norm_num_groups"] = max(1, 32 // factor)
    if isinstance(config["attention_head_dim"], tuple):
        out["attention_head_dim"] = tuple(max(1, h // factor) for h in config["attention_head_dim"])
    return out


def sd14_config(factor: int) -> dict:
    """SD-1.4's UNet, or its shape with channels ÷ ``factor`` (its ``attention_head_dim`` = 8 is the head count, so
    heads and token counts — what attention memory depends on — stay)."""
    return SD14_UNET if factor == 1 else narrow(SD14_UNET, factor)


# ---- one row ---------------------------------------------------------------------------------------------------------
def build(args):
    import torch

    from metaunlearn.backbones.sd import StableDiffusionBackbone
    from metaunlearn.data.cache import CachedSet
    from metaunlearn.meta import MetaData

    sizes = {"forget_train": args.inner_batch * args.steps, "forget_test": args.batch, "related": args.batch,
             "irrelevant": args.batch}
    g = torch.Generator().manual_seed(0)
    if args.model == "toy":
        from metaunlearn.backbones.loading import load_backbone

        backbone = load_backbone(ROOT / "src/metaunlearn/assets/toy/model")
    else:
        from diffusers import UNet2DConditionModel

        from metaunlearn.testing.tiny_pipelines import build_tiny_sd

        pipe = build_tiny_sd()
        if args.model == "sd14":
            torch.manual_seed(0)
            pipe.unet = UNet2DConditionModel(**sd14_config(args.sd14_narrow))
        backbone = StableDiffusionBackbone(pipe, source=f"random-{args.model}")
    data = {}
    for role, n in sizes.items():
        if args.model == "sd14":
            side = args.latent
            latents = torch.randn(n, 4, side, side, generator=g)
            cond = {"encoder_hidden_states": torch.randn(n, 77, SD14_UNET["cross_attention_dim"], generator=g)}
        else:
            side = backbone.resolution
            images = torch.rand(n, 3, side, side, generator=g)
            latents = backbone.encode_images(images)
            cond = backbone.encode_prompts(["a red triangle"] * n)
        data[role] = CachedSet(latents, cond, ["x"] * n)
    return backbone, MetaData(**data)


def run_row(args) -> dict:
    import torch

    from metaunlearn.meta import AttackConfig, MetaConfig, MetaObjective, autocast_factory
    from metaunlearn.meta.memory import plan_meta_memory

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    torch.ones(2, requires_grad=True).sum().backward()  # autograd's lazy start-up belongs to the runtime
    runtime = rss_bytes()
    backbone, data = build(args)
    unet = backbone.unet
    if args.checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    params = backbone.set_trainable(args.defence)
    attack = AttackConfig(steps=args.steps, batch_size=args.inner_batch, lr=1e-5,
                          trainable="lora" if args.attack == "lora" else args.attack)
    # SD rows (--light): one retain and two ascent terms (related shared at θ and θ'), to keep a row near 20 minutes
    irrelevant = 0.0 if args.light else 1.0
    config = MetaConfig(order=args.order, batch_size=args.batch, offload=args.offload, attacks=[attack],
                        gamma_irrelevant=irrelevant, gamma_related=1.0, beta_forget=1.0, beta_related=1.0,
                        beta_irrelevant=0.1 * irrelevant)
    objective = MetaObjective(backbone, config, data, params,
                              autocast=autocast_factory(backbone.device, "bf16" if args.bf16 else "no"))
    if args.adam8bit:
        import bitsandbytes as bnb

        outer = bnb.optim.AdamW8bit(params, lr=1e-5)
    else:
        outer = torch.optim.AdamW(params, lr=1e-5)
    for p in params:  # the outer optimizer's state exists before the measured step, as in any step after the first
        p.grad = torch.zeros_like(p)
    outer.step()
    outer.zero_grad(set_to_none=True)
    plan = plan_meta_memory(backbone, config, args.defence, inner_batch=args.inner_batch, batch=args.batch,
                            latent_shape=tuple(data.forget_train.latents.shape[1:]),
                            cond_shapes={k: tuple(v.shape[1:]) for k, v in data.forget_train.cond.items()},
                            mixed_precision="bf16" if args.bf16 else "no", gradient_checkpointing=args.checkpointing,
                            outer_optimizer="adamw8bit" if args.adam8bit else "adamw", runtime_bytes=0, base_loss=False)
    g = torch.Generator().manual_seed(0)
    import gc

    from metaunlearn.meta.tensor_peak import TensorPeak

    for _ in range(args.warmup):
        objective.step(0, g, outer)
    gc.collect()
    reset_peak()
    # SD-scale rows (one timed step of minutes) count tensors during the timed step; elsewhere one more, untimed step
    # does, so that the counting's per-operator cost stays out of the times
    tracker = TensorPeak("cpu") if args.model == "sd14" else nullcontext()
    start = time.perf_counter()
    with tracker:
        for _ in range(args.timed):
            objective.step(0, g, outer)
    seconds = (time.perf_counter() - start) / args.timed
    peak = rss_bytes("VmHWM")
    if args.model != "sd14":
        gc.collect()
        with TensorPeak("cpu") as tracker:
            objective.step(0, g, outer)
    host = 0
    if args.offload and objective.attacks is not None:
        host += sum(t.numel() * t.element_size() for s in objective.attacks.spaces.values() if s.adapter is None
                    for t in s.saved)
        if config.second_order:
            host += sum(t.numel() * t.element_size() for trajectory in objective.trajectories.values()
                        for b in trajectory.buffers for t in b)
    return {
        "unet_params": sum(p.numel() for p in unet.parameters()),
        "step_s": seconds,
        "peak": peak - runtime,
        "host": host,
        "device": peak - runtime - host,
        "runtime": runtime,
        "tensors": tracker.peak,
        "plan": plan.peak,
        "plan_phase": plan.phase,
    }


# ---- parts: per-copy sizes and activation memory at SD scale ---------------------------------------------------------
def run_part(args) -> dict:
    """fwd+bwd (fused attention) or one double backward (the chunked twice-differentiable attention of reverse mode,
    or PyTorch's math kernel) of a UNet alone at batch 1."""
    import torch
    from diffusers import UNet2DConditionModel
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from metaunlearn.meta.attention import twice_differentiable_attention

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    torch.ones(2, requires_grad=True).sum().backward()
    runtime = rss_bytes()
    config = sd14_config(args.sd14_narrow) if args.part_model == "sd14" else narrow(SDXL_UNET, args.narrow)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**config)
    if args.checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    side = args.latent
    x = torch.randn(1, 4, side, side)
    t = torch.tensor([500])
    kwargs = {}
    if args.part_model == "sd14":
        c = torch.randn(1, 77, 768)
    else:
        c = torch.randn(1, 77, 2048)
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(1, 1280), "time_ids": torch.randn(1, 6)}
    params = [p for p in unet.parameters()]
    weights = sum(p.numel() * p.element_size() for p in params)
    from metaunlearn.meta.tensor_peak import TensorPeak

    loaded = rss_bytes()
    reset_peak()
    start = time.perf_counter()
    tracker = TensorPeak("cpu").__enter__()
    if args.part == "fwd_bwd":
        loss = unet(x, t, c, **kwargs).sample.pow(2).mean()
        grads = torch.autograd.grad(loss, params)
        held = sum(g.numel() * g.element_size() for g in grads)
    else:
        attention = sdpa_kernel([SDPBackend.MATH]) if args.part == "double_backward_math" else \
            twice_differentiable_attention(unet)
        with attention:
            loss = unet(x, t, c, **kwargs).sample.pow(2).mean()
            grads = torch.autograd.grad(loss, params, create_graph=True)
            dot = sum(torch.vdot(g.reshape(-1), g.detach().reshape(-1)) for g in grads)
            del grads
            hv = torch.autograd.grad(dot, params)
        # one gradient-sized set: the graph gradient g at the end of the first backward, or the output H·w at the end
        # of the second (g goes when the dot product's node runs, first thing in the double backward)
        held = sum(g.numel() * g.element_size() for g in hv)
    tracker.__exit__(None, None, None)
    seconds = time.perf_counter() - start
    peak = rss_bytes("VmHWM")
    from metaunlearn.meta.memory import activation_bytes

    predicted = activation_bytes(unet, (4, side, side), {"encoder_hidden_states": tuple(c.shape[1:]),
                                                          **{k: tuple(v.shape[1:]) for k, v in kwargs.get("added_cond_kwargs", {}).items()}},
                                 batch=1, double_backward=args.part != "fwd_bwd", checkpointing=args.checkpointing)
    if args.part == "double_backward_math":
        predicted = 0  # the plan traces the double backward of reverse mode (chunked attention) only
    return {"params": sum(p.numel() for p in params), "weights": weights, "model_rss": loaded - runtime,
            "activations": peak - loaded - held, "tensors": tracker.peak - tracker.start - held, "predicted": predicted,
            "seconds": seconds}


# ---- driver ----------------------------------------------------------------------------------------------------------
def child(argv: list[str], max_rss: float) -> dict | str:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0",
               PYTHONPATH=f"{ROOT / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    proc = subprocess.Popen([sys.executable, __file__, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)
    killed = []

    def watch():
        while proc.poll() is None:
            try:
                with open(f"/proc/{proc.pid}/status") as f:
                    rss = next(int(x.split()[1]) * 1024 for x in f if x.startswith("VmRSS:"))
            except (OSError, StopIteration):
                break
            if rss > max_rss * GIB:
                killed.append(rss)
                proc.kill()
                break
            time.sleep(0.2)

    threading.Thread(target=watch, daemon=True).start()
    out, err = proc.communicate()
    if killed:
        return f"stopped above {max_rss:g} GiB"
    if proc.returncode != 0:
        lines = err.strip().splitlines()
        return "failed: " + (lines[-1][:200] if lines else f"exit code {proc.returncode}")
    return json.loads(out.strip().splitlines()[-1])


ROW_KEYS = ("model", "order", "defence", "attack", "steps", "inner_batch", "batch", "latent", "bf16", "checkpointing",
            "offload", "adam8bit", "light", "sd14_narrow")


def row_argv(row: dict) -> list[str]:
    argv = ["--row"]
    for key in ROW_KEYS:
        value = row[key]
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            argv += [flag] if value else [f"--no-{key.replace('_', '-')}"]
        else:
            argv += [flag, str(value)]
    return argv + ["--warmup", str(row["warmup"]), "--timed", str(row["timed"])]


def default_rows(args) -> list[dict]:
    base = dict(defence="full", attack="full", steps=args.steps, inner_batch=2, batch=2, latent=args.latent[0],
                bf16=False, checkpointing=False, offload=True, adam8bit=False, light=False, warmup=1, timed=3,
                sd14_narrow=args.sd14_narrow)
    rows = []
    if args.sd14:
        big = dict(base, model="sd14", inner_batch=1, batch=1, warmup=0, timed=1, light=True)
        for latent in args.latent:
            rows += [dict(big, latent=latent, order=order, defence=d, attack=a) for order in ("second", "first")
                     for d, a in args.spaces]
        return rows
    for model in ("tiny", "toy"):
        for order in ("first", "second_unrolled", "second", "second_fd"):
            rows.append(dict(base, model=model, order=order))
        rows.append(dict(base, model=model, order="second", steps=20))
    return rows


def format_rows(rows: list[tuple[dict, dict | str]]) -> str:
    """RSS columns: peak resident memory above the runtime, what of it is host (offload), the rest ("device");
    tensor columns: the peak of live tensors (:class:`~metaunlearn.meta.tensor_peak.TensorPeak`, what a GPU
    allocator reports as max allocated) minus the host part; the plan's prediction against both."""
    lines = [f"{'model':<9}{'order':<17}{'defence/attack':<16}{'M':>4}{'lat':>5}{'step s':>9}{'RSS MiB':>9}"
             f"{'host MiB':>10}{'RSS dev':>9}{'tensors dev':>13}{'plan MiB':>10}{'plan/tens':>10}{'plan/RSS':>9}"]
    for row, r in rows:
        model = row["model"] + (f"/{row['sd14_narrow']}" if row["model"] == "sd14" and row["sd14_narrow"] > 1 else "")
        head = (f"{model:<9}{row['order']:<17}{row['defence'] + '/' + row['attack']:<16}{row['steps']:>4}"
                f"{row['latent'] if row['model'] == 'sd14' else '-':>5}")
        if isinstance(r, str):
            lines.append(f"{head}  {r}")
            continue
        tensors = r["tensors"] - r["host"]
        lines.append(f"{head}{r['step_s']:>9.2f}{r['peak'] / MIB:>9.0f}{r['host'] / MIB:>10.0f}"
                     f"{r['device'] / MIB:>9.0f}{tensors / MIB:>13.1f}{r['plan'] / MIB:>10.1f}"
                     f"{r['plan'] / max(tensors, 1):>10.2f}{r['plan'] / max(r['device'], 1):>9.2f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sd14", action="store_true", help="SD-1.4-architecture UNet rows (minutes per row)")
    parser.add_argument("--parts", action="store_true", help="per-copy sizes and activation memory at SD scale")
    parser.add_argument("--latent", type=int, nargs="+", default=[32], help="latent sides for --sd14/--parts")
    parser.add_argument("--steps", type=int, default=3, help="inner steps M")
    parser.add_argument("--spaces", nargs="+", default=[("xattn", "xattn")], type=lambda v: tuple(v.split("/")),
                        help="--sd14 rows: defence/attack parameter spaces, e.g. xattn/xattn full/lora full/full")
    parser.add_argument("--max-rss", type=float, default=19.0, help="GiB; a row above it is stopped")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    # one row (internal)
    parser.add_argument("--row", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", choices=["tiny", "toy", "sd14"], default="tiny", help=argparse.SUPPRESS)
    parser.add_argument("--order", default="first", help=argparse.SUPPRESS)
    parser.add_argument("--defence", default="full", help=argparse.SUPPRESS)
    parser.add_argument("--attack", default="full", help=argparse.SUPPRESS)
    parser.add_argument("--inner-batch", type=int, default=2, help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=2, help=argparse.SUPPRESS)
    parser.add_argument("--warmup", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--timed", type=int, default=3, help=argparse.SUPPRESS)
    for flag in ("bf16", "checkpointing", "offload", "adam8bit", "light"):
        parser.add_argument(f"--{flag}", action=argparse.BooleanOptionalAction, default=flag == "offload",
                            help=argparse.SUPPRESS)
    parser.add_argument("--part", choices=["fwd_bwd", "double_backward", "double_backward_math"], help=argparse.SUPPRESS)
    parser.add_argument("--sd14-narrow", type=int, default=1,
                        help="SD-1.4 rows and parts: channel divisor (same heads and tokens); 1: the real width")
    parser.add_argument("--math", action="store_true", help="--parts: also the double backward on the math kernel")
    parser.add_argument("--part-model", choices=["sd14", "sdxl"], default="sd14", help=argparse.SUPPRESS)
    parser.add_argument("--narrow", type=int, default=4, help="--parts: SDXL channel divisor")
    parser.add_argument("--part-models", nargs="+", default=["sd14", "sdxl"], choices=["sd14", "sdxl"],
                        help="--parts: which UNets")
    args = parser.parse_args()
    if args.row:
        args.latent = args.latent[0]
        print(json.dumps(run_row(args)))
        return
    if args.part:
        args.latent = args.latent[0]
        print(json.dumps(run_part(args)))
        return
    if args.parts:
        print(f"{'UNet':<14}{'latent':>7}{'pass':>22}{'params':>14}{'weights MiB':>13}{'activations MiB':>17}"
              f"{'predicted MiB':>15}{'seconds':>9}")
        results = []
        for model in args.part_models:
            for latent in args.latent:
                for part in ("fwd_bwd", "double_backward") + (("double_backward_math",) if args.math else ()):
                    r = child(["--part", part, "--part-model", model, "--latent", str(latent), "--narrow",
                               str(args.narrow), "--sd14-narrow", str(args.sd14_narrow)], args.max_rss)
                    name = (model if args.sd14_narrow == 1 else f"sd14/{args.sd14_narrow}") if model == "sd14" \
                        else f"sdxl/{args.narrow}"
                    results.append({"model": name, "latent": latent, "part": part, "result": r})
                    if isinstance(r, str):
                        print(f"{name:<14}{latent:>7}{part:>22}  {r}", flush=True)
                        continue
                    print(f"{name:<14}{latent:>7}{part:>22}{r['params']:>14,}{r['weights'] / MIB:>13.0f}"
                          f"{r['activations'] / MIB:>17.0f}{r['predicted'] / MIB:>15.0f}{r['seconds']:>9.1f}", flush=True)
        if args.json:
            args.json.write_text(json.dumps(results, indent=1))
        return
    done = []
    for row in default_rows(args):
        done.append((row, child(row_argv(row), args.max_rss)))
        print(format_rows(done).splitlines()[-1] if len(done) > 1 else format_rows(done), flush=True)
    print()
    print(format_rows(done))
    if args.json:
        args.json.write_text(json.dumps([{"row": r, "result": x} for r, x in done], indent=1))


if __name__ == "__main__":
    main()
