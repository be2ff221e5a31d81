"""The committed report read as its users read it: rendered by a headless Chromium in a 900 px wide window, the
summary and every verdict / outcome column must lie inside the viewport (no sideways scroll to find them).

A small script added to a copy of the page writes the bounding boxes into the DOM; `chromium --dump-dom` prints the
DOM after the script ran. Skipped only when no Chromium binary exists (scripts/install.sh installs one as root).
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPORT = Path(__file__).resolve().parents[1] / "reports" / "report.html"
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
WIDTH = 900

# every element the reader needs without scrolling sideways: the summary section and its tables, and each cell of a
# verdict / outcome column anywhere on the page; a closed <details> has no layout and is not measured
MEASURE = """
<script>
addEventListener('load', () => {
  const view = document.documentElement.clientWidth;
  const box = (el, what) => { const r = el.getBoundingClientRect();
    return {what, text: el.textContent.trim().slice(0, 60), left: r.left, right: r.right, width: r.width}; };
  const out = {view, items: []};
  const summary = document.getElementById('summary');
  if (summary) { out.items.push(box(summary, 'summary'));
    summary.querySelectorAll('table, h2, h3, p').forEach(el => out.items.push(box(el, 'summary ' + el.tagName))); }
  document.querySelectorAll('.verdict').forEach(el => out.items.push(box(el, 'verdict')));
  const pre = document.createElement('pre'); pre.id = 'layout-check'; pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});
</script>
"""


def _browser() -> str | None:
    return next((b for b in map(shutil.which, BROWSERS) if b), None)


def layout(page: Path, tmp: Path, width: int = WIDTH) -> dict:
    """{view: viewport width, items: [{what, text, left, right, width}]} of `page` rendered `width` px wide."""
    probe = tmp / "page.html"
    probe.write_text(page.read_text().replace("</body>", MEASURE + "</body>"))
    cmd = [_browser(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--window-size={width},3000",
           "--virtual-time-budget=10000", f"--user-data-dir={tmp / 'profile'}", "--dump-dom", probe.as_uri()]
    dom = subprocess.run(cmd, capture_output=True, text=True, timeout=120).stdout
    found = re.search(r'<pre id="layout-check">(.*?)</pre>', dom, re.S)
    assert found, f"the page's layout script did not run (chromium printed {len(dom)} characters)"
    return json.loads(found.group(1).replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">").replace("&quot;", '"'))


@pytest.mark.skipif(_browser() is None, reason="no Chromium binary (chromium, chromium-browser or google-chrome) on PATH; "
                                               "scripts/install.sh installs one when run as root with apt")
def test_summary_and_verdicts_fit_a_900px_window(tmp_path):
    got = layout(REPORT, tmp_path)
    view, items = got["view"], got["items"]
    assert 800 <= view <= WIDTH, view        # the window really was 900 px wide
    assert any(i["what"] == "summary" for i in items), "the report has no summary section"
    assert sum(i["what"] == "verdict" for i in items) >= 10
    outside = [i for i in items if i["width"] > 0 and (i["right"] > view + 0.5 or i["left"] < -0.5)]
    assert not outside, [(i["what"], i["text"], round(i["right"])) for i in outside]
