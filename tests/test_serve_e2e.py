"""End-to-end test of `hwsi serve` in headless Chromium (Playwright's Python package driving /usr/bin/chromium).

Opens the page, zooms, toggles overlays, asks a question, sees the answer stream in and its evidence overlay,
clicks an evidence item (the viewer pans there), and saves a screenshot to test-artifacts/serve-e2e.png.
Skips, with the reason, only where Chromium or Playwright is absent.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from hwsi.serve.app import create_app
from hwsi.serve.server import BackgroundServer
from synthetic_store import make_synthetic_job

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "test-artifacts"
CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
FLAGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    if CHROMIUM is None:
        pytest.skip("Chromium is not installed (apt-get install chromium chromium-driver; .ci/run does it)")
    pytest.importorskip("playwright.sync_api", reason="the playwright Python package is not installed")
    job = tmp_path_factory.mktemp("e2ejob")
    make_synthetic_job(job, "synth-a")
    assistant, kind = build_assistant(job, tmp_path_factory)
    with BackgroundServer(create_app(job, assistant)) as srv:
        yield srv.url, kind


def build_assistant(job: Path, tmp_path_factory: pytest.TempPathFactory):  # -> (Assistant, str)
    """The real adapter (ModelAssistant over hwsi.model's ChatSession) with a tiny MLLM-HWSI trained for a few steps
    on two QA pairs about this slide by the fixture (~15 s on an idle 2-core CPU)."""
    from test_serve_model import tiny_assistant

    return tiny_assistant(job, tmp_path_factory.mktemp("llm"), train_steps=40), "model"


def test_viewer_zoom_overlays_chat_evidence(served: tuple[str, str], tmp_path: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    url, kind = served
    ARTIFACTS.mkdir(exist_ok=True)
    tile_levels: list[int] = []
    nuclei_requests: list[str] = []
    errors: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=FLAGS  # Playwright gives it a fresh profile dir
        )
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 860})
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)

            def on_request(req) -> None:  # type: ignore[no-untyped-def]
                if "/image_files/" in req.url:
                    tile_levels.append(int(req.url.split("/image_files/")[1].split("/")[0]))
                if "/overlays/nuclei" in req.url:
                    nuclei_requests.append(req.url)

            page.on("request", on_request)
            page.goto(url + "/")
            # slide list with a loaded thumbnail, the slide opened, tiles drawn
            thumb = page.locator("#slide-list li img").first
            expect(thumb).to_be_visible()
            page.wait_for_function("() => { const i = document.querySelector('#slide-list img'); return i && i.complete && i.naturalWidth > 0 }")
            page.wait_for_function("() => document.body.dataset.level !== undefined")
            page.wait_for_function("() => window.hwsi.viewer.tilesLoaded > 0")
            start_level = int(page.evaluate("document.body.dataset.level"))
            expect(page.locator("#scalebar-label")).to_contain_text("µm")
            scale_before = page.locator("#scalebar-label").inner_text()

            # overlays: tissue, grid, SPF
            for box in ("#ov-tissue", "#ov-grid", "#ov-spf"):
                page.check(box)
            page.wait_for_timeout(200)

            # ask a question: the answer streams in (several token events) and evidence appears
            assert "tiny-mllm" in page.locator("#model-name").inner_text()
            page.fill("#question", "Where is the tumour and what grade is it?")
            page.click("#ask")
            page.wait_for_function("() => document.body.dataset.evidence !== undefined", timeout=60000)
            page.wait_for_function("() => document.body.dataset.chat === 'idle'")
            answer = page.locator(".msg.assistant .answer-text").last.text_content() or ""
            assert re.search("[A-Za-z]{3}", answer) and "[error]" not in answer, answer
            shown = page.evaluate("window.hwsi.state.shown")  # displayed length after each streamed token
            assert len(shown) >= 2 and shown == sorted(shown) and shown[0] < shown[-1] == len(answer), shown
            items = page.locator(".evidence-item")
            assert items.count() >= 3
            assert page.evaluate("window.hwsi.state.heatmap !== null && window.hwsi.state.heatmap.length > 0")

            # click a patch evidence item: the viewer pans and zooms onto it
            before = page.evaluate("[window.hwsi.viewer.cx, window.hwsi.viewer.cy, window.hwsi.viewer.scale]")
            patch = page.locator(".evidence-item", has_text="patch").first
            patch.click()
            target = page.evaluate("(() => { const e = window.hwsi.state.highlight; return [e.x + e.w / 2, e.y + e.h / 2]; })()")
            after = page.evaluate("[window.hwsi.viewer.cx, window.hwsi.viewer.cy, window.hwsi.viewer.scale]")
            assert after[:2] == pytest.approx(target) and after[2] > before[2]

            # zoom in with the button until nuclei are fetched for the view (high zoom only)
            for _ in range(3):
                page.click("#zoom-in")
                page.wait_for_timeout(150)
            page.wait_for_function("() => Number(document.body.dataset.nuclei || 0) > 0", timeout=10000)
            assert nuclei_requests, "nuclei must be fetched at high zoom"
            assert "x0=" in nuclei_requests[-1]
            end_level = int(page.evaluate("document.body.dataset.level"))
            assert end_level > start_level and max(tile_levels) == end_level
            assert page.locator("#scalebar-label").inner_text() != scale_before
            page.wait_for_function("() => window.hwsi.viewer.complete === true", timeout=10000)

            # the export link of the page carries the chat's evidence
            href = page.get_attribute("#export-link", "href")
            assert href and "session=" in href
            fc = page.evaluate(f"fetch({href!r}).then(r => r.json())")
            names = {f["properties"]["classification"]["name"] for f in fc["features"]}
            assert {"Evidence region", "Evidence patch", "SPF patch"} <= names

            # toggling an overlay off changes the picture
            shot_on = page.locator("#viewer").screenshot()
            page.uncheck("#ov-heatmap")
            page.uncheck("#ov-nuclei")
            page.wait_for_timeout(200)
            assert page.locator("#viewer").screenshot() != shot_on
            page.check("#ov-heatmap")
            page.check("#ov-nuclei")
            page.uncheck("#ov-tissue")
            page.locator(".evidence-item", has_text="region").first.click()  # a region-sized view for the picture
            page.wait_for_function("() => window.hwsi.viewer.complete === true", timeout=10000)
            page.wait_for_timeout(400)
            page.screenshot(path=str(ARTIFACTS / "serve-e2e.png"))
        finally:
            browser.close()
    assert not errors, errors
    assert (ARTIFACTS / "serve-e2e.png").stat().st_size > 10000
