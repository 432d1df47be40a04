"""Fixtures for every test folder."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from pollinate.flower_compat.identity import task_identity as flower_task_identity


@pytest.fixture(autouse=True)
def task_identity() -> Iterator[None]:
    """Flower stamps new Messages with the running task's identity; give tests one."""
    with flower_task_identity(run_id=1, task_id=1, node_id=1):
        yield


@pytest.fixture
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real redis-server on a free loopback port with its own folder; stopped afterwards.

    Yields its URL (``redis://127.0.0.1:PORT/0``). No persistence: each test gets an empty
    broker. ``.ci/run`` installs redis-server (Debian's package) where it is missing.
    """
    from redisserver import RedisServer

    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server.url


CHROMIUM = "/usr/bin/chromium"  # Debian's (.ci/run installs it); Playwright downloads none


# Module scope, not session: Playwright's sync API keeps its asyncio loop running in this
# thread while it is open, and a later test's asyncio.run() would then fail.
@pytest.fixture(scope="module")
def open_report() -> Iterator[Callable[[Path], dict[str, Any]]]:
    """Open an HTML report in headless Chromium; what rendered and what went wrong.

    Returns a function ``path -> {"charts", "rendered", "errors", "requests", "sections"}``:
    the Plotly divs, those with drawn SVG/canvas content, console errors and page errors,
    every URL the page asked for (a self-contained file asks for none but itself).
    """
    if not os.path.exists(CHROMIUM):
        if os.environ.get("CI"):
            pytest.fail(f"{CHROMIUM} is missing: .ci/run installs Debian's chromium")
        pytest.skip(f"no {CHROMIUM} (apt-get install chromium)")
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True)

        def load(path: Path) -> dict[str, Any]:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            errors: list[str] = []
            requests: list[str] = []
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(f"page error: {e}"))
            page.on("request", lambda r: requests.append(r.url))
            page.goto(path.resolve().as_uri(), wait_until="load")
            # A chart is drawn when Plotly made its SVG and one layer per trace (heatmaps
            # are a `g.hm` image, the others `g.trace`).
            drawn = """() => [...document.querySelectorAll('.plotly-graph-div')].filter(d =>
                d.querySelector('.main-svg') && d.data && d.data.length > 0 &&
                d.querySelectorAll('.main-svg g.trace, .main-svg g.hm').length >= d.data.length
            ).length"""
            charts = page.locator(".plotly-graph-div").count()
            with contextlib.suppress(PlaywrightTimeout):  # counted below, not waited for ever
                page.wait_for_function(f"({drawn})() >= {charts}", timeout=15_000)
            result = {
                "charts": charts,
                "rendered": page.evaluate(drawn),
                "errors": errors,
                "requests": requests,
                "sections": page.eval_on_selector_all("section", "els => els.map(e => e.id)"),
            }
            page.close()
            return result

        yield load
        browser.close()


@pytest.fixture(scope="session")
def report_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two real digits runs, FedAvg and FedProx (seconds), shared by the report tests."""
    from runhelp import digits_config

    from pollinate.simulation.inprocess import run_in_process

    root = tmp_path_factory.mktemp("report")
    fedavg = run_in_process(digits_config(root / "fedavg"), 2)
    fedprox = digits_config(
        root / "fedprox", **{"strategy.name": "fedprox", "strategy.proximal-mu": 0.1}
    )
    return {"fedavg": fedavg, "fedprox": run_in_process(fedprox, 2)}
