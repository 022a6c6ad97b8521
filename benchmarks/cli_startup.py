"""Wall time of ``metaunlearn --help``, ``--version`` and every ``COMMAND --help`` (each a fresh process).

    python benchmarks/cli_startup.py [--runs 10] [--exe PATH]

Runs the installed ``metaunlearn`` console script next to this Python (or ``--exe``), each command ``--runs`` times
after one warm-up, and prints the median and slowest wall time and the median CPU time (user + system) in seconds.
The target is under 1 s for every line. On a busy machine wall time exceeds CPU time; on an idle core they meet.
Also prints which heavy libraries (torch, diffusers, ...) a bare ``import metaunlearn.cli`` pulled in (none).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

COMMANDS = [
    ["--help"], ["--version"], ["generate", "--help"], ["unlearn", "--help"], ["attack", "--help"],
    ["report", "--help"], ["run", "--help"], ["demo", "--help"], ["toy", "--help"], ["toy", "pretrain", "--help"],
    ["toy", "evaluate", "--help"], ["toy", "render", "--help"],
]
HEAVY = ("torch", "diffusers", "transformers", "accelerate", "peft", "matplotlib", "numpy", "PIL")


def timed(cmd: list[str]) -> tuple[float, float]:
    """``(wall, cpu)`` seconds of one run of ``cmd``."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--exe", type=Path, default=Path(sys.executable).with_name("metaunlearn"))
    args = parser.parse_args()
    exe = [str(args.exe)] if args.exe.exists() else [sys.executable, "-m", "metaunlearn.cli"]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"{' '.join(exe)} — {args.runs} runs each after one warm-up; load average {load:.1f} on {os.cpu_count()} CPUs")
    print(f"{'command':<32} {'wall median s':>13} {'wall max s':>10} {'CPU median s':>12}")
    for argv in COMMANDS:
        timed(exe + argv)
        runs = [timed(exe + argv) for _ in range(args.runs)]
        walls, cpus = [w for w, _ in runs], [c for _, c in runs]
        print(f"{' '.join(argv):<32} {statistics.median(walls):>13.3f} {max(walls):>10.3f} {statistics.median(cpus):>12.3f}")
    probe = f"import json, sys; import metaunlearn.cli; print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    loaded = json.loads(subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True,
                                       text=True).stdout)
    print(f"heavy modules after 'import metaunlearn.cli': {', '.join(loaded) or 'none'}")


if __name__ == "__main__":
    main()
