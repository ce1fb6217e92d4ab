"""End to end: the demo app on a free localhost port, driven in headless Chromium. Generate on the
Video tab must show both videos and the timing text; a bad frame count must show a message. A
screenshot goes to ``artifacts/demo_video.png``.

Needs Debian's chromium and Playwright for Python: ``bash tests/e2e/setup_browser.sh``.
"""

import os
import re
import shutil
import socket
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts"

if not (os.path.exists(CHROMIUM) or shutil.which("chromium")):
    pytest.skip(f"{CHROMIUM} is missing: run tests/e2e/setup_browser.sh", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright for Python is missing: run "
                               "tests/e2e/setup_browser.sh")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    from sparsediff.commands.demo import load_app

    os.environ["SPARSEDIFF_DEMO_DIR"] = str(tmp_path_factory.mktemp("demo_out"))
    app = load_app()
    port = free_port()
    demo = app.build_demo()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
                allowed_paths=[os.environ["SPARSEDIFF_DEMO_DIR"]])
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        demo.close()
        os.environ.pop("SPARSEDIFF_DEMO_DIR", None)


@pytest.fixture(scope="module")
def page(app_url):
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        page = browser.new_page(viewport={"width": 1400, "height": 1300})
        page.set_default_timeout(90_000)
        # Only localhost: anything else the page asks for (fonts, analytics) is refused.
        page.route(re.compile(r"^https?://(?!127\.0\.0\.1|localhost)"), lambda route: route.abort())
        page.goto(app_url)
        page.wait_for_selector("#video-generate")
        yield page
        browser.close()


def test_video_tab_generates_dense_and_sparse(page):
    page.click("#video-generate")
    dense = page.wait_for_selector("#dense-video video[src]")
    sparse = page.wait_for_selector("#sparse-video video[src]")
    assert dense.get_attribute("src") != sparse.get_attribute("src")
    timing = page.locator("#video-timing")
    timing.get_by_text("Speed-up").wait_for()
    text = timing.inner_text()
    assert re.search(r"Dense.*\d+(\.\d+)? m?s denoising", text), text
    assert re.search(r"Speed-up per step \(median\): \d+\.\d+x", text), text
    assert re.search(r"\d+ of \d+ routed attention calls ran ba_att", text), text  # what ran is said
    assert "PSNR" in page.locator("#video-quality").inner_text()
    page.wait_for_selector("#mask-heatmap img[src]")
    assert "Done" in page.locator("#video-status").inner_text()
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "demo_video.png"), full_page=True)
    assert (ARTIFACTS / "demo_video.png").stat().st_size > 10_000


def test_bad_frame_count_shows_a_message(page):
    frames = page.get_by_label("Frames")
    frames.fill("16")
    frames.press("Tab")
    page.click("#video-generate")
    page.locator("#video-status").get_by_text("4k+1").wait_for()
    assert "Invalid input" in page.locator("#video-status").inner_text()
