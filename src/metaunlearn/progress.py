"""The one rich progress display long work uses (count, rate, elapsed, ETA), and quieter libraries beside it."""

from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text


class RateColumn(ProgressColumn):
    """Items (images, steps) per second, or seconds per item when slower than one per second."""

    def __init__(self, unit: str = "it") -> None:
        super().__init__()
        self.unit = unit

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        if not speed and task.elapsed and task.completed:
            speed = task.completed / task.elapsed
        if not speed:
            return Text(f"? {self.unit}/s", style="progress.data.speed")
        if speed >= 1:
            return Text(f"{speed:.2f} {self.unit}/s", style="progress.data.speed")
        return Text(f"{1 / speed:.2f} s/{self.unit}", style="progress.data.speed")


def quiet_libraries() -> None:
    """diffusers and transformers: errors only and no loading/saving bars (the toolkit shows its own progress)."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()


def progress_bar(unit: str = "it", *, enabled: bool = True, console: Console | None = None) -> Progress:
    """A rich progress display with count, rate, elapsed time, ETA and a free ``info`` field (e.g. loss terms)."""
    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        RateColumn(unit),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
        disable=not enabled,
        console=console or Console(stderr=True),
    )
