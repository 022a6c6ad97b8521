"""Tiny SD-1.x and SDXL folders end to end: CLI generate -> image folder -> cache -> train step -> save -> plain
diffusers reload; encode/decode shapes, trainable subsets and the unconditional conditioning."""

from __future__ import annotations

import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

from metaunlearn.backbones.base import TRAINABLE_SUBSETS
from metaunlearn.backbones.loading import load_backbone
from metaunlearn.data.caching import cached_set
from metaunlearn.data.imagefolder import read_imagefolder
from metaunlearn.errors import UserError
from metaunlearn.training.denoise import denoising_loss

PIPELINES = {"sd": StableDiffusionPipeline, "sdxl": StableDiffusionXLPipeline}


@pytest.fixture
def model_dirs(tiny_sd_dir, tiny_sdxl_dir):
    return {"sd": tiny_sd_dir, "sdxl": tiny_sdxl_dir}


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_generate_cache_train_save_reload(kind, model_dirs, run_cli, tmp_path, monkeypatch):
    model = model_dirs[kind]
    out = tmp_path / "data" / "dogs"
    result = run_cli(
        "generate", model, "--prompts", "a dog,a cat", "-n", "2", "--out", out,
        "--steps", "2", "--guidance", "3", "--batch-size", "3", "--cache", "--quiet",
    )
    assert result.exit_code == 0, result.stderr
    assert "4 encoded" in result.stdout
    folder = read_imagefolder(out)
    assert folder.texts == ["a dog", "a dog", "a cat", "a cat"] and folder.images.shape == (4, 3, 16, 16)

    backbone = load_backbone(model)
    assert backbone.family == kind
    monkeypatch.setattr(backbone, "encode_images", lambda *_: pytest.fail("the CLI's cache was not reused"))
    data = cached_set(backbone, out, tmp_path / "data" / "cache", progress=False)
    assert data.latents.shape == (4, 4, 8, 8) and data.texts == folder.texts

    # One optimizer step on the cached data, then save and reload with plain diffusers.
    params = backbone.set_trainable("xattn")
    before = [p.detach().clone() for p in params]
    loss = denoising_loss(backbone, data.latents, data.cond, generator=torch.Generator().manual_seed(0))
    loss.backward()
    torch.optim.SGD(params, lr=1.0).step()
    assert any(not torch.equal(a, p) for a, p in zip(before, params))
    saved = backbone.save(tmp_path / "model-out")
    pipe = PIPELINES[kind].from_pretrained(saved)
    assert type(pipe) is PIPELINES[kind]
    reloaded = pipe.unet.state_dict()
    for name, tensor in backbone.unet.state_dict().items():
        assert torch.equal(reloaded[name], tensor), name
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a dog", num_inference_steps=2, height=16, width=16, output_type="np").images
    assert image.shape == (1, 16, 16, 3)


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_encode_decode_shapes(kind, model_dirs):
    backbone = load_backbone(model_dirs[kind])
    images = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    latents = backbone.encode_images(images)
    assert latents.shape == (3, 4, 8, 8) and backbone.resolution == 16
    decoded = backbone.decode(latents)
    assert decoded.shape == (3, 3, 16, 16) and decoded.min() >= 0 and decoded.max() <= 1
    cond = backbone.encode_prompts(["a dog", "a cat", "a car"])
    assert all(v.shape[0] == 3 for v in cond.values())
    t = torch.tensor([10, 500, 999])
    assert backbone.predict_noise(latents, t, cond).shape == latents.shape


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_trainable_subsets(kind, model_dirs):
    backbone = load_backbone(model_dirs[kind])
    names = {s: [n for n, _ in backbone.named_trainable(s)] for s in TRAINABLE_SUBSETS}
    total = len(list(backbone.unet.parameters()))
    assert len(names["full"]) == total
    assert names["xattn"] and all(".attn2." in n for n in names["xattn"])
    assert names["selfattn"] and all(".attn1." in n for n in names["selfattn"])
    assert not any(".attn2." in n or n.startswith("time_embedding") or n.startswith("conv_out") for n in names["noxattn"])
    assert set(names["xattn"]).isdisjoint(names["noxattn"])
    params = backbone.set_trainable("xattn")
    assert sum(p.requires_grad for p in backbone.unet.parameters()) == len(params) == len(names["xattn"])
    with pytest.raises(UserError, match="unknown trainable subset 'attn3'"):
        backbone.set_trainable("attn3")


def test_null_cond(model_dirs):
    sdxl = load_backbone(model_dirs["sdxl"])
    null = sdxl.null_cond(2)
    assert torch.count_nonzero(null["encoder_hidden_states"]) == 0
    assert torch.count_nonzero(null["text_embeds"]) == 0
    assert null["time_ids"].shape == (2, 6) and torch.all(null["time_ids"][:, 0] == 16)
    sd = load_backbone(model_dirs["sd"])
    empty = sd.encode_prompts([""])["encoder_hidden_states"]
    assert torch.equal(sd.null_cond(3)["encoder_hidden_states"], empty.expand(3, -1, -1))
    assert torch.count_nonzero(empty) > 0
