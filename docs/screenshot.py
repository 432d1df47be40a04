"""Make docs/report.png: the report of the quickstart run, as headless Chromium shows it.

make quickstart && .venv/bin/pollinate report runs/quickstart
.venv/bin/python docs/screenshot.py runs/quickstart/report.html docs/report.png
"""

from __future__ import annotations

import sys
from pathlib import Path

from playwright.sync_api import sync_playwright

CHROMIUM = "/usr/bin/chromium"  # Debian's; Playwright downloads no browser here


def screenshot(report: Path, out: Path, height: int = 2300) -> None:
    """The top ``height`` pixels of the page at 1280 px wide: summary to per-user charts."""
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True)
        page = browser.new_page(viewport={"width": 1280, "height": height})
        page.goto(report.resolve().as_uri(), wait_until="load")
        page.wait_for_function(
            "[...document.querySelectorAll('.plotly-graph-div')].every("
            "d => d.querySelector('.main-svg'))"
        )
        page.screenshot(path=str(out))
        browser.close()


if __name__ == "__main__":
    screenshot(Path(sys.argv[1]), Path(sys.argv[2]))
