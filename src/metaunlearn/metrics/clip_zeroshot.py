"""Zero-shot concept detection with a CLIP model from a local folder (transformers ``CLIPModel``/``CLIPProcessor``).

The detector is given concepts as ``{name: text}``; for each image it takes the softmax over the image-text
similarities of all concept texts (CLIP's own logit scale). A concept is detected when it wins the arg-max — and,
if a threshold is set, when its probability also reaches the threshold. Only local folders with safetensors
weights are accepted; nothing is downloaded.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from metaunlearn.errors import UserError
from metaunlearn.metrics.detection import check_concept, check_images


def load_local_clip(path: str | Path, device: str | torch.device = "cpu"):
    """``(CLIPModel, CLIPProcessor)`` from a local folder (safetensors only, no hub access)."""
    from transformers import CLIPModel, CLIPProcessor

    path = Path(path)
    if not path.is_dir():
        raise UserError(f"CLIP folder not found: {path}")
    if not any(path.glob("*.safetensors")):
        raise UserError(f"{path} has no .safetensors CLIP weights; metaunlearn loads safetensors weights only")
    try:
        model = CLIPModel.from_pretrained(str(path), local_files_only=True, use_safetensors=True)
        processor = CLIPProcessor.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"cannot load CLIP from {path}: {first}") from None
    return model.to(device).eval(), processor


def to_uint8_list(images: torch.Tensor) -> list[torch.Tensor]:
    """``[N,3,H,W]`` in [0,1] -> list of uint8 ``[3,H,W]`` tensors (what CLIP's image processor rescales)."""
    return list((check_images(images) * 255.0).round().to(torch.uint8))


class ClipZeroShotDetector:
    """The :class:`ConceptDetector` over named text prompts, e.g. ``{"nudity": "a photo of a naked person", …}``."""

    name = "clip"

    def __init__(
        self,
        path: str | Path,
        concepts: Mapping[str, str],
        threshold: float | None = None,
        device: str | torch.device = "cpu",
    ) -> None:
        if len(concepts) < 2:
            raise UserError("CLIP zero-shot detection needs at least two concepts to choose between")
        if threshold is not None and not 0.0 < threshold <= 1.0:
            raise UserError(f"CLIP threshold must be in (0, 1], got {threshold}")
        self.model, self.processor = load_local_clip(path, device)
        self.texts = dict(concepts)
        self.threshold = threshold
        self.device = torch.device(device)
        with torch.no_grad():
            tokens = self.processor(text=list(self.texts.values()), return_tensors="pt", padding=True)
            text = self.model.get_text_features(
                input_ids=tokens["input_ids"].to(self.device), attention_mask=tokens["attention_mask"].to(self.device)
            )
            self._text = _normalise(_pooled(text))

    @property
    def concepts(self) -> Sequence[str]:
        return list(self.texts)

    @torch.no_grad()
    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """Projected CLIP image embeddings ``[N, D]`` (not normalised)."""
        pixels = self.processor(images=to_uint8_list(images), return_tensors="pt")["pixel_values"]
        return _pooled(self.model.get_image_features(pixel_values=pixels.to(self.device))).float().cpu()

    @torch.no_grad()
    def concept_probs(self, images: torch.Tensor) -> torch.Tensor:
        """Softmax over the concept texts ``[N, K]``."""
        image = _normalise(self.image_features(images)).to(self._text.device)
        logits = self.model.logit_scale.exp() * image @ self._text.t()
        return logits.softmax(dim=-1).float().cpu()

    def probabilities(self, images: torch.Tensor, concept: str) -> torch.Tensor:
        check_concept(self, concept)
        return self.concept_probs(images)[:, self.concepts.index(concept)]

    def detects(self, images: torch.Tensor, concept: str) -> torch.Tensor:
        check_concept(self, concept)
        probs = self.concept_probs(images)
        k = self.concepts.index(concept)
        hit = probs.argmax(dim=-1) == k
        if self.threshold is not None:
            hit &= probs[:, k] >= self.threshold
        return hit


def _pooled(output) -> torch.Tensor:
    """Projected features whether transformers returns a tensor (4.x) or an output object (5.x)."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def _normalise(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
