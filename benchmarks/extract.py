"""Throughput of `hwsi extract` on CPU: patches/s, nuclei/s, the time split read / encode / SPF / cells / write, and
peak RSS, so the bottleneck is visible.

    .venv/bin/python benchmarks/extract.py                    # 8192² SynthPath slide, 4096² regions, 256² patches
    .venv/bin/python benchmarks/extract.py --side 4096 --threads 1 --batch-size 128 --cells none

The slide is a SynthPath slide (hwsi.synth) at 0.5 µm/px written once into --work (default: $TMPDIR/hwsi-bench-extract, reused on later runs); it is
tiled with `hwsi tile` settings, then extracted with the default small patch encoder (hwsi_small_patch, random
weights unless --patch-encoder NAME:CKPT) and the built-in nucleus segmentation on the SPF-selected patches.
Model loading (MiniLM, encoder) is timed separately and excluded from the throughput.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path


def _peak_rss_mb() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 1024.0 if sys.platform != "darwin" else r / 2**20


def make_slide(work: Path, side: int, seed: int) -> Path:
    from hwsi.synth.cohort import write_slide
    from hwsi.synth.scene import SceneConfig

    path = work / "slides" / f"bench{side}.tiff"
    if not path.is_file():
        t = time.perf_counter()
        write_slide(work / "slides", SceneConfig(width=side, height=side, mpp=0.5, seed=seed), f"bench{side}",
                    threads=None)
        print(f"wrote {path} in {time.perf_counter() - t:.1f} s")
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "hwsi-bench-extract")
    ap.add_argument("--side", type=int, default=8192, help="slide side in level-0 px (0.5 µm/px)")
    ap.add_argument("--region-size", type=int, default=4096)
    ap.add_argument("--patch-size", type=int, default=256)
    ap.add_argument("--patch-encoder", default="hwsi_small_patch")
    ap.add_argument("--cells", default="builtin")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--n-div", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    from rich.console import Console
    from rich.table import Table

    from hwsi.features.extract import ExtractConfig, extract_slide, load_models
    from hwsi.slide import GridConfig, TileConfig, tile_batch
    from hwsi.store import list_stores

    args.work.mkdir(parents=True, exist_ok=True)
    slide = make_slide(args.work, args.side, args.seed)
    job = args.work / f"job{args.side}_{args.region_size}_{args.patch_size}"
    if job.exists():
        shutil.rmtree(job)
    t = time.perf_counter()
    grid = GridConfig(region_size=args.region_size, patch_size=args.patch_size)
    tile_batch(slide, job, TileConfig(grid=grid), show_progress=False)
    t_tile = time.perf_counter() - t
    cfg = ExtractConfig(patch_encoder=args.patch_encoder, cells=args.cells, batch_size=args.batch_size,
                        threads=args.threads, k=args.k, n_div=args.n_div)
    t = time.perf_counter()
    models = load_models(cfg, log=lambda m: None)
    t_models = time.perf_counter() - t
    (store,) = list_stores(job)
    tm = extract_slide(store, models, cfg, job=job)

    con = Console()
    tab = Table(title=f"hwsi extract on CPU: {args.side}² slide, {tm.n_regions} regions × "
                      f"{(args.region_size // args.patch_size) ** 2} patches, {tm.n_patches} tissue patches")
    tab.add_column("step")
    tab.add_column("seconds", justify="right")
    tab.add_column("share", justify="right")
    tab.add_column("rate", justify="right")
    steps = [("read (waiting for pixels)", tm.read, f"{tm.n_patches / max(tm.read, 1e-9):.0f} patches/s"),
             (f"encode ({args.patch_encoder})", tm.encode, f"{tm.n_patches / max(tm.encode, 1e-9):.0f} patches/s"),
             ("region input", tm.region_input, ""),
             ("SPF (Eq. 1-2)", tm.spf, f"{tm.n_regions / max(tm.spf, 1e-9):.0f} regions/s"),
             (f"cells ({args.cells}, {tm.n_selected} patches)", tm.cells,
              f"{tm.n_cells / max(tm.cells, 1e-9):.0f} nuclei/s"),
             ("write (+ store copy/rename)", tm.write, "")]
    other = tm.total - sum(s[1] for s in steps)
    for name, sec, rate in steps + [("other (open, copy, finish)", other, "")]:
        tab.add_row(name, f"{sec:.2f}", f"{100 * sec / max(tm.total, 1e-9):.0f}%", rate)
    tab.add_row("[bold]total[/]", f"{tm.total:.2f}", "100%",
                f"{tm.n_patches / tm.total:.1f} patches/s, {tm.n_cells / tm.total:.1f} nuclei/s")
    con.print(tab)
    con.print(f"tile: {t_tile:.1f} s; model load (excluded): {t_models:.1f} s; nuclei: {tm.n_cells}; "
              f"selected patches: {tm.n_selected}; peak RSS {_peak_rss_mb():.0f} MB; "
              f"batch {args.batch_size}, reader threads {args.threads}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
