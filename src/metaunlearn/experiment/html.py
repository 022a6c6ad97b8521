"""A self-contained HTML page (inline CSS, images as base64 PNG data URIs) and Markdown from the same tables."""

from __future__ import annotations

import base64
import html
import os
from dataclasses import dataclass, field
from pathlib import Path

CSS = """
body{font-family:-apple-system,'Segoe UI',Helvetica,Arial,sans-serif;margin:24px auto;max-width:1150px;color:#1d1d1f;
     line-height:1.45;padding:0 16px}
h1{font-size:1.6em;margin-bottom:4px}h2{font-size:1.25em;margin-top:32px;border-bottom:1px solid #ddd;padding-bottom:4px}
p.meta{color:#666;margin-top:0}p.note{color:#555;font-size:.9em}
table{border-collapse:collapse;margin:8px 0 4px;font-size:.92em}
th,td{border:1px solid #d0d0d0;padding:4px 9px;text-align:right;white-space:nowrap}
th{background:#f3f4f6}td.l,th.l{text-align:left}tr:nth-child(even) td{background:#fafafa}
img.fig{max-width:100%;height:auto;border:1px solid #eee}figure{margin:12px 0 20px}
div.wide{overflow-x:auto;max-width:100%}h3{font-size:1.02em;margin:22px 0 4px}
table.grids td,table.grids th{text-align:center;vertical-align:top}table.grids img{image-rendering:pixelated;width:220px}
"""


@dataclass
class Table:
    """A table shown identically in Markdown and HTML; the first ``label_columns`` columns are left-aligned."""

    title: str
    columns: list[str]
    rows: list[list[str]]
    note: str = ""
    label_columns: int = 1

    def markdown(self) -> str:
        out = [f"### {self.title}", "", "| " + " | ".join(self.columns) + " |"]
        out.append("|" + "|".join(":--" if i < self.label_columns else "--:" for i in range(len(self.columns))) + "|")
        out += ["| " + " | ".join(r) + " |" for r in self.rows]
        if self.note:
            out += ["", f"_{self.note}_"]
        return "\n".join(out) + "\n"

    def html(self) -> str:
        def cell(tag: str, i: int, text: str) -> str:
            cls = ' class="l"' if i < self.label_columns else ""
            return f"<{tag}{cls}>{html.escape(text)}</{tag}>"

        head = "".join(cell("th", i, c) for i, c in enumerate(self.columns))
        body = "".join("<tr>" + "".join(cell("td", i, c) for i, c in enumerate(r)) + "</tr>" for r in self.rows)
        note = f'<p class="note">{html.escape(self.note)}</p>' if self.note else ""
        table = f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
        return f'<h3>{html.escape(self.title)}</h3><div class="wide">{table}</div>{note}'


def data_uri(png: Path) -> str:
    """A PNG file as a ``data:image/png;base64,…`` URI."""
    return "data:image/png;base64," + base64.b64encode(Path(png).read_bytes()).decode("ascii")


@dataclass
class Section:
    """A report section: text, tables, figures (PNG paths with captions) and an optional grid table."""

    title: str
    text: str = ""
    tables: list[Table] = field(default_factory=list)
    figures: list[tuple[Path, str]] = field(default_factory=list)
    grid_rows: list[tuple[str, list[tuple[Path | None, str]]]] = field(default_factory=list)
    grid_columns: list[str] = field(default_factory=list)


def _rel(path: Path, base: Path) -> str:
    return Path(os.path.relpath(Path(path).resolve(), Path(base).resolve())).as_posix()


def render_markdown(title: str, subtitle: str, sections: list[Section], base: Path) -> str:
    """Markdown with figures linked relative to ``base`` (the report's folder)."""
    out = [f"# {title}", "", subtitle, ""]
    for s in sections:
        out += [f"## {s.title}", ""]
        if s.text:
            out += [s.text, ""]
        for path, caption in s.figures:
            out += [f"![{Path(path).stem.replace('_', ' ')}]({_rel(path, base)})", "", f"_{caption}_", ""]
        out += [t.markdown() for t in s.tables]
        if s.grid_rows:
            out += ["| " + " | ".join(s.grid_columns) + " |", "|" + "|".join(":-:" for _ in s.grid_columns) + "|"]
            for label, cells in s.grid_rows:
                rendered = [f"![{cap}]({_rel(p, base)})" if p else "—" for p, cap in cells]
                out.append("| " + " | ".join([label, *rendered]) + " |")
            out.append("")
    return "\n".join(out)


def render_html(title: str, subtitle: str, sections: list[Section]) -> str:
    """One self-contained page: every image is embedded as base64 PNG."""
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1><p class=\"meta\">{html.escape(subtitle)}</p>",
    ]
    for s in sections:
        parts.append(f"<h2>{html.escape(s.title)}</h2>")
        if s.text:
            parts.append(f"<p>{html.escape(s.text)}</p>")
        for path, caption in s.figures:
            parts.append(
                f'<figure><img class="fig" src="{data_uri(path)}" alt="{html.escape(caption)}">'
                f"<figcaption class=\"note\">{html.escape(caption)}</figcaption></figure>"
            )
        parts += [t.html() for t in s.tables]
        if s.grid_rows:
            head = "".join(f"<th>{html.escape(c)}</th>" for c in s.grid_columns)
            rows = []
            for label, cells in s.grid_rows:
                tds = "".join(
                    f'<td><img src="{data_uri(p)}" alt="{html.escape(cap)}"><br><span class="note">{html.escape(cap)}</span></td>'
                    if p else "<td>—</td>"
                    for p, cap in cells
                )
                rows.append(f'<tr><td class="l">{html.escape(label)}</td>{tds}</tr>')
            parts.append(f'<div class="wide"><table class="grids"><thead><tr>{head}</tr></thead>'
                         f'<tbody>{"".join(rows)}</tbody></table></div>')
    parts.append("</body></html>")
    return "\n".join(parts)
