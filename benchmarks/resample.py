"""Benchmark of resampled region reads: the decode floor vs the previous path vs the strip path vs DCT-scaled decoding.

    .venv/bin/python benchmarks/resample.py [--side 16384] [--threads 1 2] [--repeats 3] [--content real|svs|synthetic]

Writes two slides once into benchmarks/out/ (git-ignored), levels 4× apart (as most 40× scanners write them):

Content (``--content``): ``real`` (default) tiles the level 0 of ../shared/data/slides/cmu-1-small-region.svs (a real
H&E scan), re-encoded by hwsi.synth.pyramid.write_pyramid_tiff (YCbCr 4:2:0, quality 90, 256-px tiles, ≈ 14 kB a
tile) and thinned to every other level (the JPEG tiles are copied, not re-encoded); ``svs`` writes the SVS's own
level-0 JPEG tiles byte for byte (Aperio's RGB-coded JPEG with JPEGTables, 240-px tiles, ≈ 10 kB a tile) repeated
over the plane, with levels 4× and 16× down re-encoded; ``synthetic`` is decompose.py's noise texture (~31 kB a
tile: entropy decoding dominates and DCT scaling saves little).

* ``resample_<content>_0.2631_<side>.tiff``: 0.2631 µm/px, read at 0.5 µm/px: scale 1.900, a non-power-of-two
  factor, read from level 0 and resampled (strips);
* ``resample_<content>_0.25_<side>.tiff``: 0.25 µm/px, read at 0.5 µm/px: scale 2, read from level 0 (level 1 is
  4× down): DCT-scaled at 1/2 by default.

For each slide and thread count, interleaved within each of ``--repeats`` rounds (the machine is shared: compare
ratios within one run), every tissue region of the grid (4096-px regions, 256-px patches) is read once into its
``RegionPixels.patches``:

(floor)  decoding, once each, the level-0 JPEG tiles the regions cover with imagecodecs (one task per region, into a
         reused tile buffer; decompose.py's floor), nothing else;
(old)    ``ReaderConfig(resample="box", dct_scale=False)``: the previous path (whole level box assembled, one
         cv2.resize, then the copy into patches);
(strip0) ``ReaderConfig(dct_scale=False, fast_upsample=False)``: tiles decoded once (imagecodecs), a tile row at a
         time into a strip, smoothed and resampled into the region's patch buffer;
(strip)  ``ReaderConfig(dct_scale=False)``: the same with the full-size decodes of the 1.9 strips by simplejpeg with
         fast chroma upsampling (integer ratios, e.g. the 0.25 slide here, stay exact: imagecodecs + INTER_AREA);
(dct)    ``ReaderConfig()`` (the default): where the downsample from the read level is within the µm/px tolerance
         of 2 or 4, tiles are decoded at 1/2 or 1/4 in the DCT domain (simplejpeg) straight into the patch buffer
         (0.25 slide); elsewhere the same as (strip).
Each is timed as elapsed (wall) and as the process's CPU time (all threads; steadier when other jobs share the
cores). The tables show medians and the per-round ratios' medians, and ("min" rows) the fastest round of each and
their ratios (the least disturbed by other jobs); configs run in a rotating order. Targets: strip/floor <= 1.3 on the 0.2631 slide,
dct/floor <= 0.75 on the 0.25 slide.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decompose import OUT, make_tile_fn, run_floor  # noqa: E402


def thin_levels(src: Path, dst: Path) -> None:
    """Copy levels 0, 2, 4, ... of a write_pyramid_tiff pyramid into ``dst`` (levels 4× apart), tiles unchanged."""
    import tifffile

    from hwsi.utils.atomic import atomic_path

    with tifffile.TiffFile(src) as tf, atomic_path(dst) as tmp:
        fh = tf.filehandle
        with tifffile.TiffWriter(tmp, bigtiff=True) as tw:
            for k, page in enumerate(tf.pages[::2]):

                def tiles(pg=page):
                    for off, n in zip(pg.dataoffsets, pg.databytecounts):
                        fh.seek(off)
                        yield fh.read(n)

                xres = page.tags["XResolution"].value
                tw.write(tiles(), shape=page.shape, dtype=np.uint8, tile=(page.tilelength, page.tilewidth),
                         photometric="rgb", compression="jpeg", jpegtables=page.jpegtables,
                         resolution=(xres[0] / xres[1], xres[0] / xres[1]), resolutionunit="CENTIMETER",
                         subfiletype=0 if k == 0 else 1, metadata=None)


def real_svs() -> Path:
    """../shared/data/slides/cmu-1-small-region.svs (a real H&E scan), found as the tests find it."""
    here = Path(__file__).resolve().parents[1]
    env = os.environ.get("HWSI_SHARED_DATA")
    for d in ([Path(env)] if env else []) + [here.parent / "shared" / "data", here.parent.parent / "shared" / "data"]:
        f = d / "slides" / "cmu-1-small-region.svs"
        if f.is_file():
            return f
    sys.exit("--content real/svs needs ../shared/data/slides/cmu-1-small-region.svs (or use --content synthetic)")


def write_svs_tiles(dst: Path, side: int, mpp: float) -> None:
    """A ``side``² slide whose level-0 tiles are the real SVS's own JPEG tiles, byte for byte (RGB-coded, 240 px,
    its JPEGTables), its full tiles repeated over the plane; levels 4× and 16× down re-encoded from those pixels."""
    import cv2
    import tifffile

    from hwsi.utils.atomic import atomic_path

    with tifffile.TiffFile(real_svs()) as tf:
        page = tf.pages[0]
        ts, fh = page.tilewidth, tf.filehandle
        ntx, nty = page.imagewidth // ts, page.imagelength // ts  # full tiles only (the edge ones are padded)
        across = -(-page.imagewidth // ts)
        raw = []
        for ty in range(nty):
            for tx in range(ntx):
                i = ty * across + tx
                fh.seek(page.dataoffsets[i])
                raw.append(fh.read(page.databytecounts[i]))
        img = page.asarray()[: nty * ts, : ntx * ts]
        tables = page.jpegtables
    n = -(-side // ts)
    mosaic = np.tile(img, (-(-side // img.shape[0]), -(-side // img.shape[1]), 1))[:side, :side]
    res = 1e4 / mpp  # px per cm
    with atomic_path(dst) as tmp, tifffile.TiffWriter(tmp, bigtiff=True) as tw:
        tiles = (raw[(ty % nty) * ntx + tx % ntx] for ty in range(n) for tx in range(n))
        tw.write(tiles, shape=(side, side, 3), dtype=np.uint8, tile=(ts, ts), photometric="rgb", compression="jpeg",
                 jpegtables=tables, resolution=(res, res), resolutionunit="CENTIMETER", subfiletype=0, metadata=None)
        for k in (4, 16):
            low = cv2.resize(mosaic, (side // k, side // k), interpolation=cv2.INTER_AREA)
            tw.write(low, tile=(256, 256), photometric="rgb", compression="jpeg", compressionargs={"level": 90},
                     resolution=(res / k, res / k), resolutionunit="CENTIMETER", subfiletype=1, metadata=None)


def real_tile_fn():
    """Level-0 pixels of the real SVS, repeated (mirrored) over the plane."""
    import tifffile

    img = tifffile.imread(real_svs())
    img = np.concatenate([img, img[:, ::-1]], 1)
    img = np.concatenate([img, img[::-1]], 0)
    ih, iw = img.shape[:2]

    def tile_fn(x0: int, y0: int, w: int, h: int) -> np.ndarray:
        yy = (np.arange(y0, y0 + h) % ih)[:, None]
        xx = (np.arange(x0, x0 + w) % iw)[None, :]
        return img[yy, xx]

    return tile_fn


def ensure_slide(mpp: float, side: int, content: str) -> Path:
    from hwsi.synth.pyramid import write_pyramid_tiff

    out = OUT / f"resample_{content}_{mpp:g}_{side}.tiff"
    if not out.exists() and content == "svs":
        OUT.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        write_svs_tiles(out, side, mpp)
        print(f"wrote {out.name} in {time.perf_counter() - t0:.1f} s", flush=True)
    elif not out.exists():
        OUT.mkdir(parents=True, exist_ok=True)
        tmp = OUT / f"resample_{content}_{mpp:g}_{side}.2x.tiff"
        t0 = time.perf_counter()
        fn = real_tile_fn() if content == "real" else make_tile_fn(side, side)
        write_pyramid_tiff(tmp, side, side, mpp, fn, threads=2)
        thin_levels(tmp, out)
        tmp.unlink()
        print(f"wrote {out.name} in {time.perf_counter() - t0:.1f} s", flush=True)
    return out


def run_read(path: Path, threads: int, cfg) -> dict[str, float]:
    """Every tissue region read once into its patches (the grid is built beforehand, not timed)."""
    from hwsi.slide import GridConfig, build_grid, compute_tissue, iter_regions, open_slide

    with open_slide(path) as s:
        t = compute_tissue(s, patch_size_level0=256)
        g = build_grid(s, t.mask, t.downsample, GridConfig())
        t0, c0 = time.perf_counter(), time.process_time()
        n = 0
        for rp in iter_regions(s, g, cfg, threads=threads):
            n += rp.patches.shape[0]
        dt, dc = time.perf_counter() - t0, time.process_time() - c0
    return {"seconds": dt, "cpu": dc, "patches": n}


def grid_of(path: Path):
    from hwsi.slide import GridConfig, build_grid, compute_tissue, open_slide

    with open_slide(path) as s:
        t = compute_tissue(s, patch_size_level0=256)
        return build_grid(s, t.mask, t.downsample, GridConfig())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--side", type=int, default=16384)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--mpps", type=float, nargs="+", default=[0.2631, 0.25])
    ap.add_argument("--content", choices=["real", "svs", "synthetic"], default="real")
    args = ap.parse_args()

    import cv2

    from hwsi.slide import ReaderConfig

    cv2.setNumThreads(1)  # resizes run on the reader's threads only: the thread count compared is the real one
    configs = {"old": ReaderConfig(resample="box", dct_scale=False),
               "strip0": ReaderConfig(dct_scale=False, fast_upsample=False), "strip": ReaderConfig(dct_scale=False),
               "dct": ReaderConfig()}
    slides = {m: ensure_slide(m, args.side, args.content) for m in args.mpps}
    grids = {m: grid_of(p) for m, p in slides.items()}
    for m, g in grids.items():
        print(f"{args.content} slide {args.side}² @{m:g} µm/px -> 0.5: scale {g.scale:.4f}, read level {g.read_level}, "
              f"{g.n_regions} tissue regions", flush=True)
    names = ["floor", *configs]
    runs: dict[tuple[str, float, int, str], list[float]] = {}  # (wall | cpu, µm/px, threads, name)
    for rep in range(args.repeats):
        for m, path in slides.items():
            g = grids[m]
            for th in args.threads:
                c0 = time.process_time()
                res = {"floor": run_floor(path, th, g.region_coords, int(np.ceil(g.region_size_level0)) + 255)}
                res["floor"]["cpu"] = time.process_time() - c0  # (includes its few ms of setup)
                order = list(configs)
                order = order[rep % len(order):] + order[: rep % len(order)]  # rotate: no config always last
                for name in order:
                    res[name] = run_read(path, th, configs[name])
                for k, v in res.items():
                    runs.setdefault(("wall", m, th, k), []).append(v["seconds"])
                    runs.setdefault(("cpu", m, th, k), []).append(v["cpu"])
                print(f"round {rep + 1} {m:g} µm/px threads={th}: "
                      + ", ".join(f"{k} {res[k]['seconds']:.2f}s (cpu {res[k]['cpu']:.2f}s)" for k in names),
                      flush=True)

    print(f"\nmedians of {args.repeats} rounds (load average at the end: "
          f"{', '.join(f'{x:.1f}' for x in os.getloadavg())}); wall = elapsed time, cpu = the process's CPU time "
          "(all its threads): on a shared machine cpu ratios are the steadier measure of work\n")
    for kind in ("wall", "cpu"):
        print(f"| {kind} | slide µm/px | threads | regions | " + " | ".join(f"{k} s" for k in names) + " | "
              + " | ".join(f"{k}/floor" for k in configs) + " |")
        print("|---" * (4 + len(names) + len(configs)) + "|")
        for m in slides:
            for th in args.threads:
                t = {k: runs[(kind, m, th, k)] for k in names}
                med = {k: statistics.median(t[k]) for k in names}
                ratio = {k: statistics.median(a / b for a, b in zip(t[k], t["floor"])) for k in configs}
                print(f"| {kind} | {m:g} | {th} | {grids[m].n_regions} | " + " | ".join(f"{med[k]:.2f}" for k in names)
                      + " | " + " | ".join(f"{ratio[k]:.2f}x" for k in configs) + " |")
                print(f"| {kind} min | {m:g} | {th} | {grids[m].n_regions} | "
                      + " | ".join(f"{min(t[k]):.2f}" for k in names) + " | "
                      + " | ".join(f"{min(t[k]) / min(t['floor']):.2f}x" for k in configs) + " |")
        print()

if __name__ == "__main__":
    main()
