"""Benchmark of slide decomposition: hwsi vs the decode floor vs per-patch OpenSlide reads, and peak RSS.

    .venv/bin/python benchmarks/decompose.py [--side 40960] [--threads 1 2] [--rss-sides 20480 81920]

Writes synthetic slides at 0.5 µm/px once into benchmarks/out/ (git-ignored) with hwsi.synth.pyramid and a fast
tile_fn (a few pre-rendered textured tiles inside an elliptical tissue area, white glass outside), then measures,
with the same thread counts:

(a) hwsi: tissue mask + grid (4096-px regions, 256-px patches) + reading every tissue region once and slicing all
    its patches (``RegionPixels.patches``, a contiguous (G, P, P, 3) copy) — patches/s;
(b) the decode floor: decoding the same level-0 JPEG tiles of the same regions with imagecodecs, nothing else;
(c) the CLAM/TRIDENT way: one OpenSlide ``read_region`` per tissue patch (shared handle, RGBA -> RGB), on a
    subset of patches (rate extrapolated);
and the peak RSS of (a) run in a fresh subprocess for a small and a large slide.
Targets: (a) within 1.3x of (b); (a) >= 3x faster than (c); RSS(large) <= 1.2x RSS(small).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parent / "out"


def make_tile_fn(width: int, height: int):
    """Fast deterministic content: 8 pre-rendered H&E-like textures, an ellipse of tissue on white glass."""
    import cv2

    rng = np.random.default_rng(0)
    textures = []
    for _ in range(8):
        noise = rng.normal(0, 1, (256, 256, 3)).astype(np.float32)
        noise = cv2.GaussianBlur(noise, (0, 0), 2.0)
        base = np.array([205, 120, 175], np.float32)
        t = base + 40 * noise / noise.std()
        nuclei = rng.random((256, 256)) < 0.004
        nuclei = cv2.dilate(nuclei.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)
        t[nuclei] = (90, 60, 150)
        textures.append(t.clip(0, 255).astype(np.uint8))
    cx, cy, rx, ry = width / 2, height / 2, width * 0.48, height * 0.45

    def tile_fn(x0: int, y0: int, w: int, h: int) -> np.ndarray:
        t = textures[((x0 // 256) * 7 + (y0 // 256) * 13) % 8][:h, :w].copy()
        yy, xx = np.ogrid[y0 : y0 + h, x0 : x0 + w]
        outside = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 > 1
        t[np.broadcast_to(outside, (h, w))] = 243
        return t

    return tile_fn


def ensure_slide(side: int, threads: int) -> Path:
    from hwsi.synth.pyramid import write_pyramid_tiff

    p = OUT / f"synth_{side}.tiff"
    if not p.exists():
        OUT.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        info = write_pyramid_tiff(p, side, side, 0.5, make_tile_fn(side, side), threads=threads)
        print(f"wrote {p.name}: {info.level_dimensions[0]} {info.level_count} levels, "
              f"{p.stat().st_size / 1e6:.0f} MB in {time.perf_counter() - t0:.1f} s", flush=True)
    return p


def run_hwsi(path: Path, threads: int) -> dict[str, float]:
    """(a): tissue + grid + every tissue region read once + all patches sliced."""
    from hwsi.slide import GridConfig, build_grid, compute_tissue, iter_regions, open_slide

    t0 = time.perf_counter()
    with open_slide(path) as s:
        cfg = GridConfig()
        tissue = compute_tissue(s, patch_size_level0=cfg.patch_size, threads=threads)
        grid = build_grid(s, tissue.mask, tissue.downsample, cfg)
        t1 = time.perf_counter()
        n = 0
        for rp in iter_regions(s, grid, threads=threads):
            n += rp.patches.shape[0]
    t2 = time.perf_counter()
    return {"patches": n, "regions": grid.n_regions, "seconds": t2 - t0, "read_seconds": t2 - t1,
            "tissue_grid_seconds": t1 - t0, "tissue_patches": int(grid.patch_tissue.sum())}


def run_floor(path: Path, threads: int, region_coords: np.ndarray, region_l0: int) -> dict[str, float]:
    """(b): decode the level-0 JPEG tiles covering the same regions with imagecodecs (no assembly)."""
    import imagecodecs
    import tifffile

    with tifffile.TiffFile(path) as tf:
        page = tf.pages[0]
        offsets, counts = np.asarray(page.dataoffsets), np.asarray(page.databytecounts)
        tw, ntx = page.tilewidth, -(-page.imagewidth // page.tilewidth)
        tables = page.jpegtables
    idx: list[int] = []
    for x, y in region_coords:
        for ty in range(y // tw, (y + region_l0) // tw):
            for tx in range(x // tw, (x + region_l0) // tw):
                if tx < ntx and ty * ntx + tx < len(offsets):
                    idx.append(ty * ntx + tx)
    fd = os.open(path, os.O_RDONLY)

    def dec(i: int) -> int:
        data = os.pread(fd, int(counts[i]), int(offsets[i]))
        return imagecodecs.jpeg8_decode(data, tables=tables).shape[0]

    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        for _ in pool.map(dec, idx, chunksize=64):
            pass
    dt = time.perf_counter() - t0
    os.close(fd)
    return {"tiles": len(idx), "seconds": dt}


def run_read_region(path: Path, threads: int, patch_coords: np.ndarray, limit: int) -> dict[str, float]:
    """(c): one OpenSlide read_region per tissue patch, as CLAM/TRIDENT read (subset of ``limit`` patches)."""
    import openslide

    s = openslide.OpenSlide(str(path))
    coords = patch_coords[:limit]

    def rd(c: np.ndarray) -> int:
        return np.asarray(s.read_region((int(c[0]), int(c[1])), 0, (256, 256)).convert("RGB")).shape[0]

    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        for _ in pool.map(rd, coords, chunksize=16):
            pass
    dt = time.perf_counter() - t0
    s.close()
    return {"patches": len(coords), "seconds": dt}


def rss_child(path: str, threads: int) -> None:
    r = run_hwsi(Path(path), threads)
    r["maxrss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(r))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--side", type=int, default=40960)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rss-sides", type=int, nargs="*", default=[20480, 81920])
    ap.add_argument("--baseline-patches", type=int, default=3000)
    ap.add_argument("--rss-child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rss_child:
        rss_child(args.rss_child, args.threads[0])
        return

    from hwsi.slide import GridConfig, build_grid, compute_tissue, open_slide

    path = ensure_slide(args.side, max(args.threads))
    with open_slide(path) as s:
        t = compute_tissue(s, patch_size_level0=256)
        g = build_grid(s, t.mask, t.downsample, GridConfig())
    tissue_patch_coords = g.patch_coords[g.patch_tissue]
    rng = np.random.default_rng(0)
    sub = tissue_patch_coords[rng.permutation(len(tissue_patch_coords))]
    print(f"slide {args.side}² @0.5 µm/px: {g.n_regions} tissue regions, {g.n_regions * 256} patches sliced, "
          f"{len(tissue_patch_coords)} tissue patches", flush=True)
    rows = []
    for th in args.threads:
        a = run_hwsi(path, th)
        b = run_floor(path, th, g.region_coords, 4096)
        c = run_read_region(path, th, sub, args.baseline_patches)
        a_rate = a["patches"] / a["seconds"]
        b_rate = a["patches"] / b["seconds"]  # same patches, floor time
        c_rate = c["patches"] / c["seconds"]
        rows.append((th, a_rate, a["seconds"], a["tissue_grid_seconds"], b_rate, b["seconds"], c_rate,
                     a["seconds"] / b["seconds"], a_rate / c_rate))
        print(f"threads={th}: hwsi {a['seconds']:.2f}s (tissue+grid {a['tissue_grid_seconds']:.2f}s), "
              f"floor {b['seconds']:.2f}s, read_region {c['patches']} patches {c['seconds']:.2f}s", flush=True)
    print("\n| threads | (a) hwsi patches/s | (a) s | of which tissue+grid s | (b) floor patches/s | (b) s "
          "| (c) read_region patches/s | (a)/(b) time | (a)/(c) speed |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]:.0f} | {r[2]:.2f} | {r[3]:.2f} | {r[4]:.0f} | {r[5]:.2f} | {r[6]:.0f} "
              f"| {r[7]:.2f}x | {r[8]:.2f}x |")
    if args.rss_sides:
        print("\n| slide | regions | peak RSS MB | seconds |")
        print("|---|---|---|---|")
        rss = []
        for side in args.rss_sides:
            p = ensure_slide(side, max(args.threads))
            out = subprocess.run([sys.executable, __file__, "--rss-child", str(p), "--threads", str(max(args.threads))],
                                 check=True, capture_output=True, text=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            rss.append(r["maxrss_mb"])
            print(f"| {side}² | {r['regions']} | {r['maxrss_mb']:.0f} | {r['seconds']:.1f} |", flush=True)
        if len(rss) >= 2:
            print(f"\nRSS ratio largest/smallest: {rss[-1] / rss[0]:.2f}x (target <= 1.2x)")


if __name__ == "__main__":
    main()
