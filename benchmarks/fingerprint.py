"""Time the content fingerprint of a large weights file: the first SHA-256 pass and the cached lookup after it.

    python benchmarks/fingerprint.py [--mib 512] [--file PATH]

Without ``--file`` a file of random bytes is written to a temporary folder (and removed). Prints seconds and GiB/s.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=512, help="size of the generated file")
    parser.add_argument("--file", type=Path, help="an existing file to fingerprint instead")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["METAUNLEARN_CACHE"] = str(Path(tmp) / "cache")
        from metaunlearn.identity import file_digest

        path = args.file
        if path is None:
            path = Path(tmp) / "weights.bin"
            with open(path, "wb") as f:
                for _ in range(args.mib):
                    f.write(os.urandom(1 << 20))
        size = path.stat().st_size / (1 << 30)
        began = time.perf_counter()
        file_digest(path)
        first = time.perf_counter() - began
        began = time.perf_counter()
        file_digest(path)
        cached = time.perf_counter() - began
    print(f"{size:.2f} GiB: first fingerprint {first:.2f} s ({size / first:.2f} GiB/s), cached {cached * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
