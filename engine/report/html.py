"""One self-contained HTML report per run: every image inline (data: URIs), no external file.

Sections: the model (sha256, providers, what was inferred), a method × image grid of heatmaps,
metric tables, timings, and — for compare — the agreement tables. Every string from a model file
or a user goes through ``html.escape`` after ``printable``.
"""

from __future__ import annotations

import base64
import html
from typing import Any

from ..text import printable

_STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222}
h1{font-size:20px} h2{font-size:16px;margin-top:28px}
table{border-collapse:collapse;margin:8px 0}
td,th{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#f3f3f3} img{display:block;max-width:224px;image-rendering:pixelated}
.grid td{text-align:center} .muted{color:#777;font-size:12px} code{font-size:12px}
"""


def esc(value: Any) -> str:
    return html.escape(printable(value))


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def table(rows: list[dict], columns: list[str] | None = None) -> str:
    if not rows:
        return "<p class=muted>none</p>"
    columns = columns or list(rows[0])
    head = "".join(f"<th>{esc(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{_cell(r.get(c))}</td>" for c in columns) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return esc("" if v is None else v)


def grid(
    images: list[str], methods: list[str], pngs: dict[tuple[str, int], bytes], captions: dict | None = None
) -> str:
    """Rows: images; columns: methods. ``pngs[(method, i)]``: the heatmap of image i."""
    head = "<th>image</th>" + "".join(f"<th>{esc(m)}</th>" for m in methods)
    rows = []
    for i, name in enumerate(images):
        cells = [f"<td>{esc(name)}</td>"]
        for m in methods:
            png = pngs.get((m, i))
            cap = (captions or {}).get((m, i), "")
            img = f'<img alt="{esc(m)} {esc(name)}" src="{data_uri(png)}">' if png else ""
            cells.append(f"<td>{img}<div class=muted>{esc(cap)}</div></td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table class=grid><tr>{head}</tr>{''.join(rows)}</table>"


def page(title: str, sections: list[tuple[str, str]]) -> str:
    """The whole document; ``sections``: (heading, already-escaped HTML body)."""
    body = "".join(f"<h2>{esc(h)}</h2>{b}" for h, b in sections)
    return (
        f"<!doctype html><html><head><meta charset=utf-8><title>{esc(title)}</title>"
        f"<style>{_STYLE}</style></head><body><h1>{esc(title)}</h1>{body}</body></html>"
    )
