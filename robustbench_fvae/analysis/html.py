"""A self-contained HTML report page: tables as HTML, figures embedded as base64 PNG.

The page references nothing outside itself (no scripts, fonts or style sheets from the network,
no image files), so it can be mailed, archived or opened offline.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from dataclasses import dataclass
from html import escape
from pathlib import Path

from robustbench_fvae.analysis.tables import Table

_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 2em auto;
       max-width: 1200px; padding: 0 1em; color: #222; line-height: 1.4; }
h1 { font-size: 1.6em; } h2 { font-size: 1.25em; margin-top: 2em; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.9em; }
caption { text-align: left; font-weight: 600; padding-bottom: 0.3em; }
th, td { border-bottom: 1px solid #ddd; padding: 0.25em 0.6em; text-align: left;
         vertical-align: top; }
th { background: #f3f3f3; } td.num, th.num { text-align: right; white-space: nowrap; }
ul.notes { font-size: 0.85em; color: #444; margin-top: 0.2em; }
figure { margin: 1.2em 0; } figure img { max-width: 100%; height: auto; }
figcaption { font-size: 0.85em; color: #444; }
pre { background: #f6f6f6; padding: 0.8em; overflow-x: auto; font-size: 0.8em; }
.warn { color: #8a4b00; }
"""


@dataclass
class FigureItem:
    """A PNG file to embed with its caption."""

    path: Path
    caption: str


def png_data_uri(path: str | Path) -> str:
    """``data:image/png;base64,…`` of a PNG file (checked by its signature)."""
    data = Path(path).read_bytes()
    if not data.startswith(b"\x89PNG\r\n\x1a\n"):
        raise ValueError(f"{path} is not a PNG file")
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def table_html(table: Table, heading: bool = True) -> str:
    """One table: a heading, the table (best cells in bold, numbers right-aligned), its notes."""
    out = [f"<h2>{escape(table.title)}</h2>"] if heading else []
    out.append("<table>")
    out.append("<thead><tr>" + "".join(
        f'<th{" class=num" if j in table.numeric else ""}>{escape(h)}</th>'
        for j, h in enumerate(table.header)) + "</tr></thead>")
    out.append("<tbody>")
    for i, row in enumerate(table.rows):
        cells = []
        for j, c in enumerate(row):
            text = escape(c)
            if (i, j) in table.bold and c:
                text = f"<strong>{text}</strong>"
            cls = " class=num" if j in table.numeric else ""
            cells.append(f"<td{cls}>{text}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</tbody></table>")
    if table.notes:
        out.append('<ul class="notes">' + "".join(f"<li>{escape(n)}</li>" for n in table.notes)
                   + "</ul>")
    return "\n".join(out)


def render_page(
    *,
    title: str,
    intro: Sequence[str],
    tables: Sequence[Table],
    figures: Sequence[FigureItem],
    appendix_tables: Sequence[Table] = (),
    warnings: Sequence[str] = (),
    latex: str | None = None,
) -> str:
    """The whole page: intro lines, warnings, main tables, figures, then appendix tables and
    the LaTeX source (collapsed)."""
    parts = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
             f"<title>{escape(title)}</title>", f"<style>{_STYLE}</style>", "</head>", "<body>",
             f"<h1>{escape(title)}</h1>"]
    parts += [f"<p>{escape(line)}</p>" for line in intro]
    if warnings:
        parts.append('<ul class="warn">' + "".join(f"<li>{escape(w)}</li>" for w in warnings)
                     + "</ul>")
    parts += [table_html(t) for t in tables]
    if figures:
        parts.append("<h2>Figures</h2>")
    for fig in figures:
        parts.append(f'<figure><img src="{png_data_uri(fig.path)}" alt="{escape(fig.caption)}">'
                     f"<figcaption>{escape(fig.caption)}</figcaption></figure>")
    parts += [table_html(t) for t in appendix_tables]
    if latex is not None:
        parts.append("<h2>LaTeX table</h2>")
        parts.append("<details><summary>table.tex (click to show)</summary>"
                     f"<pre>{escape(latex)}</pre></details>")
    parts += ["</body>", "</html>"]
    return "\n".join(parts) + "\n"
