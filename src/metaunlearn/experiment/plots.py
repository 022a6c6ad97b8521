"""Figures of a report: relearning curves as small multiples (matplotlib, Agg).

Nothing here shows a window; every figure is written as PNG with the usual file permissions. numpy and matplotlib are
imported on use.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from metaunlearn.atomic import atomic_write_bytes
from metaunlearn.images import image_grid, pixelate, save_png  # noqa: F401  (also importable from here)

VARIANT_COLOURS = {"plain": "#D55E00", "meta": "#0072B2", "base": "#7F7F7F", "reference": "#009E73",
                   "control": "#CC79A7"}
"""Fixed colours (Okabe–Ito, colour-blind safe): plain vermilion, meta blue, base grey, reference green, control pink."""
VARIANT_LABELS = {"plain": "plain", "meta": "meta", "base": "base model (no unlearning)",
                  "reference": "reference (never saw the concept)", "control": "control (plain, equal damage)"}


def save_figure(fig, path: str | Path) -> Path:
    """Save a matplotlib figure as PNG atomically and close it."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    finally:
        plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())


@dataclass
class Curve:
    """One line of a panel: a metric against attack steps, mean over ``n`` seeds (± std where ``n`` > 1)."""

    variant: str
    steps: Sequence[float]
    mean: Sequence[float]
    std: Sequence[float]
    n: Sequence[int]
    dashed: bool = False
    label: str = ""


def small_multiples(
    panels: Mapping[tuple[str, str], Sequence[Curve]],
    title: str,
    ylabel: str,
    budget: int | None = None,
    line_styles: Mapping[str, str] | None = None,
):
    """A grid of panels, rows × columns from the keys ``(row, column)`` (e.g. attack × method), sharing both axes.

    Each panel draws its curves in the variant's fixed colour (:data:`VARIANT_COLOURS`), a band of ± one std where a
    point has more than one seed, and the attack ``budget`` as a vertical dotted line. ``line_styles`` names what a
    dashed line means in the legend (e.g. ``{"solid": "related", "dashed": "irrelevant"}``).
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.lines import Line2D

    rows = list(dict.fromkeys(r for r, _ in panels))
    cols = list(dict.fromkeys(c for _, c in panels))
    width, height = max(4.8, 2.5 * len(cols) + 0.9), 2.1 * len(rows) + 1.0
    fig, axes = plt.subplots(len(rows), len(cols), figsize=(width, height), sharex=True, sharey=True, squeeze=False)
    variants: dict[str, None] = {}
    banded = False
    for i, row in enumerate(rows):
        for j, col in enumerate(cols):
            ax = axes[i][j]
            for curve in panels.get((row, col), []):
                x = np.asarray(curve.steps, dtype=float)
                m = 100 * np.asarray(curve.mean, dtype=float)
                s = 100 * np.nan_to_num(np.asarray(curve.std, dtype=float))
                colour = VARIANT_COLOURS.get(curve.variant, "#000000")
                width = 1.2 if curve.variant in ("base", "reference") else 1.8
                ax.plot(x, m, "--" if curve.dashed else "-", marker="o", ms=3, lw=width, color=colour)
                several = np.asarray(curve.n) > 1
                if several.any():
                    banded = True
                    ax.fill_between(x, np.where(several, m - s, m), np.where(several, m + s, m), color=colour,
                                    alpha=0.18, linewidth=0)
                variants.setdefault(curve.variant, None)
            if budget is not None:
                ax.axvline(budget, color="#333333", lw=1, ls=":")
            ax.set_ylim(-4, 104)
            ax.set_yticks([0, 50, 100])
            ax.grid(alpha=0.25)
            ax.tick_params(labelsize=8.5)
            if i == 0:
                ax.set_title(col, fontsize=10, fontweight="bold")
            if j == 0:
                ax.set_ylabel(f"{row}\n{ylabel}", fontsize=8.5)
            if i == len(rows) - 1:
                ax.set_xlabel("attack steps", fontsize=8.5)
            if budget is not None and i == 0 and j == len(cols) - 1:
                ax.annotate("budget", (budget, 103), xytext=(3, -1), textcoords="offset points", fontsize=7.5,
                            color="#333333", va="top")
    order = [v for v in ("plain", "control", "meta", "reference", "base") if v in variants] + [v for v in variants if v not in VARIANT_COLOURS]
    handles = [Line2D([], [], color=VARIANT_COLOURS.get(v, "#000000"), lw=2, marker="o", ms=3) for v in order]
    labels = [VARIANT_LABELS.get(v, v) for v in order]
    if line_styles:
        for style, meaning in line_styles.items():
            handles.append(Line2D([], [], color="#555555", lw=1.5, ls="--" if style == "dashed" else "-"))
            labels.append(meaning)
    if budget is not None:
        handles.append(Line2D([], [], color="#333333", lw=1, ls=":"))
        labels.append(f"attack budget ({budget} steps)")
    if banded:
        handles.append(plt.Rectangle((0, 0), 1, 1, color="#555555", alpha=0.18, lw=0))
        labels.append("± 1 std over seeds")
    # Title and legend take a fixed band above the panels, whatever the number of rows.
    ncol = min(len(labels), 4 if len(cols) < 3 else 6)
    legend_rows = math.ceil(len(labels) / ncol)
    top = 0.12 + 0.2 * legend_rows
    fig.suptitle(title, fontsize=11.5, y=1 - 0.06 / height, va="top")
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 1 - 0.34 / height), ncol=ncol,
               frameon=False, fontsize=8.5)
    fig.tight_layout(rect=(0, 0, 1, 1 - (top + 0.08) / height))
    return fig
