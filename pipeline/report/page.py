"""The report page: sections of tables, figures and text rendered to markdown and to one standalone HTML file
(figures embedded as base64) from the template templates/report.html.

    md, html = render(title, sections)
"""
from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field
from pathlib import Path
from string import Template

from pipeline.report.tables import Table

TEMPLATE = Path(__file__).with_name("templates") / "report.html"
WRAP_AT = 30   # a cell longer than this wraps; short cells (numbers with their interval) stay on one line


@dataclass
class FigureRef:
    name: str      # file name under figures/
    caption: str


@dataclass
class Text:
    text: str      # plain text (escaped when rendered)


@dataclass
class Facts:
    """The setup box: (label, text) pairs."""
    items: list[tuple[str, str]]


@dataclass
class Folded:
    """A <details> block: a summary line and (term, text) entries (quotes, the glossary)."""
    summary: str
    items: list[tuple[str, str]]


@dataclass
class Section:
    title: str
    items: list = field(default_factory=list)
    anchor: str = ""
    appendix: bool = False


# --- markdown --------------------------------------------------------------------------------------

def _md_cell(s: str) -> str:
    return str(s).replace("|", "\\|").replace("\n", " ")


def table_markdown(t: Table, prefix: str = "") -> str:
    lines = [f"## {prefix}{t.title}", ""]
    if t.caption:
        lines += [t.caption, ""]
    if not t.rows:
        return "\n".join(lines + ["_(none)_", ""])
    lines.append("| " + " | ".join(_md_cell(c) for c in t.columns) + " |")
    lines.append("|" + "|".join("---" for _ in t.columns) + "|")
    lines += ["| " + " | ".join(_md_cell(c) for c in r) + " |" for r in t.rows]
    for summary, text in t.notes:
        lines += ["", f"> **{summary}.** {text}"]
    return "\n".join(lines + [""])


def _item_markdown(item, prefix: str, figures: dict[str, bytes]) -> str:
    if isinstance(item, Table):
        return table_markdown(item, prefix)
    if isinstance(item, FigureRef):
        return f"![{item.caption}](figures/{item.name})\n" if item.name in figures else ""
    if isinstance(item, Text):
        return item.text + "\n"
    if isinstance(item, Facts):
        return "\n".join(f"- **{k}**: {v}" for k, v in item.items) + "\n"
    if isinstance(item, Folded):
        return f"**{item.summary}**\n\n" + "\n".join(f"- **{k}**: {v}" for k, v in item.items) + "\n"
    raise TypeError(f"unknown page item {type(item).__name__}")


def markdown(title: str, sections: list[Section], figures: dict[str, bytes], lead: str = "") -> str:
    # sections are level-1 headings so that each table's level-2 heading delimits exactly its own rows
    out = [f"# {title}", ""] + ([lead, ""] if lead else [])
    for s in sections:
        prefix = "Appendix: " if s.appendix else ""
        out += [f"# {prefix}{s.title}", ""]
        out += [_item_markdown(i, prefix, figures) for i in s.items]
    return "\n".join(x for x in out if x is not None)


# --- HTML ------------------------------------------------------------------------------------------

VERDICT_CLASSES = (("contradicted", "worse"), ("reproduced", "better"), ("inconclusive", "same"), ("worse", "worse"),
                   ("better", "better"), ("≈", "same"))


def _verdict_class(cell: str) -> str:
    for word, cls in VERDICT_CLASSES:
        if word in cell:
            return cls
    return ""


def _td(cell: str, key: bool) -> str:
    cell = str(cell)
    classes = []
    if len(cell) > WRAP_AT or "no per-image" in cell:
        classes.append("wrap")
    if key:
        classes.append("verdict")
        if cls := _verdict_class(cell):
            classes.append(cls)
    if cell.endswith("*"):
        classes.append("primary")
    attr = f" class=\"{' '.join(classes)}\"" if classes else ""
    return f"<td{attr}>{html.escape(cell)}</td>"


def table_html(t: Table, prefix: str = "") -> str:
    anchor = f" id=\"{t.anchor}\"" if t.anchor else ""
    out = [f"<h3{anchor}>{html.escape(prefix + t.title)}</h3>"]
    if t.caption:
        out.append(f"<p class=\"caption\">{html.escape(t.caption)}</p>")
    if not t.rows:
        return "\n".join(out + ["<p><em>(none)</em></p>"])
    key = [c in t.key_columns for c in t.columns]
    verdict_th = ' class="verdict"'
    head = "".join(f"<th{verdict_th if k else ''}>{html.escape(c)}</th>" for c, k in zip(t.columns, key))
    out.append(f"<div class=\"scroll\"><table>\n<thead><tr>{head}</tr></thead>\n<tbody>")
    out += ["<tr>" + "".join(_td(c, k) for c, k in zip(r, key)) + "</tr>" for r in t.rows]
    out.append("</tbody>\n</table></div>")   # a wide table scrolls instead of running off the page
    if t.notes:
        out.append(_folded_html(Folded("Quotes and settings", t.notes), quote=True))
    return "\n".join(out)


def _folded_html(f: Folded, quote: bool = False) -> str:
    if quote:
        body = "".join(f"<p><strong>{html.escape(k)}</strong></p><blockquote>{html.escape(v)}</blockquote>" for k, v in f.items)
    else:
        body = "<dl>" + "".join(f"<dt><strong>{html.escape(k)}</strong></dt><dd>{html.escape(v)}</dd>" for k, v in f.items) + "</dl>"
    return f"<details><summary>{html.escape(f.summary)}</summary>{body}</details>"


def _item_html(item, prefix: str, figures: dict[str, bytes]) -> str:
    if isinstance(item, Table):
        return table_html(item, prefix)
    if isinstance(item, FigureRef):
        png = figures.get(item.name)
        if png is None:
            return ""
        alt = html.escape(item.caption)
        return (f"<figure><img alt=\"{alt}\" src=\"data:image/png;base64,{base64.b64encode(png).decode()}\">"
                f"<figcaption>{alt}</figcaption></figure>")
    if isinstance(item, Text):
        return f"<p class=\"note\">{html.escape(item.text)}</p>"
    if isinstance(item, Facts):
        return "<dl class=\"setup\">" + "".join(f"<dt>{html.escape(k)}</dt><dd>{html.escape(v)}</dd>"
                                                for k, v in item.items) + "</dl>"
    if isinstance(item, Folded):
        return _folded_html(item)
    raise TypeError(f"unknown page item {type(item).__name__}")


def page_html(title: str, sections: list[Section], figures: dict[str, bytes], lead: str = "") -> str:
    body = [f"<h1>{html.escape(title)}</h1>"] + ([f"<p>{html.escape(lead)}</p>"] if lead else [])
    for s in sections:
        prefix = "Appendix: " if s.appendix else ""
        anchor = f" id=\"{s.anchor}\"" if s.anchor else ""
        body.append(f"<section{anchor}>\n<h2>{html.escape(prefix + s.title)}</h2>")
        body += [x for x in (_item_html(i, prefix, figures) for i in s.items) if x]
        body.append("</section>")
    return Template(TEMPLATE.read_text()).substitute(title=html.escape(title), body="\n".join(body))


def render(title: str, sections: list[Section], figures: dict[str, bytes], lead: str = "") -> tuple[str, str]:
    """(markdown, html) of the page, `lead` a sentence under the title. Markdown links the PNGs under figures/; the
    HTML embeds them."""
    return markdown(title, sections, figures, lead), page_html(title, sections, figures, lead)
