"""Wall time of ``metaunlearn --help``, ``--version`` and every ``COMMAND --help`` (each a fresh process).

    python benchmarks/cli_startup.py [--runs 10] [--exe PATH]

Runs the installed ``metaunlearn`` console script next to this Python (or ``--exe``), each command ``--runs`` times
after one warm-up, and prints the median and the slowest run in seconds. The target is under 1 s for every line.
Also prints which heavy libraries (torch, diffusers, ...) a bare ``import metaunlearn.cli`` pulled in (none).
"""

from __future__ import annotations

import argparse
import json
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


def wall(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--exe", type=Path, default=Path(sys.executable).with_name("metaunlearn"))
    args = parser.parse_args()
    exe = [str(args.exe)] if args.exe.exists() else [sys.executable, "-m", "metaunlearn.cli"]
    print(f"{' '.join(exe)} — {args.runs} runs each after one warm-up")
    print(f"{'command':<32} {'median s':>9} {'max s':>7}")
    for argv in COMMANDS:
        wall(exe + argv)
        times = [wall(exe + argv) for _ in range(args.runs)]
        print(f"{' '.join(argv):<32} {statistics.median(times):>9.3f} {max(times):>7.3f}")
    probe = f"import json, sys; import metaunlearn.cli; print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    loaded = json.loads(subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True,
                                       text=True).stdout)
    print(f"heavy modules after 'import metaunlearn.cli': {', '.join(loaded) or 'none'}")


if __name__ == "__main__":
    main()
