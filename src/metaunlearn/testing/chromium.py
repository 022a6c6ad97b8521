"""Look at a report the way a reader does: render its HTML in headless Chromium (screenshot, and what the page saw).

    python -m metaunlearn.testing.chromium RUN_DIR/report.html [OUT.png] [--width 1280] [--height 2400]

writes a screenshot and prints what the page reported after loading: how many images decoded (and their sizes),
tables, and whether anything is wider than the window. ``tests/test_report_html.py`` runs the same check. Needs
Debian's ``chromium`` (``apt-get install -y chromium``); nothing is fetched from the network.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars",
    "--mute-audio", "--disable-extensions",
)
PROBE_ID = "metaunlearn-probe"
# Runs after the page has loaded (every data: image decoded) and writes what it found into the DOM, which
# --dump-dom prints.
PROBE = f"""<script>
window.addEventListener("load", () => {{
  const imgs = [...document.images].map(i => ({{alt: i.alt, complete: i.complete, natural: [i.naturalWidth, i.naturalHeight],
                                              shown: [i.clientWidth, i.clientHeight]}}));
  const root = document.documentElement;
  const out = {{images: imgs, tables: document.querySelectorAll("table").length,
               page_width: root.scrollWidth, window_width: window.innerWidth, page_height: root.scrollHeight,
               title: document.title}};
  const pre = document.createElement("pre");
  pre.id = "{PROBE_ID}";
  pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
}});
</script>"""
EXTERNAL = re.compile(r"""(?:src|href)\s*=\s*["'](?!data:|#)([^"']+)["']""", re.IGNORECASE)


def find_chromium() -> str | None:
    """The Chromium executable on PATH, or ``None``."""
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def external_references(html: str) -> list[str]:
    """Every ``src``/``href`` that is not a ``data:`` URI or an in-page anchor (a self-contained page has none)."""
    return EXTERNAL.findall(html)


def _run(browser: str, args: list[str], timeout: float) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        return subprocess.run([browser, *FLAGS, f"--user-data-dir={profile}", *args], capture_output=True,
                              text=True, timeout=timeout)


def inspect_page(html_file: str | Path, width: int = 1280, height: int = 2400, screenshot: str | Path | None = None,
                 browser: str | None = None, timeout: float = 120) -> dict:
    """Load ``html_file`` in headless Chromium at ``width``×``height``; return what the page saw after loading
    (``images`` with decoded sizes, ``tables``, ``page_width`` vs ``window_width``) and write ``screenshot``."""
    browser = browser or find_chromium()
    if browser is None:
        raise FileNotFoundError("chromium not found (apt-get install -y chromium)")
    html_file = Path(html_file).resolve()
    with tempfile.TemporaryDirectory(prefix="report-probe-") as tmp:
        probed = Path(tmp) / html_file.name
        text = html_file.read_text()
        probed.write_text(text.replace("</body>", PROBE + "</body>", 1) if "</body>" in text else text + PROBE)
        window = f"--window-size={width},{height}"
        dom = _run(browser, [window, "--virtual-time-budget=10000", "--dump-dom", probed.as_uri()], timeout)
        found = re.search(rf'<pre id="{PROBE_ID}">(.*?)</pre>', dom.stdout, re.DOTALL)
        if not found:
            raise RuntimeError(f"chromium did not render the page (exit {dom.returncode}): {dom.stderr.strip()[-500:]}")
        seen = json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&").replace("&lt;", "<")
                          .replace("&gt;", ">"))
    if screenshot is not None:
        screenshot = Path(screenshot).resolve()
        screenshot.unlink(missing_ok=True)
        _run(browser, [f"--window-size={width},{height}", f"--screenshot={screenshot}", html_file.as_uri()], timeout)
        if not screenshot.is_file() or screenshot.stat().st_size == 0:
            raise RuntimeError("chromium wrote no screenshot")
    return seen


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Render a report.html in headless Chromium and take a screenshot.")
    parser.add_argument("html", type=Path)
    parser.add_argument("out", type=Path, nargs="?")
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=2400)
    args = parser.parse_args(argv)
    if not args.html.is_file():
        print(f"error: {args.html} not found", file=sys.stderr)
        return 2
    external = external_references(args.html.read_text())
    if external:
        print(f"error: {args.html} is not self-contained; it references {', '.join(external[:5])}", file=sys.stderr)
        return 1
    out = args.out or args.html.with_suffix(".png")
    try:
        seen = inspect_page(args.html, args.width, args.height, screenshot=out)
    except (FileNotFoundError, RuntimeError, subprocess.TimeoutExpired) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    broken = [i["alt"] for i in seen["images"] if not i["complete"] or 0 in i["natural"]]
    print(f"screenshot: {out} ({args.width}x{args.height}); page {seen['page_width']}x{seen['page_height']} px, "
          f"{seen['tables']} tables, {len(seen['images'])} images, {len(broken)} not decoded")
    if seen["page_width"] > seen["window_width"]:
        print(f"warning: the page is wider ({seen['page_width']} px) than the window ({seen['window_width']} px)")
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
