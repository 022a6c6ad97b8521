"""The report as a reader sees it: rendered in headless Chromium (skipped only when Chromium is not installed).

The run directory is built from synthetic result rows shaped like the demo's (four methods, plain and meta, three
attacks on the primary set, three other sets, three seeds) with sample grids, so no model is trained here.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from metaunlearn.attacks.sweep import write_jsonl
from metaunlearn.experiment.report import ReportConfig, build_report
from metaunlearn.testing.chromium import external_references, find_chromium, inspect_page

METHODS = ("esd", "sdd", "uce", "rece")
PRIMARY_ATTACKS = (("full", 1e-4), ("full", 3e-4), ("lora", 3e-4))
OTHER_SETS = ("hrm-s", "clean", "related")


def _rate(variant: str, attack_set: str, mode: str, lr: float, step: int, rng: random.Random) -> float:
    """A plausible forget rate: plain relearns fast, meta slower; LoRA and benign sets hardly at all."""
    if step == 0 or attack_set in ("clean", "related"):
        return min(1.0, max(0.0, 0.02 * rng.random()))
    speed = (lr / 1e-4) * (0.15 if mode == "lora" else 1.0) * (0.25 if variant == "meta" else 1.0)
    return min(1.0, max(0.0, 1 - (1 - 0.04) ** (speed * step) + 0.08 * (rng.random() - 0.5)))


def synthetic_demo_run(run_dir: Path, seeds: int = 3) -> Path:
    """Result rows and grid PNGs in the attack stage's layout."""
    import torch

    from metaunlearn.experiment.plots import image_grid, save_png

    for method in METHODS:
        for variant in ("plain", "meta"):
            model = f"{method}-{variant}"
            for seed in range(seeds):
                rng = random.Random(f"{model}/{seed}")
                runs = [("hrm-m", mode, lr, (0, 25, 100)) for mode, lr in PRIMARY_ATTACKS]
                runs += [(s, "full", 1e-4, (0, 50)) for s in OTHER_SETS]
                for attack_set, mode, lr, steps in runs:
                    name = f"{mode}_lr{lr:g}_s{seed}"
                    rows = []
                    for step in steps:
                        rate = _rate(variant, attack_set, mode, lr, step, rng)
                        grid = None
                        if (attack_set, mode, lr, seed) == ("hrm-m", "full", 1e-4, 0):  # the runs the report shows
                            grid = f"grids/{model}/{attack_set}/{name}/step{step}.png"
                            images = torch.zeros(8, 3, 16, 16)
                            images[:, 0, 4:12, 4:12] = rate
                            images[:, 1, 4:12, 4:12] = 1 - rate
                            save_png(image_grid(images, ncol=4), run_dir / grid)
                        related = 1.0 - (0.5 * rate if variant == "meta" else 0.05 * rate) - 0.03 * rng.random()
                        rows.append({"model": model, "method": method, "variant": variant, "attack_set": attack_set,
                                     "mode": mode, "lr": lr, "seed": seed, "step": step, "grid": grid,
                                     "forget_rate": rate, "related_acc": related,
                                     "irrelevant_acc": 1.0 - 0.05 * rng.random(), "attack_loss": 0.1 - 0.0003 * step})
                    write_jsonl(rows, run_dir / "attacks" / model / attack_set / f"{name}.jsonl")
    return run_dir


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    run_dir = synthetic_demo_run(tmp_path_factory.mktemp("demo-like"))
    config = ReportConfig(title="Synthetic demo-shaped run", primary_set="hrm-m", budget_steps=25,
                          set_order=["hrm-m", *OTHER_SETS])
    return build_report(run_dir, config=config)


def test_report_html_is_self_contained(report):
    assert external_references(report.html.read_text()) == []


@pytest.mark.skipif(find_chromium() is None, reason="chromium is not installed (apt-get install -y chromium)")
def test_report_renders_in_headless_chromium(report, tmp_path):
    shot = tmp_path / "report.png"
    seen = inspect_page(report.html, width=1280, height=2400, screenshot=shot)

    # Every image decoded, at its full size where the window allows it (figures are not squeezed below 900 px).
    figures = [i for i in seen["images"] if "attack steps" in i["alt"]]
    grids = [i for i in seen["images"] if "attack steps" not in i["alt"]]
    assert len(figures) == 3 and len(grids) == 8 * 2
    assert all(i["complete"] and min(i["natural"]) > 0 for i in seen["images"])
    assert all(i["shown"][0] >= min(900, i["natural"][0]) for i in figures), figures
    assert seen["tables"] >= 5
    # Nothing makes the page scroll sideways at a common laptop width.
    assert seen["page_width"] <= seen["window_width"], seen

    from PIL import Image

    with Image.open(shot) as image:
        assert image.size == (1280, 2400)
        colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 50  # a rendered page, not a blank one
