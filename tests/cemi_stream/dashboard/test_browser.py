"""The dashboard in a real headless browser (Debian's chromium through chromium-driver).

A real daemon (``run_daemon.py serve``) runs a simulated traversal delivered as an
image folder at 2 frames/s, with one frame replaced by a view of another place of
the specimen (so it cannot be registered and is *predicted*).  The browser logs
in with the token, finds the run in the list, opens its page and checks from the
page itself: counts grow, mosaic tiles load and the mosaic visibly grows
(screenshots, pixel counts), the predicted frame raises an alert, and stop works.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cemi_stream.daemon.client import wait_until_serving

REPO = Path(__file__).resolve().parents[3]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        CHROMIUM is None or DRIVER is None,
        reason="no chromium/chromedriver found (apt-get install chromium chromium-driver; "
        ".ci/run installs them)",
    ),
]
selenium = pytest.importorskip("selenium", reason="selenium not installed (pip install -e .[dev])")

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402


def make_frames(folder: Path) -> int:
    """An image-folder traversal (3 rows x 10) with frame 13 from another place."""
    import cv2

    from drivers.sim import SimConfig, write_simulation

    config = SimConfig(rows=3, frames_per_row=10, frame_width=384, frame_height=288, seed=11)
    info = write_simulation(config, folder / "sim")
    frames = sorted(p for p in Path(str(info["path"])).iterdir() if p.suffix == ".png")
    alien = write_simulation(
        SimConfig(rows=1, frames_per_row=1, frame_width=384, frame_height=288, seed=99),
        folder / "alien",
    )
    alien_png = next(p for p in Path(str(alien["path"])).iterdir() if p.suffix == ".png")
    out = folder / "frames"
    out.mkdir()
    for k, src in enumerate(frames):
        image = cv2.imread(str(alien_png if k == 13 else src), cv2.IMREAD_UNCHANGED)
        cv2.imwrite(str(out / f"frame_{k:03d}.png"), image)
    return len(frames)


class Serve:
    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.log = open(data_dir.parent / "serve.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "run_daemon.py", "serve", "--port", "0", "--data-dir", str(data_dir)],
            cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        self.client = wait_until_serving(data_dir, timeout_s=60, pid=self.proc.pid)
        self.url = json.loads((data_dir / "daemon.json").read_text())["url"]
        self.token = (data_dir / "token").read_text().strip()

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Serve, int]]:
    root = tmp_path_factory.mktemp("dash")
    data = root / "data"
    data.mkdir()
    n = make_frames(data)
    serve = Serve(data)
    try:
        yield serve, n
    finally:
        serve.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                "--window-size=1400,900", "--disable-gpu", "--hide-scrollbars"):  # fmt: skip
        options.add_argument(arg)
    os.environ.setdefault("SE_OFFLINE", "true")  # never let selenium fetch a browser
    driver = webdriver.Chrome(options=options, service=Service(executable_path=str(DRIVER)))
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def wait(predicate: Any, timeout_s: float, what: str, poll_s: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll_s)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def viewer_pixels(driver: Any, path: Path) -> np.ndarray:
    """Screenshot of the mosaic viewer as a grey array (saved to ``path``)."""
    import cv2

    element = driver.find_element(By.ID, "viewer")
    element.screenshot(str(path))
    return cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)


def lit_fraction(image: np.ndarray) -> float:
    """Fraction of the viewer showing mosaic (not the black background)."""
    return float(np.mean(image > 12))


def test_the_run_page_follows_a_run_live(served: tuple[Serve, int], browser: Any,
                                          tmp_path: Path) -> None:  # fmt: skip
    serve, n_frames = served
    run = serve.client.start({"source": "frames", "pace": "2", "name": "browser run",
                              "analyze": True})  # fmt: skip
    run_id = run["id"]
    browser.get(f"{serve.url}/login?token={serve.token}&next=/")
    row = wait(lambda: browser.find_elements(By.CSS_SELECTOR, f'tr[data-run="{run_id}"]'),
               20, "the run in the list")  # fmt: skip
    assert "browser run" in row[0].text
    browser.get(f"{serve.url}/runs/{run_id}")

    def placed() -> int:
        value = browser.execute_script(
            "const r = window.cemiRun && window.cemiRun.run; return r ? r.counts.placed : -1;"
        )
        return int(value)

    wait(lambda: placed() >= 3, 60, "3 placed frames on the page")
    wait(lambda: browser.execute_script(
        "return performance.getEntriesByType('resource')"
        ".filter(e => e.name.includes('/tiles/')).length") > 0, 30, "tile requests")  # fmt: skip
    time.sleep(1.5)  # the viewer draws what it has fetched
    early_count = placed()
    early = lit_fraction(viewer_pixels(browser, tmp_path / "early.png"))
    wait(lambda: placed() >= min(early_count + 6, n_frames - 2), 60, "more placed frames")
    time.sleep(2.0)
    later = lit_fraction(viewer_pixels(browser, tmp_path / "later.png"))
    # The viewer keeps the view fitted to the mosaic: a longer mosaic is redrawn
    # smaller, so what grows is the part of the first row filled with tiles.
    assert later != pytest.approx(early, abs=0.005), (early, later)
    tiles = browser.execute_script(
        "return performance.getEntriesByType('resource').filter(e => e.name.includes('/tiles/'))"
        ".map(e => e.name)"
    )
    versions = {t.split("?v=")[-1] for t in tiles}
    assert len(versions) > 1, "tiles were never fetched again after a change"
    # The predicted frame (13: another place of the specimen) raises an alert.
    predicted = '#alerts li[data-kind="predicted"]'
    alert = wait(lambda: browser.find_elements(By.CSS_SELECTOR, predicted), 90, "the alert")
    assert "predicted" in alert[0].text
    # The run finishes; the page shows it, with every frame accounted for.
    wait(lambda: browser.execute_script("return window.cemiRun.run.state") == "finished",
         120, "the run to finish")  # fmt: skip
    counts = browser.execute_script("return window.cemiRun.run.counts")
    assert counts["placed"] + counts["predicted"] == n_frames and counts["predicted"] >= 1
    final = viewer_pixels(browser, tmp_path / "final.png")
    assert lit_fraction(final) > 0.1
    # The analysis stage's maps appear beside the mosaic, marked final.
    wait(lambda: browser.execute_script(
        "const i = document.querySelector('#analysis-images img');"
        "return i && i.complete && i.naturalWidth > 100"), 60, "an analysis map")  # fmt: skip
    assert browser.find_element(By.ID, "analysis").is_displayed()
    wait(lambda: browser.execute_script(  # (.text is the rendered, upper-case heading)
        "return document.getElementById('analysis-state').textContent") == "(final)", 30,
        "the final analysis")  # fmt: skip
    assert "tiles" in browser.find_element(By.ID, "analysis-summary").text
    # A click on a frame shows it (raw) with its status and registration score.
    cx, cy = browser.execute_script("return window.cemiFramePoint(5)")
    from selenium.webdriver.common.action_chains import ActionChains

    viewer = browser.find_element(By.ID, "viewer")
    size = viewer.size
    ActionChains(browser).move_to_element_with_offset(
        viewer, int(cx - size["width"] / 2), int(cy - size["height"] / 2)
    ).click().perform()
    panel = wait(lambda: browser.find_element(By.ID, "frame-panel").is_displayed(), 10, "panel")
    assert panel
    assert browser.find_element(By.ID, "frame-seq").text == "5"
    assert "registration score" in browser.find_element(By.ID, "frame-info").text
    wait(lambda: browser.execute_script(
        "const i = document.querySelector('#frame-images img');"
        "return i && i.complete && i.naturalWidth === 384"), 10, "the raw frame image")  # fmt: skip
    shutil.copy(tmp_path / "final.png", tmp_path / "dashboard.png")
    if os.environ.get("CEMI_KEEP_SCREENSHOT"):
        browser.save_screenshot(os.environ["CEMI_KEEP_SCREENSHOT"])


def test_start_and_stop_from_the_pages(served: tuple[Serve, int], browser: Any) -> None:
    serve, _ = served
    browser.get(f"{serve.url}/login?token={serve.token}&next=/")
    form = wait(lambda: browser.find_elements(By.ID, "start"), 20, "the start form")[0]
    form.find_element(By.NAME, "source").send_keys("frames")
    pace = form.find_element(By.NAME, "pace")
    pace.clear()
    pace.send_keys("1")
    form.find_element(By.NAME, "name").send_keys("stopped run")
    form.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    # The page goes to the new run's page.
    wait(lambda: "/runs/" in browser.current_url, 20, "the run page after start")
    run_id = browser.current_url.rstrip("/").split("/runs/")[1]
    assert serve.client.run(run_id)["name"] == "stopped run"
    button = wait(lambda: [b for b in browser.find_elements(By.ID, "stop") if b.is_enabled()],
                  60, "an enabled stop button")  # fmt: skip
    wait(lambda: browser.execute_script("return window.cemiRun.run.state") == "running",
         60, "the run to be running")  # fmt: skip
    button[0].click()
    state = wait(
        lambda: (s := browser.execute_script("return window.cemiRun.run.state"))
        in ("finished", "interrupted") and s,
        90, "the run to end after stop",
    )  # fmt: skip
    assert state == "finished"
    info = serve.client.run(run_id)
    assert info["state"] == "finished" and info["counts"]["placed"] < 30
