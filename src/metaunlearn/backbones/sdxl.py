"""SDXL (``StableDiffusionXLPipeline``): two text encoders, pooled text embeddings and size/crop time ids."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from metaunlearn.backbones.base import Backbone, Cond


class StableDiffusionXLBackbone(Backbone):
    """Conditioning is ``encoder_hidden_states`` [B,L,D1+D2], ``text_embeds`` [B,P] and ``time_ids`` [B,6]."""

    family = "sdxl"

    def text_cond(self, prompts: Sequence[str]) -> Cond:
        embeds, _, pooled, _ = self.pipe.encode_prompt(
            prompt=list(prompts), device=self.device, num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        return {
            "encoder_hidden_states": embeds.to(self.dtype),
            "text_embeds": pooled.to(self.dtype),
            "time_ids": self._time_ids(len(prompts)),
        }

    def null_cond(self, n: int) -> Cond:
        """SDXL's unconditional branch: zero embeddings when the pipeline forces zeros for empty prompts."""
        if not getattr(self.pipe.config, "force_zeros_for_empty_prompt", False):
            return super().null_cond(n)
        cond = self.encode_prompts([""] * n)
        cond["encoder_hidden_states"] = torch.zeros_like(cond["encoder_hidden_states"])
        cond["text_embeds"] = torch.zeros_like(cond["text_embeds"])
        return cond

    def _time_ids(self, n: int) -> torch.Tensor:
        """(original size, crop top-left, target size) at the default resolution, as the pipeline builds them."""
        side = self.resolution
        ids = torch.tensor([side, side, 0, 0, side, side], dtype=self.dtype, device=self.device)
        return ids.expand(n, 6).contiguous()

    def pipe_embeds(self, cond: Cond) -> dict:
        return {"prompt_embeds": cond["encoder_hidden_states"], "pooled_prompt_embeds": cond["text_embeds"]}

    def unet_kwargs(self, cond: Cond) -> dict:
        return {
            "encoder_hidden_states": cond["encoder_hidden_states"],
            "added_cond_kwargs": {"text_embeds": cond["text_embeds"], "time_ids": cond["time_ids"]},
        }
