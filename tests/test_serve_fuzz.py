"""Robustness of `hwsi serve`: a bounded, seeded fuzz of every route over ONE keep-alive connection to a uvicorn on
127.0.0.1 (no 5xx, no traceback text, the connection still usable), and the regressions it was written for:
a corrupt tile no longer breaks the slide's later tiles, ids with ``#``/``%``/non-Latin-1 characters get working
URLs and exports, a lone surrogate in a request body is a 422 and not a 500."""

from __future__ import annotations

import http.client
import json
import random
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote, unquote

import numpy as np
import pytest
from fastapi.testclient import TestClient

from hwsi.serve.app import VENDOR_BUILT, create_app
from hwsi.serve.assistant import EvidenceResult, evidence_from_heatmap, normalise
from hwsi.serve.dzi import TileSource, open_reader
from hwsi.serve.server import BackgroundServer
from hwsi.store import SlideStore
from synthetic_store import make_synthetic_job

PLAIN = "plain"
ODD = "ü #%b"  # needs percent-encoding in every URL (space, '#', '%', non-ASCII)
ODD2 = "片-%23"  # not Latin-1 (a Content-Disposition cannot carry it raw), and holds a literal '%23'
REAL = (PLAIN, ODD, ODD2)
SMALL = dict(width=1024, height=768, region_size=256, patch_size=64)
N_REQUESTS = 1000
TIME_LIMIT_S = 90.0


class _Session:
    def __init__(self, store: Path) -> None:
        with SlideStore(store) as s:
            self.rc, self.pc, self.tissue = s.region_coords(), s.patch_coords(), s.patch_tissue()

    def ask(self, question: str, max_new_tokens: int = 128) -> Iterator[str]:
        yield from question.split()[:max_new_tokens]

    def evidence(self, question: str, answer: str) -> EvidenceResult:
        h = normalise(np.random.default_rng(len(question)).random(self.tissue.shape), self.tissue)
        return EvidenceResult(h, evidence_from_heatmap(h, self.rc, self.pc, 256, 64), "random (test)")


class WordAssistant:
    """Answers with the question's words; evidence is a seeded random map over the tissue patches."""

    name = "words"

    def __init__(self, job: Path) -> None:
        self.job = job

    def start(self, slide_id: str) -> _Session:
        return _Session(self.job / "stores" / f"{slide_id}.h5")


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> Path:
    job = tmp_path_factory.mktemp("fuzzjob")
    for seed, sid in enumerate((PLAIN, ODD, ODD2)):
        make_synthetic_job(job, sid, seed=seed, **SMALL)
    return job


def corrupt_tile(tiff: Path, index: int = 5) -> None:
    """Overwrite the start of level-0 JPEG tile ``index`` (OpenSlide then fails every later read on its handle)."""
    import tifffile

    with tifffile.TiffFile(tiff) as tf:
        off = tf.pages[0].dataoffsets[index]
    with open(tiff, "r+b") as fh:
        fh.seek(off)
        fh.write(b"\x00" * 64)


# ---- regressions ------------------------------------------------------------------------------------------
def test_reads_after_a_corrupt_tile_succeed_on_the_same_thread(tmp_path: Path) -> None:
    make_synthetic_job(tmp_path, "c", **SMALL)
    corrupt_tile(tmp_path / "slides" / "c.tiff")  # level 0 = DZI level 10; 4 tiles across: index 5 = (1, 1)
    src = TileSource("c", open_reader(tmp_path / "slides" / "c.tiff", 0.5))
    try:
        with pytest.raises(Exception, match="JPEG"):
            src.tile(10, 1, 1)
        assert src.tile(10, 0, 0).shape == (256, 256, 3)
        assert src.tile(10, 2, 2).mean() < 250  # real pixels, not a white stand-in
        assert src.thumbnail(64).shape[1] == 64
    finally:
        src.close()


def test_a_corrupt_tile_is_502_and_the_slide_keeps_serving(tmp_path: Path) -> None:
    make_synthetic_job(tmp_path, "c", **SMALL)
    corrupt_tile(tmp_path / "slides" / "c.tiff")
    with TestClient(create_app(tmp_path, None)) as c:
        codes = []
        for _ in range(3):
            codes.append(c.get("/api/slides/c/image_files/10/1_1.jpeg").status_code)
            codes += [c.get(f"/api/slides/c/image_files/10/{col}_{row}.png").status_code
                      for col in range(4) for row in range(3) if (col, row) != (1, 1)]
        assert codes == ([502] + [200] * 11) * 3
        assert c.get("/api/slides/c/thumbnail.jpg").status_code == 200  # read from an intact coarser level


@pytest.mark.parametrize("sid", [ODD, ODD2])
def test_odd_ids_get_encoded_urls_and_an_export(job: Path, sid: str) -> None:
    """Over real HTTP (Starlette's TestClient decodes a path twice: '%2523' would arrive as '#')."""
    import httpx

    with BackgroundServer(create_app(job, None)) as srv, httpx.Client(base_url=srv.url, timeout=20) as c:
        listed = {s["id"]: s for s in c.get("/api/slides").json()["slides"]}
        s = listed[sid]
        assert s["thumbnail"] == f"/api/slides/{quote(sid, safe='')}/thumbnail.jpg" and "#" not in s["thumbnail"]
        assert c.get(s["thumbnail"]).headers["content-type"] == "image/jpeg"
        assert c.get(s["dzi"]).status_code == 200
        info = c.get(f"/api/slides/{quote(sid, safe='')}").json()
        assert info["id"] == sid and c.get(info["tiles"] + "9/0_0.jpeg").status_code == 200
        r = c.get(f"/api/slides/{quote(sid, safe='')}/export.geojson")
        assert r.status_code == 200 and r.json()["type"] == "FeatureCollection"
        cd = r.headers["content-disposition"]
        assert cd.isascii() and f"filename*=UTF-8''{quote(sid + '.geojson', safe='')}" in cd
        assert unquote(cd.split("filename*=UTF-8''")[1]) == f"{sid}.geojson"


def test_lone_surrogate_body_is_422_and_the_connection_lives(job: Path) -> None:
    with BackgroundServer(create_app(job, None)) as srv:
        conn = http.client.HTTPConnection(srv.host, srv.port, timeout=20)
        for body in (b'{"slide_id": "\\ud800"}', b'{"slide": "\\udfff\\ud800x"}', b'{"slide_id": "a\\udc80"}'):
            conn.request("POST", "/api/chat", body=body, headers={"content-type": "application/json"})
            sock = conn.sock
            r = conn.getresponse()
            data = r.read()
            assert r.status == 422 and data.isascii() and json.loads(data)["detail"], data[:300]
            assert conn.sock is sock  # kept alive
        conn.request("GET", "/api/health")
        assert conn.getresponse().status == 200
        conn.close()


# ---- the fuzz -----------------------------------------------------------------------------------------------
NASTY_IDS = [
    "", " ", "%", "%%", "%2", "%ZZ", "%00", "%0A", "%23", "%25", "%2F", "%2e%2e", "..", ".", "#", "a#b", "?",
    "%3F", "%C3%BC", "%ED%A0%80", "%FF", "%C0%AF", "s" * 300, "%E2%80%AE" + "txt", "\u00fc", "\U0001f600",
    "plain%20", "PLAIN", "plain.h5", "plain/", "%252e", "null", "undefined", "0", "-1", "1e9", "\\", ";",
]
LEVELS = ["-1", "0", "5", "9", "10", "11", "99", "999", "1e3", "", "01", "٣", "9" * 20, "%31", "0x1", " 1", "+1"]
NAMES = [
    "0_0.jpeg", "0_0.jpg", "1_2.png", "3_2.jpeg", "4_0.jpeg", "0_3.jpeg", "a_b.png", "0_0.gif", "_.jpeg",
    "0__0.jpeg", "0_0.", ".jpeg", "0_0.jpeg.png", "99999999_0.jpeg", "0_-1.jpeg", "%30_0.jpeg", "٣_0.jpeg", "0_0",
    "0_0.JPEG", "0_0.jpeg%00", "-0_0.png", "1e2_0.png", "0_0.jpeg?x=1",
]
NUMBERS = ["0", "1", "-1", "1e3", "1e309", "-1e309", "nan", "inf", "-inf", "abc", "", "3072", "99999999999999999999",
           "0x10", "1_000", "٣", "%00", "2.5"]
SUFFIXES = ["", "/thumbnail.jpg", "/image.dzi", "/overlays/tissue.png", "/overlays/grid", "/overlays/spf",
            "/overlays/nuclei", "/export.geojson", "/image_files", "/image_files/10", "/unknown"]


def _seg(rng: random.Random, text: str) -> str:
    """A path segment as a client would send it: percent-encoded, or raw where it is visible ASCII; a malformed
    one (not a real id) may also keep its '%' raw, so the server sees broken escapes."""
    raw_ok = text.isascii() and text.isprintable() and not any(c in text for c in " #?/%")
    if raw_ok and rng.random() < 0.5:
        return text
    return quote(text, safe="%" if text not in REAL and rng.random() < 0.5 else "")


def _query(rng: random.Random, keys: list[str]) -> str:
    parts = [f"{quote(k)}={quote(rng.choice(NUMBERS), safe='%')}" for k in keys if rng.random() < 0.85]
    return ("?" + "&".join(parts)) if parts else ""


def _json_value(rng: random.Random, depth: int = 0) -> object:
    kind = rng.randrange(9 if depth < 3 else 6)
    if kind == 0:
        return rng.choice([None, True, False])
    if kind == 1:
        return rng.choice([0, -1, 10**30, 1.5, 129, 513, 2**63])
    if kind == 2:
        return rng.choice(["", "hi", "x" * 2001, "\ud800", "a\udc80b", "片", PLAIN, ODD, "\x00", "</script>"])
    if kind == 3:
        return rng.choice(NASTY_IDS)
    if kind in (4, 5):
        return "what is seen here " * rng.randrange(1, 4)
    if kind == 6:
        return [_json_value(rng, depth + 1) for _ in range(rng.randrange(3))]
    return {rng.choice(["slide_id", "question", "max_new_tokens", "x"]): _json_value(rng, depth + 1)
            for _ in range(rng.randrange(3))}


def _body(rng: random.Random) -> bytes:
    r = rng.random()
    if r < 0.1:
        return b""
    if r < 0.2:
        return rng.choice([b"{", b"not json", b"\xff\xfe\x00", b'{"slide_id": "\\ud800"}', b"[]" * 100, b"null"])
    obj = _json_value(rng)
    if rng.random() < 0.6:
        obj = {"slide_id": rng.choice([PLAIN, ODD, ODD2, "nope", "\ud800"]), "question": _json_value(rng),
               "max_new_tokens": rng.choice([1, 3, 0, -5, 10**6, "2", None])}
    return json.dumps(obj).encode("utf-8", "surrogatepass")


def _tile(rng: random.Random) -> tuple[str, str]:
    """Mostly a tile that exists (or is one past the edge), else a malformed level/name."""
    if rng.random() < 0.7:
        lvl = rng.randrange(11)  # 1024 x 768: DZI levels 0..10
        d = 2 ** (10 - lvl)
        cols, rows = -(-(-(-1024 // d)) // 256), -(-(-(-768 // d)) // 256)
        edge = rng.random() < 0.15  # one past the last column or row
        col, row = (cols, rng.randrange(rows)) if edge else (rng.randrange(cols), rng.randrange(rows))
        return str(lvl), f"{col}_{row}.{rng.choice(['jpeg', 'jpg', 'png'])}"
    return rng.choice(LEVELS), rng.choice(NAMES)


def _request(rng: random.Random, sessions: list[str]) -> tuple[str, str, bytes | None]:
    sid = rng.choice(REAL) if rng.random() < 0.7 else rng.choice(NASTY_IDS)
    chat = rng.choice(sessions) if rng.random() < 0.6 else rng.choice(NASTY_IDS)
    r = rng.random()
    if r < 0.3:
        lvl, name = _tile(rng)
        return "GET", f"/api/slides/{_seg(rng, sid)}/image_files/{_seg(rng, lvl)}/{_seg(rng, name)}", None
    if r < 0.55:
        suffix = rng.choice(SUFFIXES)
        q = ""
        if suffix == "/overlays/nuclei":
            if rng.random() < 0.5:
                x0, y0 = rng.randrange(-100, 1024), rng.randrange(-100, 768)
                q = f"?x0={x0}&y0={y0}&x1={x0 + rng.randrange(1, 800)}&y1={y0 + rng.randrange(1, 800)}"
            else:
                q = _query(rng, ["x0", "y0", "x1", "y1", "limit"])
        elif suffix == "/export.geojson":
            q = _query(rng, ["nuclei", "spf"]) + rng.choice(["", "&session=" + quote(chat, safe="%")])
        return "GET", f"/api/slides/{_seg(rng, sid)}{suffix}{q}", None
    if r < 0.65:
        return "POST", "/api/chat", _body(rng)
    if r < 0.8:
        if rng.random() < 0.5:
            body = json.dumps({"question": rng.choice(["what is here", "grade?", "片 #% ü"]),
                               "max_new_tokens": rng.randrange(1, 6)}).encode()
        else:
            body = _body(rng)
        return "POST", f"/api/chat/{_seg(rng, chat)}/ask", body
    if r < 0.9:
        q = f"?turn={rng.randrange(-3, 4)}" if rng.random() < 0.5 else _query(rng, ["turn"])
        return "GET", f"/api/chat/{_seg(rng, chat)}/heatmap{q}", None
    if r < 0.95:
        return ("DELETE" if rng.random() < 0.2 else "GET"), f"/api/chat/{_seg(rng, chat)}", None
    return "GET", rng.choice(["/", "/api/health", "/api/slides", "/static/app.js", "/static/%2e%2e/app.py",
                              "/static/" + quote("\u00fc", safe=""), "/api/", "/api/slides/"]), None


def test_fuzz_every_route_no_5xx_no_traceback_one_connection(job: Path) -> None:
    rng = random.Random(12)
    app = create_app(job, WordAssistant(job), tile_cache_bytes=4 * 2**20)
    seen: dict[int, int] = {}
    with BackgroundServer(app) as srv:
        conn = http.client.HTTPConnection(srv.host, srv.port, timeout=30)
        conn.request("POST", "/api/chat", body=json.dumps({"slide_id": PLAIN}), headers={"content-type": "application/json"})
        sessions = [json.loads(conn.getresponse().read())["session_id"]]
        sock = conn.sock
        t0 = time.monotonic()
        for n in range(N_REQUESTS):
            method, url, body = _request(rng, sessions)
            headers = {"content-type": rng.choice(["application/json", "text/plain", "application/x-www-form-urlencoded"])}
            if rng.random() < 0.1:
                headers["if-none-match"] = rng.choice(['"x"', "*", "\u00e9".encode().decode("latin-1"), ""])
            conn.request(method, url, body=body, headers=headers)
            r = conn.getresponse()
            data = r.read()
            seen[r.status] = seen.get(r.status, 0) + 1
            unbuilt = url == "/" and r.status == 503 and not VENDOR_BUILT.is_file()  # the page names `make venv`
            assert r.status < 500 or unbuilt, (n, method, url, body, r.status, data[:300])
            assert b"Traceback" not in data and b'File "' not in data, (method, url, data[:300])
            assert conn.sock is sock, (n, method, url, r.status, "the server closed the connection")
            if method == "POST" and url == "/api/chat" and r.status == 200:
                sessions.append(json.loads(data)["session_id"])
            assert time.monotonic() - t0 < TIME_LIMIT_S, f"fuzz too slow: {n} requests"
        conn.request("GET", "/api/health")
        assert conn.getresponse().status == 200
        conn.close()
    assert seen.get(200, 0) > 150 and seen.get(404, 0) > 100 and seen.get(422, 0) > 20, seen
