"""The self-contained HTML report of a run folder (``report.html``): the Markdown report's sections
rendered to HTML, plus a per-patient table, with every figure embedded as a data: URI.

It references nothing outside the file (no script, stylesheet, font or image URL), so it opens
offline and can be mailed or archived on its own. The Markdown it renders is the subset
:mod:`mtlbench.report.markdown` writes: headings, pipe tables, bullet lists, paragraphs, images,
``**bold**``, ``*italic*`` and ```code``.
"""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path
from typing import Any

from mtlbench.fsutil import write_text
from mtlbench.report.leaderboard import build_leaderboard, fmt_num, load_results
from mtlbench.report.markdown import report_parts

HTML_NAME = "report.html"

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem auto; max-width: 78rem;
       padding: 0 1rem; color: #1b1b1b; line-height: 1.45; }
h1 { border-bottom: 2px solid #ddd; padding-bottom: .3rem; }
h2 { margin-top: 2.2rem; border-bottom: 1px solid #eee; }
table { border-collapse: collapse; margin: .8rem 0; font-size: .88rem; font-variant-numeric: tabular-nums; }
th, td { border: 1px solid #d0d0d0; padding: .25rem .55rem; }
th { background: #f3f3f3; }
td.r, th.r { text-align: right; } td.c, th.c { text-align: center; }
tr:nth-child(even) td { background: #fafafa; }
.scroll { overflow-x: auto; }
img { max-width: 100%; height: auto; border: 1px solid #eee; margin: .4rem 0; }
code { background: #f3f3f3; padding: 0 .2rem; border-radius: 3px; }
"""

_IMAGE = re.compile(r"^!\[([^\]]*)\]\(([^)]+)\)$")
_ALIGN = {"--:": "r", ":-:": "c"}


def inline(text: str) -> str:
    """Escape ``text`` and render the inline Markdown the report uses (code, bold, italic)."""
    parts = re.split(r"(`[^`]*`)", text)
    out = []
    for part in parts:
        if part.startswith("`") and part.endswith("`") and len(part) >= 2:
            out.append(f"<code>{html.escape(part[1:-1].replace(chr(92) + '|', '|'))}</code>")
            continue
        part = html.escape(part.replace("\\|", "|"))
        part = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", part)
        part = re.sub(r"(?<![\w*])\*(?!\s)(.+?)(?<!\s)\*(?![\w*])", r"<em>\1</em>", part)
        out.append(part)
    return "".join(out)


def _cells(line: str) -> list[str]:
    cells = re.split(r"(?<!\\)\|", line.strip())
    return [c.strip() for c in cells[1:-1]]


def _table(lines: list[str]) -> str:
    header, align, rows = _cells(lines[0]), _cells(lines[1]), [_cells(l) for l in lines[2:]]
    cls = [_ALIGN.get(a.replace(" ", ""), "") for a in align]

    def row(cells: list[str], tag: str) -> str:
        return "<tr>" + "".join(
            f'<{tag}{f" class={chr(34)}{cls[i]}{chr(34)}" if i < len(cls) and cls[i] else ""}>{inline(c)}</{tag}>'
            for i, c in enumerate(cells)
        ) + "</tr>"

    head = "" if not any(header) else f"<thead>{row(header, 'th')}</thead>"
    return f'<div class="scroll"><table>{head}<tbody>{"".join(row(r, "td") for r in rows)}</tbody></table></div>'


def _image(alt: str, src: str, run_dir: Path) -> str:
    """An <img> whose source is the file's bytes as a data: URI (never a path or URL)."""
    path = (run_dir / src).resolve()
    try:
        data = base64.b64encode(path.read_bytes()).decode("ascii")
    except OSError:
        return f"<p><em>missing figure {html.escape(src)}</em></p>"
    return f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}"></figure>'


def markdown_to_html(text: str, run_dir: Path) -> str:
    """Render the report's Markdown subset; images are embedded from ``run_dir``."""
    out: list[str] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        stripped = line.strip()
        if not stripped:
            i += 1
        elif stripped.startswith("#"):
            level = len(stripped) - len(stripped.lstrip("#"))
            out.append(f"<h{level}>{inline(stripped[level:].strip())}</h{level}>")
            i += 1
        elif stripped.startswith("|"):
            block = []
            while i < len(lines) and lines[i].strip().startswith("|"):
                block.append(lines[i])
                i += 1
            out.append(_table(block))
        elif (m := _IMAGE.match(stripped)) is not None:
            out.append(_image(m.group(1), m.group(2), run_dir))
            i += 1
        elif stripped.startswith("- "):
            items: list[str] = []
            while i < len(lines) and lines[i].strip():
                if lines[i].strip().startswith("- "):
                    items.append(lines[i].strip()[2:])
                else:
                    items[-1] += " " + lines[i].strip()
                i += 1
            out.append("<ul>" + "".join(f"<li>{inline(it)}</li>" for it in items) + "</ul>")
        else:
            para = []
            while i < len(lines) and lines[i].strip() and not lines[i].strip().startswith(("|", "#", "- ", "![")):
                para.append(lines[i].strip())
                i += 1
            out.append(f"<p>{inline(' '.join(para))}</p>")
    return "\n".join(out)


def patients_markdown(results: dict[str, Any], board: dict[str, Any]) -> str:
    """Per test patient (rows) and leaderboard row (columns): the main metric, mean over seeds."""
    metric = board["metric"]
    labels = [r["label"] for r in board["rows"]]
    values: dict[str, dict[str, list[float]]] = {}
    fold_of: dict[str, Any] = {}
    for trial in results.get("trials") or []:
        if trial.get("status") != "completed" or trial.get("label") not in labels:
            continue
        for pp in trial.get("per_patient") or []:
            v = pp.get(metric)
            if isinstance(v, (int, float)):
                values.setdefault(str(pp.get("patient")), {}).setdefault(trial["label"], []).append(float(v))
                fold_of[str(pp.get("patient"))] = trial.get("fold")
    if not values:
        return ""
    header = "| patient | fold | " + " | ".join(l.replace("|", "\\|") for l in labels) + " |"
    lines = [header, "| :-- | --: | " + " | ".join("--:" for _ in labels) + " |"]
    for patient in sorted(values, key=lambda p: (str(fold_of[p]), p)):
        cells = [fmt_num(sum(v) / len(v)) if (v := values[patient].get(l)) else "—" for l in labels]
        lines.append(f"| {patient} | {fold_of[patient]} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_html_report(run_dir: str | Path, replot: bool = False) -> Path:
    """Write ``RUN_DIR/report.html`` (atomically) from the same sections as report.md, plus a per-patient
    table; figures are made first when ``RUN_DIR/plots`` has none."""
    run_dir = Path(run_dir)
    results = load_results(run_dir)
    board = build_leaderboard(results)
    parts, title = report_parts(run_dir, results, board, replot=replot)
    patients = patients_markdown(results, board)
    if patients:
        at = next((i for i, p in enumerate(parts) if p.startswith("## Statistics")), len(parts))
        parts[at:at] = [f"## Per-patient `{board['metric']}` (mean over seeds)\n", patients]
    body = markdown_to_html("\n".join(parts), run_dir)
    page = (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
        f"<title>{html.escape(title)}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n{body}\n</body>\n</html>\n"
    )
    path = run_dir / HTML_NAME
    write_text(path, page)
    return path
