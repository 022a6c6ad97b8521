#!/usr/bin/env bash
# Render a report.html in headless Chromium and write a screenshot, to check the page by eye.
#
#   scripts/check_report_html.sh RUN_DIR/report.html [OUT.png] [WIDTHxHEIGHT]
#
# Also checks that the page is self-contained (no src/href to files or the network) and that Chromium rendered
# a non-blank screenshot. Needs Debian's chromium (apt-get install -y chromium); not used by the test suite.
set -euo pipefail

html=${1:?usage: $0 REPORT.html [OUT.png] [WIDTHxHEIGHT]}
out=${2:-${html%.html}.png}
size=${3:-1200x2000}

[[ -f "$html" ]] || { echo "error: $html not found" >&2; exit 2; }
browser=$(command -v chromium || command -v chromium-browser || true)
[[ -n "$browser" ]] || { echo "error: chromium not installed (apt-get install -y chromium)" >&2; exit 2; }

# Self-contained: every image is a data: URI, nothing is fetched.
if grep -Eo '(src|href)="[^"#][^"]*"' "$html" | grep -v '"data:' | grep -q .; then
  echo "error: $html references external resources:" >&2
  grep -Eo '(src|href)="[^"#][^"]*"' "$html" | grep -v '"data:' | head -5 >&2
  exit 1
fi
images=$(grep -o 'src="data:image/png;base64,' "$html" | wc -l)
tables=$(grep -o '<table' "$html" | wc -l)

profile=$(mktemp -d)
trap 'rm -rf "$profile"' EXIT
abs=$(cd "$(dirname "$html")" && pwd)/$(basename "$html")
rm -f "$out"
timeout 120 "$browser" --headless --no-sandbox --disable-gpu --disable-background-networking \
  --disable-component-update --disable-sync --no-first-run --hide-scrollbars \
  --user-data-dir="$profile" --screenshot="$out" --window-size="${size/x/,}" "file://$abs" >/dev/null 2>&1 || true
[[ -s "$out" ]] || { echo "error: chromium wrote no screenshot" >&2; exit 1; }

# A blank page renders as one colour; a real report has many.
colours=$(python3 - "$out" <<'EOF'
import struct, sys, zlib
data = open(sys.argv[1], "rb").read()
assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
pos, idat, width, height = 8, b"", 0, 0
while pos < len(data):
    length, kind = struct.unpack(">I4s", data[pos:pos + 8])
    chunk = data[pos + 8:pos + 8 + length]
    if kind == b"IHDR":
        width, height = struct.unpack(">II", chunk[:8])
    elif kind == b"IDAT":
        idat += chunk
    pos += 12 + length
raw = zlib.decompress(idat)
# Sample raw scanline bytes (filtered, but a uniform image still yields very few distinct values).
print(len(set(raw[:: max(1, len(raw) // 200000)])))
EOF
)
echo "screenshot: $out ($size) — $tables tables, $images inline images, $colours distinct byte values"
if (( colours < 8 )); then
  echo "error: the screenshot looks blank" >&2
  exit 1
fi
