"""SD-1.x / SD-2.x (``StableDiffusionPipeline``) and the embedded toy model (the same pipeline, pixel space)."""

from __future__ import annotations

from collections.abc import Sequence


from metaunlearn.backbones.base import Backbone, Cond


class StableDiffusionBackbone(Backbone):
    """One CLIP text encoder; conditioning is ``{"encoder_hidden_states": [B, L, D]}``."""

    family = "sd"

    def text_cond(self, prompts: Sequence[str]) -> Cond:
        embeds, _ = self.pipe.encode_prompt(
            list(prompts), device=self.device, num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        return {"encoder_hidden_states": embeds.to(self.dtype)}

    def unet_kwargs(self, cond: Cond) -> dict:
        return {"encoder_hidden_states": cond["encoder_hidden_states"]}


class ToyBackbone(StableDiffusionBackbone):
    """The shipped toy model: a StableDiffusionPipeline whose UNet works directly on pixels (no VAE pass)."""

    family = "toy"
