"""Benchmark of `hwsi serve`: DZI tile latency (cold / warm LRU cache / HTTP revalidation) and time to first
streamed token of an answer, over real HTTP (uvicorn in a background thread).

    .venv/bin/python benchmarks/serve.py                      # synthetic 8192×6144 slide + tiny MLLM
    .venv/bin/python benchmarks/serve.py --job JOB --slide ID --model RUN_DIR

Cold = first request of a tile in a fresh server (read from the slide + JPEG encode); warm = same tile again
(LRU cache hit); 304 = a browser revalidating with If-None-Match. Time to first token is measured from sending the
question to receiving the first token event (a new chat: slide inputs loaded, visual prefix encoded and prefilled,
first greedy token). On the synthetic job it uses the real adapter over a tiny untrained MLLM-HWSI (the timing does
not depend on the weights); with --job and no --model, an assistant that answers instantly (server overhead
only). Results print as a table and are written as JSON to
benchmarks/out/serve.json.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q)) * 1000.0


class _InstantSession:
    def ask(self, question: str, max_new_tokens: int = 128) -> Iterator[str]:
        yield from (" " + w for w in question.split())

    def evidence(self, question: str, answer: str):  # -> EvidenceResult
        from hwsi.serve.assistant import EvidenceResult

        return EvidenceResult(np.zeros((0, 0), np.float32), [], "none")


class InstantAssistant:
    """Answers by echoing instantly: measures the server's own streaming latency, not a model."""

    name = "instant-echo (no model)"

    def start(self, slide_id: str) -> _InstantSession:
        return _InstantSession()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--job", type=Path, help="job folder (default: a synthetic slide in a temp folder)")
    ap.add_argument("--slide", help="slide id (default: the first)")
    ap.add_argument("--model", type=Path, help="model folder for the time-to-first-token measurement")
    ap.add_argument("--width", type=int, default=8192, help="synthetic slide width (height = 3/4)")
    ap.add_argument("--tiles", type=int, default=120, help="tiles per measurement")
    ap.add_argument("--questions", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "out" / "serve.json")
    args = ap.parse_args(argv)

    from hwsi.serve.app import create_app
    from hwsi.serve.commands import load_assistant
    from hwsi.serve.server import BackgroundServer

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the synthetic job is a test fixture
    from synthetic_store import make_synthetic_job

    tmp = tempfile.TemporaryDirectory(prefix="hwsi-bench-serve-")
    job = args.job
    if job is None:
        job = Path(tmp.name)
        t0 = time.perf_counter()
        make_synthetic_job(job, "bench", width=args.width, height=args.width * 3 // 4, region_size=512, patch_size=128)
        print(f"synthetic slide {args.width}x{args.width * 3 // 4} written in {time.perf_counter() - t0:.1f} s")
    if args.model:
        assistant = load_assistant(args.model, job)
    elif args.job is None:  # the real adapter + hwsi.model ChatSession over a tiny MLLM sized for the synthetic store
        from synthetic_store import tiny_model_assistant

        assistant = tiny_model_assistant(job, Path(tmp.name) / "llm")
    else:
        assistant = InstantAssistant()
    app = create_app(job, assistant)
    state = app.state.hwsi
    slide = args.slide or state.registry.ids()[0]
    results: dict[str, object] = {"job": str(job), "slide": slide, "assistant": assistant.name}
    with BackgroundServer(app) as srv, httpx.Client(base_url=srv.url, timeout=300) as http:
        info = http.get(f"/api/slides/{slide}").json()
        maxl = info["dzi_info"]["max_level"]
        g = state.source(slide).geometry
        rng = random.Random(0)
        tiles: list[tuple[int, int, int]] = []
        for level in range(max(0, maxl - 3), maxl + 1):  # the levels a viewer actually shows when zoomed in
            cols, rows = g.tile_grid(level)
            tiles += [(level, c, r) for c in range(cols) for r in range(rows)]
        rng.shuffle(tiles)
        tiles = tiles[: args.tiles]

        def fetch(t: tuple[int, int, int], headers: dict[str, str] | None = None) -> tuple[float, httpx.Response]:
            t0 = time.perf_counter()
            r = http.get(f"/api/slides/{slide}/image_files/{t[0]}/{t[1]}_{t[2]}.jpeg", headers=headers)
            return time.perf_counter() - t0, r

        fetch(tiles[0])  # open the slide (excluded from the numbers)
        state.cache.clear()
        cold, etags = [], []
        for t in tiles:
            dt, r = fetch(t)
            assert r.status_code == 200 and r.headers["x-tile-cache"] == "miss", r.status_code
            cold.append(dt)
            etags.append(r.headers["etag"])
        warm = []
        for t in tiles:
            dt, r = fetch(t)
            assert r.headers["x-tile-cache"] == "hit"
            warm.append(dt)
        reval = []
        for t, e in zip(tiles, etags):
            dt, r = fetch(t, {"If-None-Match": e})
            assert r.status_code == 304
            reval.append(dt)
        results["tiles"] = {
            name: {"n": len(xs), "p50_ms": round(pct(xs, 50), 2), "p95_ms": round(pct(xs, 95), 2)}
            for name, xs in (("cold", cold), ("warm", warm), ("revalidate_304", reval))
        }
        ttft, total = [], []
        qs = ["What is the diagnosis?", "Which regions show the tumour?", "What grade is it?"]
        for i in range(args.questions):
            sid = http.post("/api/chat", json={"slide_id": slide}).json()["session_id"]
            t0 = time.perf_counter()
            first = None
            with http.stream("POST", f"/api/chat/{sid}/ask", json={"question": qs[i % len(qs)]}) as r:
                for line in r.iter_lines():
                    if not line:
                        continue
                    ev = json.loads(line)
                    if ev["type"] == "token" and first is None:
                        first = time.perf_counter() - t0
                    if ev["type"] == "error":
                        print(f"chat error: {ev['message']}", file=sys.stderr)
            total.append(time.perf_counter() - t0)
            if first is not None:
                ttft.append(first)
        results["first_token"] = {
            "n": len(ttft),
            "note": "first question of a new chat (includes building the slide's visual prefix)",
            "p50_ms": round(pct(ttft, 50), 1) if ttft else None,
            "max_ms": round(max(ttft) * 1000, 1) if ttft else None,
            "answer_total_p50_ms": round(statistics.median(total) * 1000, 1),
        }
    print(f"slide {slide}: {g.width}x{g.height}, DZI max level {maxl}; assistant: {assistant.name}")
    print(f"{'tiles':<16}{'n':>5}{'p50 ms':>10}{'p95 ms':>10}")
    for name, v in results["tiles"].items():  # type: ignore[union-attr]
        print(f"{name:<16}{v['n']:>5}{v['p50_ms']:>10.2f}{v['p95_ms']:>10.2f}")
    ft = results["first_token"]
    print(f"time to first token: p50 {ft['p50_ms']} ms, max {ft['max_ms']} ms over {ft['n']} chats "  # type: ignore[index]
          f"(whole answer p50 {ft['answer_total_p50_ms']} ms)")  # type: ignore[index]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
