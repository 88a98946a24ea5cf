"""Benchmark of DZI tile rendering: hwsi's own tiles (hwsi.serve.dzi.TileSource.tile) vs openslide-python's
``openslide.deepzoom.DeepZoomGenerator``, side by side in one run, each tile JPEG-encoded the same way (what a tile
request costs before the server's LRU cache of encoded tiles, identical for both paths, takes over).

    nice -n 5 .venv/bin/python benchmarks/tiles.py                 # the three cases below
    nice -n 5 .venv/bin/python benchmarks/tiles.py --width 8192     # smaller synthetic slides

Cases: (a) a synthetic pyramid with 2x steps (levels 1, 2, 4, ...), (b) the same slide with 4x steps (1, 4, 16),
both written by hwsi.synth.pyramid.write_pyramid_tiff, (c) a real single-level SVS: ``--svs PATH``, else
../shared/data/slides/cmu-1-small-region.svs beside the checkout (or under $HWSI_SHARED_DATA; skipped where absent). Per DZI level, the same random tiles
(at most 40, seed 0) are rendered by both paths, alternating which goes first (OpenSlide's tile cache is shared
by the handles of one process): cold = first render of each tile by a freshly opened slide
(OpenSlide's and hwsi's caches empty; hwsi's overview is built by the first coarse tile that needs it, inside the
timing), warm = the same tiles again on the same open slide. The file is in the OS page cache for both (written
or read just before). Geometry is identical (tile 256, overlap 0, limit_bounds off): the test suite checks it.
Prints a table of p50/p95 ms, the route hwsi's server takes for the level (``TileSource.route``: ``openslide`` =
it hands the tile to DeepZoomGenerator itself, so that row's ratio is ~1 by construction) and the ratio
hwsi / openslide (> 1: openslide's generator is faster); JSON in benchmarks/out/tiles.json.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image



def default_svs() -> Path | None:
    """The shared real SVS, found as benchmarks/resample.py finds it ($HWSI_SHARED_DATA, then ../shared/data)."""
    here = Path(__file__).resolve().parents[1]
    env = os.environ.get("HWSI_SHARED_DATA")
    for d in ([Path(env)] if env else []) + [here.parent / "shared" / "data", here.parent.parent / "shared" / "data"]:
        f = d / "slides" / "cmu-1-small-region.svs"
        if f.is_file():
            return f
    return None

TILE = 256


def texture_tile_fn(seed: int = 0) -> Callable[[int, int, int, int], np.ndarray]:
    """H&E-like pink/purple texture with dark dots (JPEG cost like tissue; a flat image would flatter both)."""
    rng = np.random.default_rng(seed)
    side = 1024
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32)
    base = 0.5 + 0.25 * np.sin(xx / 37.0) * np.cos(yy / 53.0) + 0.1 * rng.standard_normal((side, side))
    dots = rng.random((side, side)) > 0.997
    from scipy.ndimage import binary_dilation

    dots = binary_dilation(dots, iterations=3)
    img = np.stack([230 - 40 * base, 170 - 70 * base, 210 - 30 * base], -1)
    img[dots] = (80, 40, 120)
    tex = np.clip(img, 0, 255).astype(np.uint8)

    def fn(x0: int, y0: int, w: int, h: int) -> np.ndarray:
        ys = (np.arange(y0, y0 + h) * 7 // 5) % side
        xs = (np.arange(x0, x0 + w) * 3 // 2) % side
        return tex[ys][:, xs]

    return fn


def encode_jpeg(img: Any) -> bytes:
    buf = io.BytesIO()
    (img if isinstance(img, Image.Image) else Image.fromarray(img)).convert("RGB").save(buf, "JPEG", quality=85)
    return buf.getvalue()


def pick_tiles(cols: int, rows: int, n: int, rng: random.Random) -> list[tuple[int, int]]:
    allt = [(c, r) for r in range(rows) for c in range(cols)]
    return allt if len(allt) <= n else rng.sample(allt, n)


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q)) * 1000.0


def run_case(name: str, path: Path, n_tiles: int, min_level: int | None) -> list[dict[str, Any]]:
    import openslide
    from openslide.deepzoom import DeepZoomGenerator

    from hwsi.serve.dzi import DziGeometry, TileSource, open_reader

    reader = open_reader(path, mpp=0.5)
    hw = TileSource(name, reader, TILE, 0)
    osr = openslide.OpenSlide(str(path))
    dz = DeepZoomGenerator(osr, tile_size=TILE, overlap=0, limit_bounds=False)
    g: DziGeometry = hw.geometry
    assert dz.level_count == g.max_level + 1
    # from the coarsest level holding the whole slide in one tile (finer levels are where the work is)
    first = min_level if min_level is not None else max(0, g.max_level - int(np.ceil(np.log2(max(g.width, g.height) / TILE))))
    levels = list(range(first, g.max_level + 1))
    rng = random.Random(0)
    sets = {L: pick_tiles(*g.tile_grid(L), n_tiles, rng) for L in levels}
    times: dict[tuple[str, str, int], list[float]] = {}
    for phase in ("cold", "warm"):
        for L in levels:
            for i, (c, r) in enumerate(sets[L]):
                # alternate who reads a tile first: OpenSlide's tile cache is shared by the handles of a process,
                # so the second reader of a tile may find it decoded already
                order = ("hwsi", "openslide") if i % 2 == 0 else ("openslide", "hwsi")
                for who in order:
                    t0 = time.perf_counter()
                    encode_jpeg(hw.tile(L, c, r) if who == "hwsi" else dz.get_tile(L, (c, r)))
                    times.setdefault((who, phase, L), []).append(time.perf_counter() - t0)
    rows = []
    ds_levels = [float(d) for d in reader.level_downsamples]
    for L in levels:
        row: dict[str, Any] = {"case": name, "level": L, "downsample": g.downsample(L), "tiles": len(sets[L]),
                               "slide_level": hw._best_level(g.downsample(L)), "route": hw.route(L),
                               "slide_downsamples": ds_levels}
        for phase in ("cold", "warm"):
            for who in ("hwsi", "openslide"):
                xs = times[(who, phase, L)]
                row[f"{who}_{phase}_p50"] = pct(xs, 50)
                row[f"{who}_{phase}_p95"] = pct(xs, 95)
            row[f"ratio_{phase}_p50"] = row[f"hwsi_{phase}_p50"] / max(row[f"openslide_{phase}_p50"], 1e-9)
        rows.append(row)
    hw.close()
    osr.close()
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--width", type=int, default=16384, help="synthetic slide width (height = 3/4)")
    ap.add_argument("--tiles", type=int, default=40, help="random tiles per level")
    ap.add_argument("--svs", type=Path, default=None, help="a single-level SVS for case (c) (default: the shared one)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/out/tiles.json"))
    args = ap.parse_args(argv)
    from hwsi.synth.pyramid import write_pyramid_tiff

    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="hwsi-tiles-") as tmp:
        w, h = args.width, args.width * 3 // 4
        fn = texture_tile_fn()
        for step, name in ((2, "pyramid-2x"), (4, "pyramid-4x")):
            p = Path(tmp) / f"{name}.tiff"
            info = write_pyramid_tiff(p, w, h, 0.5, fn, level_step=step)  # type: ignore[arg-type]
            print(f"{name}: {w}x{h}, levels {info.level_dimensions}", file=sys.stderr)
            rows += run_case(name, p, args.tiles, None)
        svs = args.svs or default_svs()
        if svs is not None and svs.is_file():
            rows += run_case("svs-1-level", svs, args.tiles, None)
        else:
            print(f"skipped the single-level SVS: {svs or 'cmu-1-small-region.svs'} not found", file=sys.stderr)
    hdr = (f"{'case':<12} {'L':>2} {'ds':>5} {'n':>3} {'route':>9} | {'cold p50/p95 hwsi':>18} {'openslide':>13} {'ratio':>5} | "
           f"{'warm p50/p95 hwsi':>18} {'openslide':>13} {'ratio':>5}")
    print(hdr)
    for r in rows:
        print(f"{r['case']:<12} {r['level']:>2} {r['downsample']:>5} {r['tiles']:>3} {r['route']:>9} | "
              f"{r['hwsi_cold_p50']:>8.1f}/{r['hwsi_cold_p95']:<9.1f} {r['openslide_cold_p50']:>6.1f}/"
              f"{r['openslide_cold_p95']:<6.1f} {r['ratio_cold_p50']:>5.2f} | "
              f"{r['hwsi_warm_p50']:>8.1f}/{r['hwsi_warm_p95']:<9.1f} {r['openslide_warm_p50']:>6.1f}/"
              f"{r['openslide_warm_p95']:<6.1f} {r['ratio_warm_p50']:>5.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rows": rows, "load": os.getloadavg()}, indent=1))
    print(f"load average: {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
