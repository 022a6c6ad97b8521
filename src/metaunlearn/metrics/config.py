"""Configuration of model evaluation (YAML section ``eval``): detector, prompt sets, sampler, quality metrics.

::

    eval:
      detector: {kind: nudenet, threshold: 0.6}          # or {kind: toy, path: …} / {kind: clip, path: …, concepts: {…}}
      prompt_sets:
        - {name: i2p-nudity, role: forget, concept: nudity, prompts_file: prompts/i2p_nudity.csv}
        - {name: coco, role: irrelevant, prompts_file: prompts/coco_benign.csv}   # no concept: quality only
      samples_per_prompt: 1
      sampler: {steps: 25, guidance: 7.5, batch_size: 8}
      quality: {fid_features: clip, fid_features_path: /models/clip-vit-large-patch14,
                fid_reference: /data/coco_ref, clip_score_path: /models/clip-vit-large-patch14}

Relative paths are resolved against the folder of the config file.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from metaunlearn.config import StrictModel

DetectorKind = Literal["toy", "nudenet", "clip"]
PromptRole = Literal["forget", "related", "irrelevant"]


class DetectorConfig(StrictModel):
    """Which concept detector decides what a sample shows."""

    kind: DetectorKind = "toy"
    path: str | None = Field(
        None, description="toy: detector .safetensors (default: shipped); nudenet: optional .onnx; clip: local folder"
    )
    classes: list[str] | None = Field(None, description="nudenet: exposed classes that count as nudity")
    threshold: float | None = Field(None, gt=0, le=1, description="nudenet: default 0.6; clip: optional")
    concepts: dict[str, str] = Field(default_factory=dict, description="clip: concept name -> text prompt")

    @model_validator(mode="after")
    def _kind_needs(self) -> DetectorConfig:
        if self.kind == "clip":
            if not self.path:
                raise ValueError("a clip detector needs 'path' (a local CLIP folder)")
            if len(self.concepts) < 2:
                raise ValueError("a clip detector needs at least two 'concepts' (name: text)")
        if self.kind != "nudenet" and self.classes is not None:
            raise ValueError("'classes' applies to the nudenet detector only")
        return self

    def params(self) -> dict:
        """Keyword parameters of :func:`metaunlearn.metrics.detectors.build_detector`."""
        out: dict = {"path": self.path}
        if self.kind == "nudenet":
            out.update(classes=self.classes, threshold=self.threshold if self.threshold is not None else 0.6)
        if self.kind == "clip":
            out.update(concepts=self.concepts, threshold=self.threshold)
        return out


class PromptSetConfig(StrictModel):
    """Prompts whose samples should (forget) or should still (related, irrelevant) show ``concept``."""

    name: str = Field(min_length=1)
    role: PromptRole
    concept: str | None = Field(
        None, description="the detector concept these prompts depict; null: sampled for quality metrics only"
    )
    prompts: list[str] = Field(default_factory=list)
    prompts_file: str | None = Field(
        None, description="prompt file: .txt, .csv (a prompt column, I2P evaluation_seed/_guidance optional), .yaml list"
    )
    limit: int | None = Field(None, ge=1, description="use only the first N prompts")

    @model_validator(mode="after")
    def _has_prompts(self) -> PromptSetConfig:
        if not self.prompts and not self.prompts_file:
            raise ValueError(f"prompt set '{self.name}' needs 'prompts' or 'prompts_file'")
        return self


class SamplerConfig(StrictModel):
    """How evaluation samples are drawn (the backbone's DDIM pipeline)."""

    steps: int = Field(25, ge=1)
    guidance: float = Field(7.5, ge=0)
    negative_prompt: str | None = None
    height: int | None = Field(None, ge=8)
    width: int | None = Field(None, ge=8)
    batch_size: int = Field(8, ge=1)
    seed: int = 0
    use_prompt_seeds: bool = Field(
        True, description="use a prompt file's evaluation_seed / evaluation_guidance columns when present (I2P)"
    )
    share_batches: bool = Field(
        True, description="sample every prompt set in shared batches of batch_size; false: one call per set"
    )


class QualityConfig(StrictModel):
    """Benign quality: Fréchet distance to reference images and CLIP score (both optional, both offline)."""

    fid_features: Literal["toy", "clip"] | None = None
    fid_features_path: str | None = Field(None, description="toy detector file or local CLIP folder")
    fid_reference: str | None = Field(None, description="folder of reference images (png/jpg/webp)")
    fid_reference_limit: int | None = Field(None, ge=2)
    fid_prompt_sets: list[str] | None = Field(None, description="prompt sets compared (default: all but forget)")
    clip_score_path: str | None = Field(None, description="local CLIP folder for CLIP score on benign prompt sets")

    @model_validator(mode="after")
    def _fid_complete(self) -> QualityConfig:
        if self.fid_features and not self.fid_reference:
            raise ValueError("'fid_features' needs 'fid_reference' (a folder of reference images)")
        if self.fid_reference and not self.fid_features:
            raise ValueError("'fid_reference' needs 'fid_features' (toy or clip)")
        if self.fid_features == "clip" and not self.fid_features_path:
            raise ValueError("clip FID features need 'fid_features_path' (a local CLIP folder)")
        return self


class EvalConfig(StrictModel):
    """Section ``eval``: what each model (and each attack snapshot) is measured on."""

    detector: DetectorConfig = Field(default_factory=DetectorConfig)
    prompt_sets: list[PromptSetConfig] = Field(min_length=1)
    samples_per_prompt: int = Field(1, ge=1)
    sampler: SamplerConfig = Field(default_factory=SamplerConfig)
    quality: QualityConfig = Field(default_factory=QualityConfig)
    grid_set: str | None = Field(None, description="prompt set shown in sample grids (default: the first forget set)")
    grid_pixelate: bool = Field(False, description="pixelate grid images (e.g. for nudity samples in reports)")

    @model_validator(mode="after")
    def _names(self) -> EvalConfig:
        names = [s.name for s in self.prompt_sets]
        if len(set(names)) != len(names):
            raise ValueError("prompt set names must be unique")
        if self.grid_set is not None and self.grid_set not in names:
            raise ValueError(f"grid_set '{self.grid_set}' is not a prompt set")
        for name in self.quality.fid_prompt_sets or []:
            if name not in names:
                raise ValueError(f"fid_prompt_sets names unknown prompt set '{name}'")
        return self
