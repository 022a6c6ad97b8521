"""Concept data: prompt files, image folders, the data config, generation and the latent/conditioning cache."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from metaunlearn.backbones.loading import load_backbone
from metaunlearn.config import validate
from metaunlearn.data.caching import cache_file, cached_set, data_fingerprint, encoder_fingerprint
from metaunlearn.data.config import DataConfig, SamplerSettings
from metaunlearn.data.generate import generate_data, generate_folder, split_items
from metaunlearn.data.imagefolder import (
    METADATA_FILE,
    read_imagefolder,
    read_metadata,
    write_imagefolder,
)
from metaunlearn.data.prompts import read_prompt_file, resolve_prompts, split_prompt_list
from metaunlearn.errors import UserError

FAST = SamplerSettings(steps=2, guidance=3.0, batch_size=4)


@pytest.fixture(scope="module")
def sd(tiny_sd_dir):
    return load_backbone(tiny_sd_dir)


def _no_temp_dirs(parent: Path) -> bool:
    return not [p for p in parent.iterdir() if ".tmp-" in p.name or p.name.endswith(".old")]


# ---- prompts --------------------------------------------------------------------------------------------------
def test_prompt_files(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("# nudity prompts\na nude person\n\n  bare skin  \n")
    assert read_prompt_file(txt) == ["a nude person", "bare skin"]
    csv = tmp_path / "i2p.csv"
    csv.write_text('prompt,categories,evaluation_seed\n"a woman, nude, oil painting",sexual,42\nbare chest,sexual,7\n')
    assert read_prompt_file(csv) == ["a woman, nude, oil painting", "bare chest"]
    yml = tmp_path / "p.yaml"
    yml.write_text("- a dog\n- a cat\n")
    assert read_prompt_file(yml) == ["a dog", "a cat"]
    js = tmp_path / "p.json"
    js.write_text('["x", "y"]')
    assert read_prompt_file(js) == ["x", "y"]
    assert split_prompt_list(" a dog, ,a cat ") == ["a dog", "a cat"]
    assert resolve_prompts(["a"], None) == ["a"]


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("missing.txt", None, "not found"),
        ("empty.txt", "\n# only a comment\n", "contains no prompts"),
        ("noprompt.csv", "text,seed\na dog,1\n", "no 'prompt' column (columns: text, seed)"),
        ("dict.yaml", "a: 1\n", "list of strings"),
        ("prompts.docx", "x", "unsupported type .docx"),
        ("binary.txt", b"\xff\xfe\x00\x81", "not a UTF-8 text file"),
    ],
)
def test_bad_prompt_files(tmp_path, name, content, message):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        read_prompt_file(path)


def test_resolve_prompts_needs_exactly_one_source(tmp_path):
    with pytest.raises(UserError, match="no prompts given"):
        resolve_prompts([], None, "data.forget")
    with pytest.raises(UserError, match="not both"):
        resolve_prompts(["a"], tmp_path / "p.txt")


# ---- image folders ----------------------------------------------------------------------------------------------
def _images(n: int, side: int = 16) -> torch.Tensor:
    return torch.rand(n, 3, side, side, generator=torch.Generator().manual_seed(n))


def test_imagefolder_round_trip(tmp_path):
    images = _images(3)
    folder = write_imagefolder(tmp_path / "set", images, ["a dog", "a cat", "a car"], extra={"seed": 1})
    lines = [json.loads(line) for line in (folder / METADATA_FILE).read_text().splitlines()]
    assert lines[0] == {"file_name": "000000.png", "text": "a dog"}
    data = read_imagefolder(folder)
    assert data.texts == ["a dog", "a cat", "a car"] and len(data) == 3
    # PNG stores 8 bits: values come back exactly quantised.
    assert torch.equal(data.images, (images * 255).round() / 255)
    resized = read_imagefolder(folder, size=8)
    assert resized.images.shape == (3, 3, 8, 8)
    assert _no_temp_dirs(tmp_path)


def test_imagefolder_replacement_is_atomic(tmp_path, monkeypatch):
    folder = write_imagefolder(tmp_path / "set", _images(2), ["a", "b"])
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    import metaunlearn.data.imagefolder as imagefolder

    calls = {"n": 0}
    real = imagefolder.to_pil

    def failing(image):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("disk full")
        return real(image)

    monkeypatch.setattr(imagefolder, "to_pil", failing)
    with pytest.raises(RuntimeError, match="disk full"):
        write_imagefolder(folder, _images(4), ["c", "d", "e", "f"])
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert _no_temp_dirs(tmp_path)


def _folder_with(tmp_path: Path, lines: list[str], files: dict[str, bytes | None] | None = None) -> Path:
    folder = tmp_path / "bad"
    folder.mkdir()
    for name, content in (files or {}).items():
        if content is None:
            write_imagefolder(tmp_path / "src", _images(1), ["x"])
            shutil.copy(tmp_path / "src" / "000000.png", folder / name)
        else:
            (folder / name).write_bytes(content)
    if lines is not None:
        (folder / METADATA_FILE).write_text("\n".join(lines) + "\n")
    return folder


@pytest.mark.parametrize(
    "lines, files, message",
    [
        (None, {}, "is empty"),
        (None, {"a.png": None}, "has no metadata.jsonl"),
        ([], {}, "lists no images"),
        (['{"file_name": "a.png"}'], {"a.png": None}, "line 1: image a.png has no caption"),
        (['{"file_name": "a.png", "text": "  "}'], {"a.png": None}, "has no caption"),
        (['{"text": "a dog"}'], {}, "missing 'file_name'"),
        (['{"file_name": "gone.png", "text": "a dog"}'], {}, "gone.png not found"),
        (["{not json"], {}, "line 1: not valid JSON"),
        (["[1, 2]"], {}, "expected an object"),
    ],
)
def test_bad_imagefolders(tmp_path, lines, files, message):
    folder = _folder_with(tmp_path, lines, files)
    with pytest.raises(UserError, match=message):
        read_metadata(folder)


def test_corrupt_and_missing_folders(tmp_path):
    folder = _folder_with(tmp_path, ['{"file_name": "a.png", "text": "a dog"}'], {"a.png": b"\x89PNG\r\n\x1a\nbroken"})
    with pytest.raises(UserError, match=r"cannot read image .*a\.png"):
        read_imagefolder(folder)
    with pytest.raises(UserError, match="data folder not found"):
        read_metadata(tmp_path / "nowhere")
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="is a file, not a folder"):
        read_metadata(tmp_path / "file")


# ---- the data config ---------------------------------------------------------------------------------------------
def test_data_config_validation_and_helpers(tmp_path):
    cfg = validate(
        DataConfig,
        {
            "root": "out",
            "seed": 5,
            "sampler": {"steps": 7, "guidance": 2.0},
            "forget": {"prompts": ["a nude person"], "sampler": {"steps": 3}},
            "related": {"prompt_file": "related.txt", "test_prompts": ["a man"]},
            "irrelevant": {"folder": "user_data"},
        },
        "test.yaml",
    )
    assert cfg.roles() == ["forget", "related", "irrelevant"]
    assert cfg.sampler_for("forget") == SamplerSettings(steps=3, guidance=2.0)
    assert cfg.sampler_for("related").steps == 7
    assert cfg.seed_for("forget") == 5 and cfg.seed_for("related") != cfg.seed_for("forget")
    resolved = cfg.resolve_paths(tmp_path)
    assert resolved.root == tmp_path / "out" and resolved.cache_path == tmp_path / "out" / "cache"
    assert resolved.related.prompt_file == tmp_path / "related.txt"
    assert resolved.split_folder("irrelevant", "test") == tmp_path / "user_data" / "test"
    assert resolved.split_folder("forget", "train") == tmp_path / "out" / "forget" / "train"
    with pytest.raises(UserError, match="defines no 'related'"):
        validate(DataConfig, {"forget": {"prompts": ["x"]}}, "c.yaml").role("related")


@pytest.mark.parametrize(
    "data, message",
    [
        ({"forget": {"prompts": ["x"], "folder": "f"}}, "not both"),
        ({"forget": {}}, "give 'prompts', 'prompt_file' or 'folder'"),
        ({"forget": {"promts": ["x"]}}, "unknown key 'forget.promts'"),
        ({"forget": {"prompts": ["x"], "test_fraction": 1.5}}, "bad value for 'forget.test_fraction'"),
        ({}, "at least one of"),
    ],
)
def test_data_config_errors(data, message):
    with pytest.raises(UserError, match=message):
        validate(DataConfig, data, "c.yaml")


def test_split_items():
    items = split_items(["a", "b"], None, images_per_prompt=5, test_fraction=0.2, seed=0)
    assert len(items) == 10 and sum(s == "test" for _, s in items) == 2
    assert items == split_items(["a", "b"], None, images_per_prompt=5, test_fraction=0.2, seed=0)
    assert items != split_items(["a", "b"], None, images_per_prompt=5, test_fraction=0.2, seed=1)
    held_out = split_items(["a"], ["z"], images_per_prompt=2, test_fraction=0.2, seed=0)
    assert held_out == [("a", "train"), ("a", "train"), ("z", "test"), ("z", "test")]
    few = split_items(["a"], None, images_per_prompt=2, test_fraction=0.1, seed=0)
    assert sorted(s for _, s in few) == ["test", "train"]
    with pytest.raises(UserError, match="cannot be split"):
        split_items(["a"], None, images_per_prompt=1, test_fraction=0.2, seed=0)


# ---- generation -------------------------------------------------------------------------------------------------
def test_generate_folder(sd, tmp_path):
    out = generate_folder(sd, ["a dog", "a cat"], tmp_path / "set", images_per_prompt=3, seed=4, sampler=FAST, progress=False)
    data = read_imagefolder(out)
    assert data.texts == ["a dog"] * 3 + ["a cat"] * 3
    assert data.images.shape == (6, 3, 16, 16)
    # Image i uses seed+i whatever the batch size.
    other = generate_folder(
        sd, ["a dog", "a cat"], tmp_path / "set1", images_per_prompt=3, seed=4,
        sampler=FAST.model_copy(update={"batch_size": 1}), progress=False,
    )
    assert torch.equal(read_imagefolder(other).images, data.images)
    # Same settings again: nothing is rewritten.
    stamp = (out / METADATA_FILE).stat().st_mtime_ns
    generate_folder(sd, ["a dog", "a cat"], out, images_per_prompt=3, seed=4, sampler=FAST, progress=False)
    assert (out / METADATA_FILE).stat().st_mtime_ns == stamp
    # Other settings into an existing folder need overwrite.
    with pytest.raises(UserError, match="--overwrite"):
        generate_folder(sd, ["a bird"], out, images_per_prompt=1, sampler=FAST, progress=False)
    generate_folder(sd, ["a bird"], out, images_per_prompt=1, sampler=FAST, overwrite=True, progress=False)
    assert read_metadata(out)[0].text == "a bird" and len(read_metadata(out)) == 1
    assert _no_temp_dirs(tmp_path)


def test_failed_generation_keeps_existing_folder(sd, tmp_path, monkeypatch):
    out = generate_folder(sd, ["a dog"], tmp_path / "set", images_per_prompt=2, sampler=FAST, progress=False)
    files = lambda: {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()}  # noqa: E731
    before = files()
    real, calls = sd.sample, {"n": 0}

    def crash_on_second_batch(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(sd, "sample", crash_on_second_batch)
    with pytest.raises(KeyboardInterrupt):
        generate_folder(sd, ["a cat"], out, images_per_prompt=8, sampler=FAST, overwrite=True, progress=False)
    assert files() == before
    assert _no_temp_dirs(tmp_path)


def test_generate_data_from_config(sd, tmp_path):
    user = tmp_path / "user"
    write_imagefolder(user / "train", _images(2), ["a car", "a bus"])
    write_imagefolder(user / "test", _images(1), ["a bike"])
    cfg = validate(
        DataConfig,
        {
            "root": str(tmp_path / "data"),
            "sampler": FAST.model_dump(),
            "forget": {"prompts": ["a nude person"], "images_per_prompt": 4, "test_fraction": 0.25},
            "related": {"prompts": ["a woman"], "test_prompts": ["a man"], "images_per_prompt": 2},
            "irrelevant": {"folder": str(user)},
        },
        "c.yaml",
    )
    folders = generate_data(sd, cfg, progress=False)
    counts = {key: len(read_metadata(path)) for key, path in folders.items()}
    assert counts == {
        ("forget", "train"): 3, ("forget", "test"): 1,
        ("related", "train"): 2, ("related", "test"): 2,
        ("irrelevant", "train"): 2, ("irrelevant", "test"): 1,
    }
    assert read_metadata(folders[("related", "test")])[0].text == "a man"
    assert folders[("irrelevant", "train")] == user / "train"
    # Roles sample from different seeds: their first images differ even for the same prompt.
    f0 = read_imagefolder(folders[("forget", "train")]).images[0]
    r0 = read_imagefolder(folders[("related", "train")]).images[0]
    assert not torch.equal(f0, r0)


# ---- cache ------------------------------------------------------------------------------------------------------
def test_cached_set_computes_once_and_matches_direct_encoding(tiny_sd_dir, tmp_path, monkeypatch):
    sd = load_backbone(tiny_sd_dir)
    folder = write_imagefolder(tmp_path / "forget" / "train", _images(5), [f"prompt {i}" for i in range(5)])
    data = cached_set(sd, folder, tmp_path / "cache", batch_size=2, progress=False)
    assert len(data) == 5 and data.latents.shape == (5, 4, 8, 8)
    images = read_imagefolder(folder, size=sd.resolution).images
    assert torch.allclose(data.latents, sd.encode_images(images), atol=1e-6)
    direct = sd.encode_prompts([f"prompt {i}" for i in range(5)])
    assert torch.allclose(data.cond["encoder_hidden_states"], direct["encoder_hidden_states"], atol=1e-6)
    files = list((tmp_path / "cache").iterdir())
    assert len(files) == 1 and files[0].name.startswith("forget-train-")

    monkeypatch.setattr(sd, "encode_images", lambda *_: (_ for _ in ()).throw(AssertionError("re-encoded")))
    again = cached_set(sd, folder, tmp_path / "cache", progress=False)
    assert torch.equal(again.latents, data.latents) and again.texts == data.texts


def test_cache_key_follows_data_and_encoders(tiny_sd_dir, tmp_path):
    model = Path(shutil.copytree(tiny_sd_dir, tmp_path / "model"))
    sd = load_backbone(model)
    folder = write_imagefolder(tmp_path / "set", _images(2), ["a", "b"])
    key = cache_file(sd, folder, tmp_path / "c")
    data_fp = data_fingerprint(folder)

    # New captions -> new data fingerprint and cache file.
    lines = (folder / METADATA_FILE).read_text().replace('"a"', '"a dog"')
    (folder / METADATA_FILE).write_text(lines)
    assert data_fingerprint(folder) != data_fp
    assert cache_file(sd, folder, tmp_path / "c") != key
    key = cache_file(sd, folder, tmp_path / "c")

    # A changed UNet (e.g. an unlearned copy) shares the cache; a changed text encoder does not.
    enc = encoder_fingerprint(sd)
    unet_file = next((model / "unet").glob("*.safetensors"))
    unet_file.write_bytes(unet_file.read_bytes() + b" ")
    assert encoder_fingerprint(sd) == enc
    te_config = model / "text_encoder" / "config.json"
    cfg = json.loads(te_config.read_text())
    cfg["layer_norm_eps"] = 2e-5
    te_config.write_text(json.dumps(cfg))
    assert encoder_fingerprint(sd) != enc
    assert cache_file(sd, folder, tmp_path / "c") != key


def test_cache_of_in_memory_backbone_and_sdxl(tiny_sdxl_dir, tmp_path):
    from metaunlearn.backbones.sdxl import StableDiffusionXLBackbone
    from metaunlearn.testing.tiny_pipelines import build_tiny_sdxl

    folder = write_imagefolder(tmp_path / "set", _images(3), ["a", "b", "c"])
    loaded = load_backbone(tiny_sdxl_dir)
    data = cached_set(loaded, folder, tmp_path / "cache", progress=False)
    assert set(data.cond) == {"encoder_hidden_states", "text_embeds", "time_ids"}
    assert data.cond["time_ids"].shape == (3, 6)
    # Without a model folder the encoder weights and tokenizer vocabularies themselves are hashed.
    mem = StableDiffusionXLBackbone(build_tiny_sdxl(0), source="in-memory")
    fp = encoder_fingerprint(mem)
    assert fp == encoder_fingerprint(mem)
    with torch.no_grad():
        mem.pipe.text_encoder_2.text_model.final_layer_norm.weight.add_(1e-3)
    assert encoder_fingerprint(mem) != fp
    changed = encoder_fingerprint(mem)
    mem.pipe.unet.conv_in.weight.data.add_(1.0)  # the UNet does not enter the key
    assert encoder_fingerprint(mem) == changed
    assert os.path.exists(cache_file(loaded, folder, tmp_path / "cache"))


def test_generate_config_through_cli(run_cli, tiny_sd_dir, tmp_path):
    (tmp_path / "prompts").mkdir()
    (tmp_path / "prompts" / "forget.csv").write_text('prompt,evaluation_seed\n"a nude person, photo",1\nbare skin,2\n')
    config = tmp_path / "exp.yaml"
    config.write_text(
        f"model: {tiny_sd_dir}\n"
        "report: {title: t}   # another command's section: not generate's business\n"
        "data:\n"
        "  root: out\n"
        "  sampler: {steps: 2, guidance: 3.0}\n"
        "  forget: {prompt_file: prompts/forget.csv, images_per_prompt: 2, test_fraction: 0.25}\n"
        "  irrelevant: {prompts: [a dog], test_prompts: [a cat], images_per_prompt: 1}\n"
    )
    result = run_cli("generate", "--config", config, "--cache", "--quiet")
    assert result.exit_code == 0, result.stderr
    root = tmp_path / "out"  # relative to the config file, not the working directory
    assert [r.text for r in read_metadata(root / "irrelevant" / "test")] == ["a cat"]
    assert len(read_metadata(root / "forget" / "train")) == 3 and len(read_metadata(root / "forget" / "test")) == 1
    assert len(list((root / "cache").glob("*.safetensors"))) == 4
    assert oct((root / "forget" / "train").stat().st_mode & 0o777) != oct(0o700)
    stamp = (root / "forget" / "train" / METADATA_FILE).stat().st_mtime_ns
    again = run_cli("generate", "--config", config, "--role", "forget", "--quiet")
    assert again.exit_code == 0, again.stderr
    assert (root / "forget" / "train" / METADATA_FILE).stat().st_mtime_ns == stamp
