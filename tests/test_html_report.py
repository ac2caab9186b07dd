"""report.html: the report's sections and a per-patient table in one file that references nothing outside it."""

from __future__ import annotations

import base64
import json
from html.parser import HTMLParser

from typer.testing import CliRunner

from mtlbench.cli import app
from mtlbench.report.html import inline, markdown_to_html
from mtlbench.report.leaderboard import build_leaderboard

from test_plots import _fast_figures, make_run  # noqa: F401 (the autouse fixture applies here too)


class _Collect(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str]]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)


def test_html_report_is_self_contained(tmp_path):
    run = make_run(tmp_path)
    r = CliRunner().invoke(app, ["report", str(run), "--html"])
    assert r.exit_code == 0, r.output
    page = (run / "report.html").read_text(encoding="utf-8")
    parser = _Collect()
    parser.feed(page)
    tags = {t for t, _ in parser.tags}
    assert not tags & {"script", "link", "iframe", "object", "embed"}
    urls = [v for _, attrs in parser.tags for k, v in attrs.items() if k in ("src", "href", "srcset", "data")]
    assert urls and all(u.startswith("data:image/png;base64,") for u in urls)
    assert "url(" not in page and "@import" not in page  # no stylesheet fetches either
    images = [a["src"] for t, a in parser.tags if t == "img"]
    assert len(images) == len(list((run / "plots").glob("*.png")))
    assert all(base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n" for src in images)
    text = " ".join(parser.text)
    results = json.loads((run / "results.json").read_text())
    board = build_leaderboard(results)
    for row in board["rows"]:
        assert row["label"] in text
    assert "Per-patient" in text and "Per-fold values" in text
    for patient in ("a", "b", "c", "d"):
        assert f"<td>{patient}</td>" in page


def test_markdown_subset_renders():
    out = markdown_to_html("# T\n\n| a | b |\n| :-- | --: |\n| `x\\|y` | **2** |\n\n- one\n  more\n- two\n\ntext *it*\n",
                           run_dir=None)  # no images: no files read
    assert "<h1>T</h1>" in out and '<td class="r"><strong>2</strong></td>' in out
    assert "<code>x|y</code>" in out and "<li>one more</li>" in out and "<em>it</em>" in out
    assert inline("<b>") == "&lt;b&gt;"
