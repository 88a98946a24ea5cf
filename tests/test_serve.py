"""API tests of `hwsi serve`: every endpoint and every error case (synthetic pyramidal TIFF + schema store)."""

from __future__ import annotations

import http.client
import io
import json
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from hwsi.serve.app import create_app
from hwsi.serve.assistant import EvidenceResult, evidence_from_heatmap, normalise
from hwsi.serve.commands import host_warning
from hwsi.serve.dzi import DziGeometry, TileCache, TileNotFound
from hwsi.serve.registry import SlideRegistry
from hwsi.serve.server import BackgroundServer
from hwsi.store import SlideStore
from synthetic_store import make_synthetic_job

SID = "synth-a"


# ---- small real assistants for the failure and concurrency cases -------------------------------------------
class _EchoSession:
    def __init__(self, store: Path, delay: float) -> None:
        with SlideStore(store) as s:
            self.rc, self.pc, self.tissue = s.region_coords(), s.patch_coords(), s.patch_tissue()
        self.delay = delay
        self.history: list[str] = []

    def ask(self, question: str, max_new_tokens: int = 128) -> Iterator[str]:
        self.history.append(question)
        words = f"echo {len(self.history)}: {question}".split()
        for i, w in enumerate(words[:max_new_tokens]):
            time.sleep(self.delay)
            yield w if i == 0 else " " + w

    def evidence(self, question: str, answer: str) -> EvidenceResult:
        rng = np.random.default_rng(abs(hash(question)) % 2**32)
        h = normalise(rng.random(self.tissue.shape), self.tissue)
        return EvidenceResult(h, evidence_from_heatmap(h, self.rc, self.pc, 512, 128), "random (test)")


class EchoAssistant:
    """Answers 'echo N: <question>' word by word, slowly; evidence is a question-seeded random map."""

    name = "echo"

    def __init__(self, job: Path, delay: float = 0.01) -> None:
        self.job = job
        self.delay = delay

    def start(self, slide_id: str) -> _EchoSession:
        return _EchoSession(self.job / "stores" / f"{slide_id}.h5", self.delay)


class _FailSession:
    def __init__(self, where: str) -> None:
        self.where = where

    def ask(self, question: str, max_new_tokens: int = 128) -> Iterator[str]:
        yield "partial"
        if self.where == "ask":
            raise RuntimeError("out of memory (simulated)")

    def evidence(self, question: str, answer: str) -> EvidenceResult:
        raise ValueError("no features (simulated)")


class FailingAssistant:
    name = "failing"

    def __init__(self, where: str) -> None:
        self.where = where

    def start(self, slide_id: str) -> _FailSession:
        if self.where == "start":
            raise RuntimeError("model folder is broken (simulated)")
        return _FailSession(self.where)


# ---- fixtures ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> Path:
    job = tmp_path_factory.mktemp("servejob")
    make_synthetic_job(job, SID)
    # a slide file with an entry in slides.json but no store: must not be served
    (job / "slides" / "secret.tiff").write_bytes((job / "slides" / f"{SID}.tiff").read_bytes())
    reg = json.loads((job / "slides.json").read_text())
    reg["secret"] = {"path": str(job / "slides" / "secret.tiff"), "mpp": 0.5}
    (job / "slides.json").write_text(json.dumps(reg))
    return job


@pytest.fixture(scope="module")
def client(job: Path) -> Iterator[TestClient]:
    with TestClient(create_app(job, EchoAssistant(job))) as c:
        yield c


def _events(resp: httpx.Response) -> list[dict]:
    return [json.loads(line) for line in resp.text.splitlines() if line.strip()]


def _chat(c: TestClient, slide: str = SID) -> str:
    r = c.post("/api/chat", json={"slide_id": slide})
    assert r.status_code == 200, r.text
    return r.json()["session_id"]


# ---- slides, DZI, tiles --------------------------------------------------------------------------------
def test_slide_list_serves_only_stores(client: TestClient, job: Path) -> None:
    data = client.get("/api/slides").json()
    assert [s["id"] for s in data["slides"]] == [SID]
    assert data["model"] == "echo"
    assert client.get("/api/slides/secret").status_code == 404
    assert client.get("/api/slides/secret/thumbnail.jpg").status_code == 404
    info = client.get(f"/api/slides/{SID}").json()
    assert (info["width"], info["height"], info["mpp"]) == (3072, 2304, 0.5)
    assert info["dzi_info"]["max_level"] == 12 and info["overlays"]["nuclei"] and info["overlays"]["spf"]
    assert {t["name"] for t in info["nucleus_types"]} == {"unknown", "small_round", "large_atypical", "elongated"}
    assert client.get("/api/health").json()["slides"] == 1


def test_dzi_descriptor_and_thumbnail(client: TestClient) -> None:
    root = ET.fromstring(client.get(f"/api/slides/{SID}/image.dzi").text)
    size = root.find("{http://schemas.microsoft.com/deepzoom/2008}Size")
    assert root.get("TileSize") == "256" and root.get("Format") == "jpeg"
    assert (size.get("Width"), size.get("Height")) == ("3072", "2304")
    r = client.get(f"/api/slides/{SID}/thumbnail.jpg")
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(r.content)).size == (256, 192)


def test_tiles_match_slide_pixels(client: TestClient, job: Path) -> None:
    import openslide

    g = DziGeometry(3072, 2304)
    ref = openslide.OpenSlide(str(job / "slides" / f"{SID}.tiff"))
    # full-resolution tile in the tissue + the right/bottom edge tiles of a coarse level
    for level, col, row in [(12, 4, 3), (12, 11, 8), (10, 2, 2), (0, 0, 0)]:
        r = client.get(f"/api/slides/{SID}/image_files/{level}/{col}_{row}.png")
        assert r.status_code == 200, (level, col, row, r.text)
        img = np.asarray(Image.open(io.BytesIO(r.content)).convert("RGB")).astype(float)
        x, y, w, h = g.tile_box(level, col, row)
        assert img.shape == (h, w, 3)
        d = g.downsample(level)
        want = np.asarray(ref.get_thumbnail((max(1, w), max(1, h))) if level == 0 else
                          ref.read_region((x * d, y * d), 0, (w * d, h * d)).convert("RGB").resize((w, h), Image.BOX))
        assert np.abs(img - np.asarray(want, float)[..., :3]).mean() < 12, (level, col, row)
    assert client.get(f"/api/slides/{SID}/image_files/12/4_3.jpeg").headers["content-type"] == "image/jpeg"


@pytest.mark.parametrize(
    "path",
    [
        "13/0_0.jpeg", "12/12_0.jpeg", "12/0_9.jpeg", "0/1_0.jpeg", "-1/0_0.jpeg", "12/-1_0.jpeg",
        "12/0_0.gif", "12/0_0", "12/a_b.jpeg", "12/0_0_0.jpeg", "99999999999/0_0.jpeg", "12/99999999999_0.jpeg",
        "1e3/0_0.jpeg", "12/%C2%B2_0.jpeg", "12/0x1_0.jpeg", "12/..%2F..%2F0_0.jpeg",
    ],
)
def test_tile_out_of_range_is_404(client: TestClient, path: str) -> None:
    r = client.get(f"/api/slides/{SID}/image_files/{path}")
    assert r.status_code == 404, (path, r.status_code, r.text)


def test_tile_cache_and_http_caching(job: Path) -> None:
    with TestClient(create_app(job, None)) as c:
        url = f"/api/slides/{SID}/image_files/11/2_1.jpeg"
        a = c.get(url)
        b = c.get(url)
        assert a.headers["x-tile-cache"] == "miss" and b.headers["x-tile-cache"] == "hit"
        assert a.content == b.content
        assert "max-age" in a.headers["cache-control"]
        r = c.get(url, headers={"If-None-Match": a.headers["etag"]})
        assert r.status_code == 304 and r.content == b""
        assert c.get(url, headers={"If-None-Match": '"other"'}).status_code == 200


def test_tile_cache_is_bounded_lru() -> None:
    cache = TileCache(max_bytes=100)
    for i in range(5):
        cache.put((i,), bytes(30))
    assert len(cache) == 3 and cache.nbytes == 90
    assert cache.get((0,)) is None and cache.get((4,)) is not None
    cache.get((2,))
    cache.put((5,), bytes(30))  # evicts 3, the least recently used
    assert cache.get((3,)) is None and cache.get((2,)) is not None
    with pytest.raises(TileNotFound):
        DziGeometry(100, 50).tile_box(8, 0, 0)


# ---- safety: ids never become paths -------------------------------------------------------------------
TRAVERSAL = [
    "..%2F..%2F..%2Fetc%2Fpasswd", "%2Fetc%2Fpasswd", "%2e%2e", "%2e%2e%2fstores%2fsynth-a",
    "synth-a%2F..%2Fsynth-a", "..%5C..%5Cwindows", "%EF%BC%8E%EF%BC%8E%EF%BC%8Fetc",  # fullwidth ．．／
    "synth-a%00", "SYNTH-A", "synth%E2%80%90a", "stores", "synth-a.h5", "..", "%252e%252e%252f",
]


@pytest.mark.parametrize("sid", TRAVERSAL)
def test_slide_ids_never_become_paths(client: TestClient, sid: str) -> None:
    for suffix in ("", "/thumbnail.jpg", "/image.dzi", "/image_files/12/0_0.jpeg", "/overlays/grid",
                   "/export.geojson"):
        r = client.get(f"/api/slides/{sid}{suffix}")
        assert r.status_code == 404, (sid, suffix, r.status_code, r.text[:200])
    r = client.post("/api/chat", json={"slide_id": sid.replace("%2F", "/")})
    assert r.status_code == 404


def test_registry_lookup_is_exact(job: Path) -> None:
    reg = SlideRegistry(job)
    for bad in ["../stores/synth-a", str(job / "stores" / "synth-a.h5"), "synth-a/", "./synth-a", "secret", ""]:
        assert reg.get(bad) is None
    assert reg.get(SID) is not None


def test_raw_dot_segments_over_http(job: Path) -> None:
    """Unnormalised ``../`` sent on the wire (clients like httpx would collapse it) must not escape."""
    with BackgroundServer(create_app(job, None)) as srv:
        for raw in [
            "/api/slides/../../../../etc/passwd",
            f"/api/slides/../stores/{SID}.h5",
            "/api/slides/..%2f..%2fslides.json",
            f"/static/../../stores/{SID}.h5",
            "/static/%2e%2e/%2e%2e/store/layout.py",
            f"/api/slides/{SID}/image_files/../../../slides.json",
            "/api/slides//etc/passwd/thumbnail.jpg",
        ]:
            conn = http.client.HTTPConnection(srv.host, srv.port, timeout=10)
            conn.request("GET", raw)
            resp = conn.getresponse()
            body = resp.read()
            assert resp.status == 404, (raw, resp.status, body[:200])
            assert b"HDF" not in body and b"root:" not in body
            conn.close()


def test_host_warning() -> None:
    assert host_warning("127.0.0.1") is None and host_warning("localhost") is None and host_warning("::1") is None
    assert host_warning("127.0.0.2") is None
    assert "other machines" in (host_warning("0.0.0.0") or "")
    assert host_warning("192.168.1.4") is not None


# ---- overlays and export --------------------------------------------------------------------------------
def test_overlays_grid_spf_tissue(client: TestClient, job: Path) -> None:
    with SlideStore(job / "stores" / f"{SID}.h5") as s:
        rc, sel, (mask, _) = s.region_coords(), s.spf_selected(), s.tissue_mask()
    grid = client.get(f"/api/slides/{SID}/overlays/grid").json()
    assert grid["regions"] == rc.tolist() and grid["grid_side"] == 4 and len(grid["patch_tissue"][0]) == 16
    spf = client.get(f"/api/slides/{SID}/overlays/spf").json()
    assert len(spf["patches"]) == int((sel >= 0).sum()) and spf["patch_size_level0"] == 128
    r = client.get(f"/api/slides/{SID}/overlays/tissue.png")
    assert r.headers["x-mask-source"] == "tissue/mask"
    png = np.asarray(Image.open(io.BytesIO(r.content)))
    assert png.shape[:2] == mask.shape and ((png[..., 3] > 0) == (mask > 0)).all()


def test_nuclei_in_view_only(client: TestClient, job: Path) -> None:
    with SlideStore(job / "stores" / f"{SID}.h5") as s:
        x, y, t = s.cell_column("x"), s.cell_column("y"), s.cell_column("type")
    assert x.size > 50
    x0, y0 = float(np.median(x)) - 300, float(np.median(y)) - 300
    box = (x0, y0, x0 + 600, y0 + 600)
    inside = (x >= box[0]) & (x < box[2]) & (y >= box[1]) & (y < box[3])
    r = client.get(f"/api/slides/{SID}/overlays/nuclei", params=dict(zip(("x0", "y0", "x1", "y1"), box)))
    data = r.json()
    assert r.status_code == 200 and 0 < len(data["x"]) == int(inside.sum()) < x.size
    assert sorted(data["type"]) == sorted(t[inside].tolist())
    assert all(box[0] <= v < box[2] for v in data["x"])
    everything = dict(x0=0, y0=0, x1=3072, y1=2304)
    r = client.get(f"/api/slides/{SID}/overlays/nuclei", params={**everything, "limit": 10}).json()
    assert len(r["x"]) == 10 and r["truncated"]
    for bad in [dict(x0=5, y0=0, x1=1, y1=9), dict(x0="nan", y0=0, x1=1, y1=9), dict(x0=0, y0=0, x1=1)]:
        assert client.get(f"/api/slides/{SID}/overlays/nuclei", params=bad).status_code == 422
    assert client.get(f"/api/slides/{SID}/overlays/nuclei", params={**everything, "limit": 10**6}).status_code == 422


def _check_qupath(fc: dict) -> dict[str, int]:
    assert fc["type"] == "FeatureCollection"
    kinds: dict[str, int] = {}
    for feat in fc["features"]:
        assert feat["type"] == "Feature" and feat["geometry"]["type"] == "Polygon"
        ring = feat["geometry"]["coordinates"][0]
        assert ring[0] == ring[-1] and len(ring) >= 4
        props = feat["properties"]
        assert props["objectType"] in ("detection", "annotation")
        cls = props["classification"]
        assert isinstance(cls["name"], str) and len(cls["color"]) == 3 and all(0 <= c <= 255 for c in cls["color"])
        kinds[cls["name"]] = kinds.get(cls["name"], 0) + 1
    return kinds


def test_export_geojson_page_and_cli(client: TestClient, job: Path, tmp_path: Path) -> None:
    from hwsi.cli import main

    with SlideStore(job / "stores" / f"{SID}.h5") as s:
        n_cells = s.cell_column("x").shape[0]
        n_spf = int((s.spf_selected() >= 0).sum())
    fc = client.get(f"/api/slides/{SID}/export.geojson").json()
    kinds = _check_qupath(fc)
    assert kinds["SPF patch"] == n_spf and sum(v for k, v in kinds.items() if k != "SPF patch") == n_cells
    sid = _chat(client)
    client.post(f"/api/chat/{sid}/ask", json={"question": "where is the tumour?"})
    kinds = _check_qupath(client.get(f"/api/slides/{SID}/export.geojson", params={"session": sid}).json())
    assert kinds["Evidence region"] == 3 and kinds["Evidence patch"] == 5
    only_ev = client.get(f"/api/slides/{SID}/export.geojson", params={"session": sid, "nuclei": 0, "spf": 0}).json()
    assert len(only_ev["features"]) == 8
    assert client.get(f"/api/slides/{SID}/export.geojson", params={"session": "nope"}).status_code == 404
    out = tmp_path / "x.geojson"
    assert main(["export", str(job), SID, "--out", str(out)]) == 0
    assert _check_qupath(json.loads(out.read_text()))["SPF patch"] == n_spf
    assert main(["export", str(job), "../secret", "--out", str(out)]) == 2


def test_serve_command_errors(tmp_path: Path) -> None:
    from hwsi.cli import main

    assert main(["serve", str(tmp_path)]) == 2  # no stores: a clear error, no server


# ---- chat -------------------------------------------------------------------------------------------------
def test_chat_streams_multi_turn_with_evidence(client: TestClient) -> None:
    sid = _chat(client)
    ev = _events(client.post(f"/api/chat/{sid}/ask", json={"question": "what is the diagnosis"}))
    types = [e["type"] for e in ev]
    assert types[0] == "start" and types[-1] == "done" and types.count("token") == 6
    assert "".join(e["text"] for e in ev if e["type"] == "token") == "echo 1: what is the diagnosis"
    evidence = next(e for e in ev if e["type"] == "evidence")
    assert [i["kind"] for i in evidence["items"]] == ["region"] * 3 + ["patch"] * 5
    scores = [i["score"] for i in evidence["items"] if i["kind"] == "patch"]
    assert scores == sorted(scores, reverse=True)
    ev2 = _events(client.post(f"/api/chat/{sid}/ask", json={"question": "and the grade", "max_new_tokens": 2}))
    assert "".join(e["text"] for e in ev2 if e["type"] == "token") == "echo 2:"
    hist = client.get(f"/api/chat/{sid}").json()
    assert [t["question"] for t in hist["turns"]] == ["what is the diagnosis", "and the grade"]
    hm = client.get(f"/api/chat/{sid}/heatmap", params={"turn": 0}).json()["scores"]
    assert len(hm) == client.get(f"/api/slides/{SID}").json()["n_regions"] and len(hm[0]) == 16
    flat = [v for row in hm for v in row if v is not None]
    assert min(flat) == 0.0 and max(flat) == 1.0
    assert client.get(f"/api/chat/{sid}/heatmap", params={"turn": 5}).status_code == 404
    assert client.delete(f"/api/chat/{sid}").status_code == 200
    assert client.get(f"/api/chat/{sid}").status_code == 404


@pytest.mark.parametrize(
    "body,status",
    [
        ({"question": "x" * 2001}, 422),
        ({"question": ""}, 422),
        ({"question": "ok", "max_new_tokens": 0}, 422),
        ({"question": "ok", "max_new_tokens": 100000}, 422),
        ({}, 422),
    ],
)
def test_chat_input_validation(client: TestClient, body: dict, status: int) -> None:
    sid = _chat(client)
    assert client.post(f"/api/chat/{sid}/ask", json=body).status_code == status


def test_request_body_limit(client: TestClient) -> None:
    sid = _chat(client)
    big = json.dumps({"question": "x" * 40000}).encode()
    assert client.post(f"/api/chat/{sid}/ask", content=big, headers={"content-type": "application/json"}).status_code == 413

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted while streaming
        yield b'{"question": "'
        for _ in range(40):
            yield b"x" * 1000
        yield b'"}'

    r = client.post(f"/api/chat/{sid}/ask", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413
    assert client.post("/api/chat", json={"slide_id": "s" * 300}).status_code == 422
    assert client.post("/api/chat/nope/ask", json={"question": "hi"}).status_code == 404


def test_chat_without_model(job: Path) -> None:
    with TestClient(create_app(job, None)) as c:
        ev = _events(c.post(f"/api/chat/{_chat(c)}/ask", json={"question": "hi"}))
        assert [e["type"] for e in ev] == ["start", "error", "done"] and "--model" in ev[1]["message"]


@pytest.mark.parametrize("where", ["start", "ask", "evidence"])
def test_model_failure_is_a_chat_message_and_server_keeps_serving(job: Path, where: str) -> None:
    with TestClient(create_app(job, FailingAssistant(where))) as c:
        sid = _chat(c)
        r = c.post(f"/api/chat/{sid}/ask", json={"question": "hi"})
        assert r.status_code == 200
        ev = _events(r)
        err = [e for e in ev if e["type"] == "error"]
        assert len(err) == 1 and "simulated" in err[0]["message"] and ev[-1]["type"] == "done"
        if where == "evidence":
            assert ev[-1]["answer"] == "partial"
        # the chat is free again, and the server keeps serving tiles and new chats
        assert c.post(f"/api/chat/{sid}/ask", json={"question": "again"}).status_code == 200
        assert c.get(f"/api/slides/{SID}/image_files/9/0_0.jpeg").status_code == 200
        assert c.get(f"/api/chat/{sid}").json()["turns"][0]["error"]


def test_parallel_tiles_and_chats_do_not_mix(job: Path) -> None:
    """50 tile requests and two slow chats at once over real HTTP: all succeed, answers stay in their chat."""
    app = create_app(job, EchoAssistant(job, delay=0.1))
    with BackgroundServer(app) as srv, httpx.Client(base_url=srv.url, timeout=60) as http:
        g = DziGeometry(3072, 2304)
        tiles = [(L, c, r) for L in (9, 10, 11, 12) for c in range(g.tile_grid(L)[0]) for r in range(g.tile_grid(L)[1])][:50]
        assert len(tiles) == 50
        sids = [http.post("/api/chat", json={"slide_id": SID}).json()["session_id"] for _ in range(2)]
        questions = ["alpha beta gamma delta epsilon", "one two three four five six"]

        def ask(i: int) -> str:
            with http.stream("POST", f"/api/chat/{sids[i]}/ask", json={"question": questions[i]}) as r:
                text = ""
                for line in r.iter_lines():
                    if line:
                        e = json.loads(line)
                        text += e.get("text", "") if e["type"] == "token" else ""
                return text

        def tile(t: tuple[int, int, int]) -> int:
            return http.get(f"/api/slides/{SID}/image_files/{t[0]}/{t[1]}_{t[2]}.jpeg").status_code

        busy = threading.Event()

        def ask_same_chat_twice() -> int:
            busy.wait(5)
            return http.post(f"/api/chat/{sids[0]}/ask", json={"question": "interrupt"}).status_code

        with ThreadPoolExecutor(16) as pool:
            chats = [pool.submit(ask, i) for i in range(2)]
            time.sleep(0.1)
            busy.set()
            second = pool.submit(ask_same_chat_twice)
            codes = list(pool.map(tile, tiles))
            answers = [f.result() for f in chats]
        assert codes == [200] * 50
        assert answers == [f"echo 1: {q}" for q in questions]
        assert second.result() == 409  # one question at a time per chat
        assert http.get("/api/health").json()["ok"]


def test_page_is_503_naming_the_build_until_the_front_end_is_built(
    client: TestClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import hwsi.serve.app as app_module

    built = tmp_path / "vendor" / "built.json"  # where web/build.mjs would write its marker
    monkeypatch.setattr(app_module, "VENDOR_BUILT", built)
    r = client.get("/")
    assert r.status_code == 503 and r.headers["content-type"].startswith("text/html"), r.text
    assert "make venv" in r.text and "npm ci" in r.text and "OpenSeadragon" in r.text
    assert client.get("/api/slides").status_code == 200  # the API works without the front end
    built.parent.mkdir()
    built.write_text("{}")  # a build while the server runs is picked up on the next request
    r = client.get("/")
    assert r.status_code == 200 and "/static/vendor/openseadragon/openseadragon.min.js" in r.text


def test_missing_slide_file_is_503_and_server_keeps_serving(tmp_path: Path) -> None:
    job = tmp_path / "job"
    make_synthetic_job(job, "gone", width=1024, height=768, region_size=256, patch_size=64)
    make_synthetic_job(job, "kept", width=1024, height=768, region_size=256, patch_size=64, seed=1)
    (job / "slides" / "gone.tiff").unlink()
    with TestClient(create_app(job, None)) as c:
        assert [s["id"] for s in c.get("/api/slides").json()["slides"]] == ["gone", "kept"]
        r = c.get("/api/slides/gone/image_files/10/0_0.jpeg")
        assert r.status_code == 503 and "cannot be opened" in r.json()["detail"]
        assert str(job) not in r.text  # no filesystem path in the reply
        assert c.get("/api/slides/gone/overlays/grid").status_code == 200  # the store is still there
        assert c.get("/api/slides/kept/image_files/10/0_0.jpeg").status_code == 200
