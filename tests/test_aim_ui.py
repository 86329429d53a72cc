"""aim in a real browser: ``aim up`` on a finished run, its page opened in headless Chromium (Debian's, driven by
Playwright), the run's name and hash shown and its loss curve drawn from the logged values."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sslcore.testing import run_example_briefly

QUICKSTART = Path(__file__).resolve().parents[1] / "examples" / "quickstart.yaml"
CHROMIUM = Path("/usr/bin/chromium")
#: what this machine needs: no sandbox (root in a container), no GPU, nothing fetched in the background
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
UI_TIMEOUT_MS = 60_000  # aim's UI is a React app: generous on a loaded machine, yet a hard limit
# aim 3.29's run page: the title bar ("experiment / run name") and, on the Metrics tab, a chart per metric
# and context with an SVG path per line
TITLE = ".RunDetail__runDetailContainer__appBarContainer__appBarTitleBox"
LOSS_CHART = '.RunDetailMetricsTab__container__chartContainer[data-name="loss"][data-context=\'subset="train"\']'


def _browser_or_fail() -> object:
    """Playwright's sync API, or a one-line failure naming the fix: this test never passes without a browser."""
    if not CHROMIUM.is_file():
        pytest.fail(f"{CHROMIUM} is missing: run scripts/setup.sh (it installs Debian's chromium)", pytrace=False)
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("playwright is not installed in this environment: run scripts/setup.sh", pytrace=False)
    return sync_playwright


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_for_port(port: int, server: subprocess.Popen, log: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"aim up exited with {server.returncode}: {log.read_text()[-2000:]}")
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    pytest.fail(f"aim up did not listen on port {port} within {timeout:.0f} s: {log.read_text()[-2000:]}")


def _line_points(d: str) -> np.ndarray:
    """The vertices of an SVG path of straight segments, ``M x,y L x,y ...``, as K x 2."""
    return np.array([[float(v) for v in point.split(",")] for point in d.lstrip("M").split("L")])


def test_aim_ui_shows_the_run_and_its_loss_curve(cifar10_dir: Path, tmp_path: Path) -> None:
    sync_playwright = _browser_or_fail()
    import aim

    repo = tmp_path / "aim"
    run_dir = run_example_briefly(QUICKSTART, cifar10_dir, tmp_path, "train.max_steps_per_epoch=3",
                                  "train.log_every_steps=1",
                                  f"tracking.aim.repo={repo}", "tracking.aim.experiment=aim_ui_test")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r["subset"] == "train"]
    assert len(losses) >= 3, records
    # the run's folder in the repository: aim's index (iter_runs, get_run) learns of it when `aim up` starts
    (run_hash,) = aim.Repo.from_path(str(repo)).list_all_runs()

    port, log = _free_port(), tmp_path / "aim_up.log"
    with open(log, "w") as out:
        server = subprocess.Popen([str(Path(sys.executable).parent / "aim"), "up", "--repo", str(repo),
                                   "--port", str(port), "--host", "127.0.0.1"], stdout=out, stderr=subprocess.STDOUT,
                                  start_new_session=True, env={**os.environ, "AIM_UI_TELEMETRY_ENABLED": "0"})
    try:
        _wait_for_port(port, server, log)
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch_persistent_context(
                str(tmp_path / "chromium-profile"), executable_path=str(CHROMIUM), args=CHROMIUM_ARGS,
                headless=True, viewport={"width": 1400, "height": 1500})
            browser.set_default_timeout(UI_TIMEOUT_MS)
            page = browser.new_page()
            # offline: the page's CDN script and web font would only wait for a network that is not there
            page.route("**/*", lambda route: route.continue_() if route.request.url.startswith(
                f"http://127.0.0.1:{port}/") else route.abort())

            page.goto(f"http://127.0.0.1:{port}/runs/{run_hash}")
            page.get_by_text(run_hash, exact=True).wait_for()  # the Overview's Information panel
            assert page.locator(f"{TITLE}__experimentName").inner_text() == "aim_ui_test"
            assert page.locator(f"{TITLE}__runName").inner_text().strip() == "/ quickstart"

            page.goto(f"http://127.0.0.1:{port}/runs/{run_hash}/metrics")
            chart = page.locator(LOSS_CHART)
            line = chart.locator("svg path.Line")
            line.wait_for()
            assert chart.locator("h4").inner_text() == "loss"
            points = _line_points(line.get_attribute("d"))
            page.add_style_tag(content=".CommunityPopup { display: none !important; }")  # a pop-up over the charts
            chart.scroll_into_view_if_needed()
            page.screenshot(path=str(tmp_path / "aim_ui.png"))
            browser.close()
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()

    # one vertex per logged step, evenly spaced, and the height an affine map of the loss (SVG's y grows down)
    assert len(points) == len(losses), (points, losses)
    np.testing.assert_allclose(np.diff(points[:, 0]), np.diff(points[:, 0]).mean(), atol=0.5)
    slope, offset = np.polyfit(losses, points[:, 1], 1)
    assert slope < 0 and np.ptp(points[:, 1]) > 50, (points, losses)
    np.testing.assert_allclose(points[:, 1], slope * np.asarray(losses) + offset, atol=0.5)
    with Image.open(tmp_path / "aim_ui.png") as screenshot:
        assert screenshot.size == (1400, 1500)
        assert np.asarray(screenshot.convert("L")).std() > 10  # charts and text, not a blank page
