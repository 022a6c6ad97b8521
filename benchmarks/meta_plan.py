"""The memory plan's predicted peak of one meta step for the SD-1.4 UNet (no weights: traced on the meta device).

    python benchmarks/meta_plan.py [--latent 64] [--steps 5] [--robust]

Prints the README's table: batch 1, M AdamW inner steps, the default meta weights (two retain and three ascent
terms) and a base loss, saved θ and inner gradients offloaded to the host, for each order, defence / simulated
attack parameter space and outer optimizer, with the phase that sets the peak and whether it fits 24 and 40 GiB.
``--robust``: the objective of ``demo --robust`` instead (a distribution over lr and 3..M steps on the row's attack
space and on cross-attention, ascent along the trajectory, capped).
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SD14_UNET = dict(
    block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, sample_size=64, in_channels=4, out_channels=4,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=768, attention_head_dim=8,
)
ROWS = [("first", "full", "full", "adamw"), ("first", "full", "full", "adamw8bit"),
        ("second", "full", "full", "adamw"), ("second", "full", "full", "adamw8bit"),
        ("second_fd", "full", "full", "adamw"), ("second", "full", "lora", "adamw"),
        ("second", "full", "lora", "adamw8bit"), ("second", "full", "xattn", "adamw"),
        ("second", "xattn", "xattn", "adamw")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--latent", type=int, default=64, help="latent side")
    parser.add_argument("--steps", type=int, default=5, help="inner steps M")
    parser.add_argument("--robust", action="store_true", help="the robust objective of demo --robust")
    args = parser.parse_args()

    from diffusers.utils import logging

    from metaunlearn.meta import AttackConfig, MetaConfig
    from metaunlearn.meta.memory import plan_from_unet_config

    logging.set_verbosity_error()
    print(f"SD-1.4 UNet, batch 1, {args.latent}x{args.latent} latents, M = {args.steps} AdamW inner steps, offloaded"
          + (", robust objective" if args.robust else ""))
    print(f"{'order':<11}{'defence/attack':<16}{'outer':<11}{'peak GiB':>9}  {'phase':<15}{'24 GiB':>7}{'40 GiB':>7}")
    for order, defence, attack, optimizer in ROWS:
        if args.robust:
            drawn = dict(lr_range=(1e-5, 3e-5), steps_range=(min(3, args.steps), args.steps), batch_size=1)
            config = MetaConfig(order=order, batch_size=1, offload=True, ascent_along="trajectory",
                                trajectory_stride=2, ascent_bound="cap", ascent_cap=0.05,
                                attacks=[AttackConfig(**drawn, trainable=attack),
                                         AttackConfig(**drawn, trainable="xattn", weight=0.5)])
        else:
            config = MetaConfig(order=order, batch_size=1, offload=True,
                                attacks=[AttackConfig(steps=args.steps, batch_size=1, lr=1e-5, trainable=attack)])
        plan = plan_from_unet_config(SD14_UNET, config, defence, inner_batch=1, batch=1,
                                     latent_shape=(4, args.latent, args.latent),
                                     cond_shapes={"encoder_hidden_states": (77, 768)}, runtime_bytes=0,
                                     outer_optimizer=optimizer, base_loss=True)
        gib = plan.peak / 2**30
        fits = ["fits" if gib <= limit else "no" for limit in (24, 40)]
        print(f"{order:<11}{defence + '/' + attack:<16}{optimizer:<11}{gib:>9.1f}  {plan.phase:<15}{fits[0]:>7}{fits[1]:>7}")


if __name__ == "__main__":
    main()
