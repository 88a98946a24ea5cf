"""End-to-end tests of `hwsi serve` in headless Chromium (Playwright's Python package driving /usr/bin/chromium).

The page is the OpenSeadragon + Annotorious viewer built by `make venv` (npm ci + web/build.mjs). One tiny MLLM-HWSI
trained for a few steps answers (the real ModelAssistant). Covered: slide list with thumbnail, tiles, µm scale bar,
zoom, every overlay on and off (tissue, grid, SPF, heatmap, nuclei at high zoom, evidence), multi-turn streamed chat
with clickable evidence, export; an ROI set through window.hwsi and one drawn by a real mouse drag with the rectangle
tool, asked about (the streamed answer and its evidence stay inside), exported, and reopened from the page's URL.
Screenshots go to test-artifacts/serve-e2e-*.png (git-ignored). Skips, with the reason, only where Chromium,
Playwright or node/npm (so the front end could not be built) is absent.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hwsi.serve.app import VENDOR_BUILT, create_app
from hwsi.serve.server import BackgroundServer
from synthetic_store import make_synthetic_job, tiny_model_assistant

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "test-artifacts"
SID, SID_B = "synth-a", "synth-b"  # the ROI and link test works on the second slide of the list
CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
FLAGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",  # WebGL (Annotorious) on SwiftShader
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if CHROMIUM is None:
        pytest.skip("Chromium is not installed (apt-get install chromium chromium-driver; .ci/run does it)")
    pytest.importorskip("playwright.sync_api", reason="the playwright Python package is not installed")
    if not VENDOR_BUILT.is_file():
        if shutil.which("npm") is None or shutil.which("node") is None:
            pytest.skip("node/npm absent, so the viewer's front end is not built (apt-get install nodejs npm)")
        pytest.fail(f"npm is here but the front end is not built ({VENDOR_BUILT} missing): run `make venv`")
    job = tmp_path_factory.mktemp("e2ejob")
    make_synthetic_job(job, SID)
    make_synthetic_job(job, SID_B, width=2560, height=2048, seed=1)
    # ~15 s on an idle 2-core CPU: a tiny MLLM-HWSI trained on two QA pairs about synth-a (tests/synthetic_store)
    assistant = tiny_model_assistant(job, tmp_path_factory.mktemp("llm"), train_steps=40)
    with BackgroundServer(create_app(job, assistant)) as srv:
        yield srv.url


@pytest.fixture(scope="module")
def browser(served: str) -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)  # fresh profile per launch
        try:
            yield b
        finally:
            b.close()


class Page:
    """One browser tab on the viewer, recording page errors, console errors and tile/nuclei requests."""

    def __init__(self, browser: Any, url: str) -> None:
        self.page = browser.new_page(viewport={"width": 1400, "height": 860})
        self.errors: list[str] = []
        self.tile_levels: list[int] = []
        self.nuclei_requests: list[str] = []
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.on("request", self._request)
        self.page.goto(url)
        assert self.page.evaluate("window.hwsi.ready"), self.page.locator("#status").inner_text()
        self.settle()

    def _request(self, req: Any) -> None:
        if "/image_files/" in req.url:
            self.tile_levels.append(int(req.url.split("/image_files/")[1].split("/")[0]))
        if "/overlays/nuclei" in req.url:
            self.nuclei_requests.append(req.url)

    def js(self, expr: str, arg: Any = None) -> Any:
        return self.page.evaluate(expr, arg)

    def settle(self) -> None:
        """All tiles in view drawn, no animation running, the overlay canvas redrawn after it."""
        self.page.wait_for_function("() => window.hwsi.viewer.settled", timeout=15000)
        self.page.wait_for_timeout(150)

    def shot(self) -> bytes:
        self.settle()
        return self.page.locator("#viewer").screenshot()

    def toggle_changes_picture(self, box: str) -> bool:
        before = self.shot()
        self.page.click(box)
        return self.shot() != before

    def ask(self, question: str) -> tuple[str, list[dict[str, Any]], list[int]]:
        """Ask through the form; the displayed answer, its evidence items and the shown length after each token."""
        n = self.page.locator(".msg.assistant").count()
        self.page.fill("#question", question)
        self.page.click("#ask")
        self.page.wait_for_function(f"() => document.querySelectorAll('.msg.assistant').length > {n}")
        self.page.wait_for_function("() => document.body.dataset.chat === 'idle'", timeout=60000)
        answer = self.page.locator(".msg.assistant .answer-text").last.text_content() or ""
        assert re.search("[A-Za-z]{3}", answer) and "[error]" not in answer, answer
        shown = self.js("window.hwsi.state.shown")  # streamed: the display grew token by token
        assert len(shown) >= 2 and shown == sorted(shown) and shown[0] < shown[-1] == len(answer), shown
        return answer, self.js("window.hwsi.state.evidence"), shown

    def export(self) -> dict[str, Any]:
        href = self.page.get_attribute("#export-link", "href")
        assert href and "session=" in href, href
        return self.js("(h) => fetch(h).then((r) => r.json())", href)


def _centre_inside(item: dict[str, Any], box: tuple[float, float, float, float]) -> bool:
    x, y, w, h = box
    cx, cy = item["x"] + item["w"] / 2, item["y"] + item["h"] / 2
    return x <= cx < x + w and y <= cy < y + h


def test_viewer_zoom_overlays_multi_turn_chat_evidence_export(served: str, browser: Any) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    v = Page(browser, served + "/")
    page = v.page
    # slide list with a loaded thumbnail; the first slide opened, tiles drawn, µm scale bar
    page.wait_for_function("() => (document.querySelector('#slide-list img') || {}).naturalWidth > 0")
    assert page.locator("#slide-list li.active").get_attribute("data-slide") == SID
    assert v.js("window.hwsi.viewer.tilesLoaded") > 0 and v.tile_levels
    start_level = int(v.js("document.body.dataset.level"))
    scale_before = page.locator("#scalebar-label").inner_text()
    assert re.fullmatch(r"\d+ (µm|mm)", scale_before), scale_before
    assert "tiny-mllm" in page.locator("#model-name").inner_text()

    # the other slide of the list opens on a click (and its URL is pushed); then back to the first
    page.locator(f"#slide-list li[data-slide='{SID_B}']").click()
    page.wait_for_function(f"() => document.body.dataset.slide === '{SID_B}'")
    v.settle()
    assert v.js("location.search") == f"?slide={SID_B}" and SID_B in page.locator("#slide-title").inner_text()
    assert v.js("window.hwsi.getView().box[2]") == pytest.approx(2560, rel=0.3)
    page.locator(f"#slide-list li[data-slide='{SID}']").click()
    page.wait_for_function(f"() => document.body.dataset.slide === '{SID}'")
    v.settle()

    # overlays without an answer: each one switched on changes the picture
    for box in ("#ov-tissue", "#ov-grid", "#ov-spf"):
        assert v.toggle_changes_picture(box), box

    # a whole-slide question: streamed answer, evidence buttons, heatmap; heatmap and evidence overlays toggle
    _, items, _ = v.ask("Where is the tumour and what grade is it?")
    assert len(items) >= 3 and page.locator(".evidence-item").count() == len(items)
    assert v.js("window.hwsi.state.heatmap.length") > 0
    assert page.locator(".msg.roi").count() == 0  # no ROI: no restriction note
    for box in ("#ov-heatmap", "#ov-evidence"):
        assert v.toggle_changes_picture(box), box  # off
        page.click(box)  # on again

    # clicking a patch evidence item pans and zooms the viewer onto it
    before = v.js("window.hwsi.getView()")
    page.locator(".evidence-item", has_text="patch").first.click()
    v.settle()
    target = v.js("(() => { const e = window.hwsi.state.highlight; return [e.x + e.w / 2, e.y + e.h / 2]; })()")
    after = v.js("window.hwsi.getView()")
    assert [after["cx"], after["cy"]] == pytest.approx(target, abs=2) and after["scale"] > before["scale"]

    # zoom in with the button: finer tiles, another scale bar, nuclei fetched for the view (high zoom only)
    for _ in range(2):
        page.click("#zoom-in")
        v.settle()
    page.wait_for_function("() => Number(document.body.dataset.nuclei || 0) > 0", timeout=10000)
    assert v.nuclei_requests and "x0=" in v.nuclei_requests[-1]
    end_level = int(v.js("document.body.dataset.level"))
    assert end_level > start_level and max(v.tile_levels) >= end_level
    assert page.locator("#scalebar-label").inner_text() != scale_before
    assert v.js("window.hwsi.getView().umPerPx") <= 1.0
    assert v.toggle_changes_picture("#ov-nuclei")  # nuclei off
    page.click("#ov-nuclei")
    page.screenshot(path=str(ARTIFACTS / "serve-e2e-zoomed.png"))

    # a second turn in the same chat; the export carries both turns' evidence and the SPF patches
    page.click("#zoom-home")
    v.settle()
    _, items2, _ = v.ask("What grade is it?")
    sid = v.js("window.hwsi.state.session.id")
    turns = v.js("(s) => fetch('/api/chat/' + s).then((r) => r.json())", sid)["turns"]
    assert len(turns) == 2 and page.locator(".msg.assistant").count() == 2
    fc = v.export()
    names = [f["properties"]["classification"]["name"] for f in fc["features"]]
    assert {"Evidence region", "Evidence patch", "SPF patch"} <= set(names)
    assert sum(n.startswith("Evidence") for n in names) == len(items) + len(items2)
    page.screenshot(path=str(ARTIFACTS / "serve-e2e-whole-slide.png"))
    page.close()
    assert not v.errors, v.errors
    assert (ARTIFACTS / "serve-e2e-whole-slide.png").stat().st_size > 10000


def test_roi_by_api_and_by_real_drag_asked_exported_and_reopened_from_the_link(served: str, browser: Any) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    v = Page(browser, f"{served}/?slide={SID_B}")
    assert v.js("window.hwsi.getView().slide") == SID_B  # not the first slide of the list
    page = v.page
    grid = v.js(f"fetch('/api/slides/{SID_B}/overlays/grid').then((r) => r.json())")
    side = grid["region_size_level0"]
    by_tissue = sorted(range(len(grid["regions"])), key=lambda r: -grid["patch_tissue"][r].count("1"))
    a, b = (grid["regions"][r] for r in by_tissue[:2])  # the two regions with the most tissue patches

    # 1. an ROI through the page's API: shown by Annotorious, in the side panel and in the URL; asked about
    roi = v.js("(r) => window.hwsi.setRoi(r)", {"x": a[0], "y": a[1], "w": side, "h": side})
    assert roi == {"x": a[0], "y": a[1], "w": side, "h": side}
    sel = v.js("window.hwsi.viewer.anno.getAnnotations().map((x) => x.target.selector)")
    assert len(sel) == 1 and sel[0]["type"] == "RECTANGLE" and sel[0]["geometry"]["w"] == side
    assert "ROI: x" in page.locator("#roi-status").inner_text() and "ROI" in page.locator("#chat-title").inner_text()
    page.wait_for_function("() => location.hash.includes('roi=r%3A') || location.hash.includes('roi=r:')")
    _, items, _ = v.ask("Is there a lesion here?")
    note = page.locator(".msg.roi").last.inner_text()
    assert note.startswith(f"Answer restricted to the ROI x {a[0]}..{a[0] + side}, y {a[1]}..{a[1] + side}"), note
    assert items and all(_centre_inside(i, (a[0], a[1], side, side)) for i in items), items
    fc = v.export()
    ev = [f for f in fc["features"] if f["properties"]["classification"]["name"].startswith("Evidence")]
    assert len(ev) == len(items)
    for f in ev:  # the exported evidence lies inside the ROI too
        xs, ys = zip(*f["geometry"]["coordinates"][0])
        box = {"x": min(xs), "y": min(ys), "w": max(xs) - min(xs), "h": max(ys) - min(ys)}
        assert _centre_inside(box, (a[0], a[1], side, side)), f
    page.screenshot(path=str(ARTIFACTS / "serve-e2e-roi-api.png"))

    # an ROI outside the slide: the server's one-line 400 shows in the chat, no turn is recorded
    v.js("window.hwsi.setRoi({x: 9000, y: 9000, w: 100, h: 100})")
    n_err = len(v.errors)
    page.fill("#question", "And out there?")
    page.click("#ask")
    page.wait_for_function("() => document.querySelectorAll('.msg.assistant.error').length === 1", timeout=10000)
    assert "lies outside the slide" in page.locator(".msg.assistant.error").inner_text()
    assert all("status of 400" in e for e in v.errors[n_err:])  # Chromium logs the refused request
    del v.errors[n_err:]
    sid = v.js("window.hwsi.state.session.id")
    assert len(v.js("(s) => fetch('/api/chat/' + s).then((r) => r.json())", sid)["turns"]) == 1

    # 2. one real mouse drag with the rectangle tool (Annotorious draws it through WebGL)
    page.click("#roi-clear")
    assert v.js("window.hwsi.getRoi()") is None and v.js("window.hwsi.viewer.anno.getAnnotations().length") == 0
    page.click("#roi-rect")
    assert "active" in (page.get_attribute("#roi-rect", "class") or "")
    inset = side // 8  # a box inside region b, corner to corner in screen px of the page
    p0, p1 = v.js("([x0, y0, x1, y1]) => [window.hwsi.viewer.toScreen(x0, y0), window.hwsi.viewer.toScreen(x1, y1)]",
                  [b[0] + inset, b[1] + inset, b[0] + side - inset, b[1] + side - inset])
    origin = page.locator("#viewer").bounding_box()
    (sx0, sy0), (sx1, sy1) = ((origin["x"] + x, origin["y"] + y) for x, y in (p0, p1))
    page.mouse.move(sx0, sy0)
    page.mouse.down()
    page.mouse.move(sx1, sy1, steps=12)
    page.mouse.up()
    page.wait_for_function("() => window.hwsi.getRoi() !== null", timeout=5000)
    drawn = v.js("window.hwsi.getRoi()")
    tol = 2 / v.js("window.hwsi.viewer.scale")  # 2 screen px in level-0 px
    want = [b[0] + inset, b[1] + inset, side - 2 * inset, side - 2 * inset]
    assert [drawn["x"], drawn["y"], drawn["w"], drawn["h"]] == pytest.approx(want, abs=tol), (drawn, want)
    assert v.js("window.hwsi.viewer.anno.getAnnotations().length") == 1
    assert "active" not in (page.get_attribute("#roi-rect", "class") or "")  # back to navigation after one box
    _, items, _ = v.ask("And what about this part?")
    note = page.locator(".msg.roi").last.inner_text()
    assert note.startswith(f"Answer restricted to the ROI x {drawn['x']}..{drawn['x'] + drawn['w']}"), note
    box = (drawn["x"], drawn["y"], drawn["w"], drawn["h"])
    assert items and all(_centre_inside(i, box) for i in items), (box, items)
    page.screenshot(path=str(ARTIFACTS / "serve-e2e-roi-drag.png"))

    # 3. a polygon by real clicks with the polygon tool (the corners, then the first corner again to close it)
    page.click("#roi-poly")
    q = side // 4
    corners = [[b[0] + q, b[1] + q], [b[0] + 3 * q, b[1] + q], [b[0] + 2 * q, b[1] + 3 * q]]
    for x, y in v.js("(ps) => ps.map(([x, y]) => window.hwsi.viewer.toScreen(x, y))", corners + corners[:1]):
        page.mouse.move(origin["x"] + x, origin["y"] + y, steps=4)
        page.mouse.click(origin["x"] + x, origin["y"] + y)
    page.wait_for_function("() => window.hwsi.getRoi() && window.hwsi.getRoi().polygon", timeout=5000)
    poly = v.js("window.hwsi.getRoi()")["polygon"]
    assert len(poly) == 3 and all(p == pytest.approx(c, abs=tol) for p, c in zip(poly, corners)), (poly, corners)
    _, items, _ = v.ask("Is there a lesion in this triangle?")
    assert "polygon" in page.locator(".msg.roi").last.inner_text()
    assert items and all(_centre_inside(i, (b[0], b[1], side, side)) for i in items), items

    # 4. the page's URL reopens the same slide, view and ROI in a new tab
    v.js("([cx, cy, s]) => window.hwsi.setView(cx, cy, s)", [b[0] + side // 2, b[1] + side // 2, 0.6])
    v.settle()
    page.wait_for_function("""() => {  // the hash is rewritten 250 ms after the last view change: wait for this view
        const h = new URLSearchParams(location.hash.slice(1)), v = window.hwsi.getView();
        return (h.get("roi") || "").startsWith("p:") && Math.abs(h.get("cx") - v.cx) < 1
            && Math.abs(h.get("cy") - v.cy) < 1 && Math.abs(h.get("s") / v.scale - 1) < 1e-3;
    }""", timeout=5000)
    link, view = v.js("location.href"), v.js("window.hwsi.getView()")
    assert page.get_attribute("#view-link", "href") in link and f"?slide={SID_B}#" in link
    again = Page(browser, link)
    view2 = again.js("window.hwsi.getView()")
    assert view2["slide"] == SID_B and view2["roi"] == {"polygon": poly}
    assert [view2["cx"], view2["cy"]] == pytest.approx([view["cx"], view["cy"]], abs=1)
    assert view2["scale"] == pytest.approx(view["scale"], rel=1e-3)
    sel = again.js("window.hwsi.viewer.anno.getAnnotations().map((x) => x.target.selector)")
    assert len(sel) == 1 and sel[0]["type"] == "POLYGON"
    again.page.screenshot(path=str(ARTIFACTS / "serve-e2e-link-reopened.png"))
    # a hash typed on the open page moves it there
    mid = [b[0] + side // 2, b[1] + side // 2]
    again.js("(h) => { location.hash = h; }", f"cx={mid[0]}&cy={mid[1]}&s=0.4&roi=r:{b[0]},{b[1]},{side},{side}")
    again.page.wait_for_function("() => window.hwsi.getRoi() && window.hwsi.getRoi().w !== undefined", timeout=5000)
    view3 = again.js("window.hwsi.getView()")
    assert view3["roi"] == {"x": b[0], "y": b[1], "w": side, "h": side}
    assert [view3["cx"], view3["cy"], view3["scale"]] == pytest.approx([*mid, 0.4], abs=1e-3)
    again.page.close()
    page.close()
    assert not v.errors and not again.errors, (v.errors, again.errors)
