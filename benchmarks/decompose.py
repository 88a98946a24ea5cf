"""Benchmark of slide decomposition: hwsi vs the decode floor vs per-patch OpenSlide reads, and peak RSS.

    .venv/bin/python benchmarks/decompose.py [--side 40960] [--threads 1 2] [--repeats 3] [--rss-sides 20480 81920]

Writes synthetic slides at 0.5 µm/px once into benchmarks/out/ (git-ignored) with hwsi.synth.pyramid and a fast
tile_fn (a few pre-rendered textured tiles inside an elliptical tissue area, white glass outside), then measures,
with the same thread counts:

(a) hwsi: tissue mask + grid (4096-px regions, 256-px patches) + reading every tissue region once into its
    contiguous (G, P, P, 3) ``RegionPixels.patches`` (direct path: JPEG tiles decoded into their patch slots,
    pooled buffers) — patches/s;
(a0) the same with ``ReaderConfig(direct_patches=False)``, the previous path (assemble the region image, then copy
    it into patches), for a side-by-side comparison;
(b) the decode floor: decoding the same level-0 JPEG tiles of the same regions with imagecodecs, nothing else
    (one task per region, into a reused tile buffer);
(c) the CLAM/TRIDENT way: one OpenSlide ``read_region`` per tissue patch (shared handle, RGBA -> RGB), on a
    subset of patches (rate extrapolated);
and the peak RSS of (a) run in a fresh subprocess for a small and a large slide.
(a), (a0), (b), (c) are interleaved within each of ``--repeats`` rounds and the table shows medians (the machine
is shared: compare within a run). ``cpu/wall`` is the process CPU time over the wall time of the read phase of (a):
about 2x the 1-thread value with 2 threads means the threads decode concurrently (imagecodecs releases the GIL),
whatever the machine's load.
Targets: (a) within 1.3x of (b); (a) >= 3x faster than (c); RSS(large) <= 1.2x RSS(small).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
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


def run_hwsi(path: Path, threads: int, direct: bool = True) -> dict[str, float]:
    """(a): tissue + grid + every tissue region read once into its (G, P, P, 3) patches ((a0) with direct=False)."""
    from hwsi.slide import GridConfig, ReaderConfig, build_grid, compute_tissue, iter_regions, open_slide

    t0 = time.perf_counter()
    with open_slide(path) as s:
        cfg = GridConfig()
        tissue = compute_tissue(s, patch_size_level0=cfg.patch_size, threads=threads)
        grid = build_grid(s, tissue.mask, tissue.downsample, cfg)
        t1 = time.perf_counter()
        c1 = time.process_time()
        n = 0
        for rp in iter_regions(s, grid, ReaderConfig(direct_patches=direct), threads=threads):
            n += rp.patches.shape[0]
        c2 = time.process_time()
    t2 = time.perf_counter()
    return {"patches": n, "regions": grid.n_regions, "seconds": t2 - t0, "read_seconds": t2 - t1,
            "tissue_grid_seconds": t1 - t0, "tissue_patches": int(grid.patch_tissue.sum()),
            "cpu_per_wall": (c2 - c1) / (t2 - t1)}


def run_floor(path: Path, threads: int, region_coords: np.ndarray, region_l0: int) -> dict[str, float]:
    """(b): decode the level-0 JPEG tiles covering the same regions with imagecodecs (no assembly).

    One task per region (its tiles decoded in a plain loop, like hwsi's one task per region), the page's JPEG
    colour spaces (as hwsi.slide.open passes them), each thread decoding into one reused tile buffer: the least work
    that decodes these tiles. (A task per tile costs ~0.4–1 s of executor overhead on this slide, which once made
    this "floor" slower than hwsi.)
    """
    import threading

    import imagecodecs
    import tifffile

    with tifffile.TiffFile(path) as tf:
        page = tf.pages[0]
        offsets, counts = np.asarray(page.dataoffsets), np.asarray(page.databytecounts)
        tw, th, ntx = page.tilewidth, page.tilelength, -(-page.imagewidth // page.tilewidth)
        tables = page.jpegtables
        cs = tifffile.tifffile.jpeg_decode_colorspace(page.photometric, page.planarconfig, page.extrasamples,
                                                     page.is_jfif)
    per_region: list[list[int]] = []
    for x, y in region_coords:
        idx = []
        for ty in range(y // th, (y + region_l0) // th):
            for tx in range(x // tw, (x + region_l0) // tw):
                if tx < ntx and ty * ntx + tx < len(offsets):
                    idx.append(ty * ntx + tx)
        per_region.append(idx)
    fd = os.open(path, os.O_RDONLY)
    local = threading.local()

    def dec(idx: list[int]) -> int:
        out = getattr(local, "out", None)
        if out is None:
            out = local.out = np.empty((th, tw, 3), np.uint8)
        for i in idx:
            data = os.pread(fd, int(counts[i]), int(offsets[i]))
            imagecodecs.jpeg8_decode(data, tables=tables, colorspace=cs[0], outcolorspace=cs[1], out=out)
        return len(idx)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        n = sum(pool.map(dec, per_region))
    dt = time.perf_counter() - t0
    os.close(fd)
    return {"tiles": n, "seconds": dt}


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
    ap.add_argument("--repeats", type=int, default=3, help="interleaved rounds; the table shows medians")
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
    runs: dict[tuple[str, int], list[dict[str, float]]] = {}
    for rep in range(args.repeats):
        for th in args.threads:
            a = run_hwsi(path, th)
            a0 = run_hwsi(path, th, direct=False)
            b = run_floor(path, th, g.region_coords, 4096)
            c = run_read_region(path, th, sub, args.baseline_patches)
            for k, v in (("a", a), ("a0", a0), ("b", b), ("c", c)):
                runs.setdefault((k, th), []).append(v)
            print(f"round {rep + 1} threads={th}: hwsi {a['seconds']:.2f}s (tissue+grid {a['tissue_grid_seconds']:.2f}s, "
                  f"cpu/wall {a['cpu_per_wall']:.2f}), previous path {a0['seconds']:.2f}s, floor {b['seconds']:.2f}s, "
                  f"read_region {c['patches']} patches {c['seconds']:.2f}s", flush=True)

    def med(k: str, th: int, key: str) -> float:
        return statistics.median(r[key] for r in runs[(k, th)])

    print(f"\nmedians of {args.repeats} rounds (load average at the end: "
          f"{', '.join(f'{x:.1f}' for x in os.getloadavg())})")
    print("\n| threads | (a) hwsi patches/s | (a) s | of which tissue+grid s | (a) cpu/wall | (a0) previous s "
          "| (b) floor patches/s | (b) s | (c) read_region patches/s | (a)/(b) time | (a0)/(b) time | (a)/(c) speed |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    n_patches = runs[("a", args.threads[0])][0]["patches"]
    for th in args.threads:
        a_s, a0_s, b_s = med("a", th, "seconds"), med("a0", th, "seconds"), med("b", th, "seconds")
        c_rate = statistics.median(r["patches"] / r["seconds"] for r in runs[("c", th)])
        ratios_ab = [x["seconds"] / y["seconds"] for x, y in zip(runs[("a", th)], runs[("b", th)])]
        ratios_a0b = [x["seconds"] / y["seconds"] for x, y in zip(runs[("a0", th)], runs[("b", th)])]
        ratios_ac = [(x["patches"] / x["seconds"]) / (y["patches"] / y["seconds"])
                     for x, y in zip(runs[("a", th)], runs[("c", th)])]
        print(f"| {th} | {n_patches / a_s:.0f} | {a_s:.2f} | {med('a', th, 'tissue_grid_seconds'):.2f} "
              f"| {med('a', th, 'cpu_per_wall'):.2f} | {a0_s:.2f} | {n_patches / b_s:.0f} | {b_s:.2f} | {c_rate:.0f} "
              f"| {statistics.median(ratios_ab):.2f}x | {statistics.median(ratios_a0b):.2f}x "
              f"| {statistics.median(ratios_ac):.2f}x |")
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
