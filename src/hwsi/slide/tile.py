"""`hwsi tile`: tissue + grid of each slide into ``JOB/stores/<slide_id>.h5`` (the first stage of every store).

Per slide: open (µm/px), tissue mask, region/patch grid; the store is written under a temporary name and renamed
when complete, with ``stages = ["tile"]``. It holds (hwsi.store schema) ``regions/coords``, ``regions/tissue``,
``patches/coords``, ``patches/tissue``, plus ``patches/tissue_fraction`` (R, G) float32, ``tissue/mask`` (uint8
0/1, attrs ``downsample``, ``mpp``, ``saturation_threshold``) and ``tissue/thumbnail`` (RGB uint8, attr
``downsample``) for the viewer.

Inputs: one slide file, a folder (its slide files, not recursive), or a CSV with a ``slide`` column and optional
``mpp`` column (paths relative to the CSV). ``JOB/slides.json`` maps slide_id -> source path, mpp, mpp_source.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hwsi.batch import BatchItem, BatchResult, run_batch
from hwsi import textio
from hwsi.errors import ConfigError, ConfigFileError, HwsiError
from hwsi.slide.grid import Grid, GridConfig
from hwsi.slide.open import SLIDE_SUFFIXES, open_slide, slide_id_for
from hwsi.slide.tissue import TissueConfig, TissueMask, compute_tissue
from hwsi.store import StoreMeta, has_stage, mark_stage, store_path, write_meta, write_region_dataset
from hwsi.utils.atomic import atomic_path, write_json_atomic

STAGE = "tile"


@dataclass
class SlideSpec:
    """One input slide: where it is, its id, and the µm/px the user gave (if any)."""

    path: Path
    slide_id: str
    mpp: float | None = None


@dataclass
class TileConfig:
    """Settings of `hwsi tile`."""

    grid: GridConfig = field(default_factory=GridConfig)
    tissue: TissueConfig = field(default_factory=TissueConfig)
    preview: bool = False
    threads: int = 2  # threads reading the low-resolution level for the tissue mask


def _unique_ids(paths_mpps: list[tuple[Path, float | None]]) -> list[SlideSpec]:
    seen: dict[str, int] = {}
    out: list[SlideSpec] = []
    for p, m in paths_mpps:
        base = slide_id_for(p)
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.append(SlideSpec(p, base if n == 0 else f"{base}-{n + 1}", m))
    return out


def _parse_mpp(v: str, where: str) -> float | None:
    v = (v or "").strip()
    if not v:
        return None
    try:
        m = float(v)
    except ValueError as exc:
        raise ConfigError(f"{where}: mpp {v!r} is not a number") from exc
    if not (math.isfinite(m) and m > 0):
        raise ConfigError(f"{where}: mpp must be a finite number > 0 (µm per pixel), got {v!r}")
    return m


def collect_slides(source: str | Path, mpp: float | None = None) -> list[SlideSpec]:
    """Slides named by ``source`` (file, folder or CSV ``slide[,mpp]``); ``mpp`` applies to all (CSV values win)."""
    src = Path(source)
    if not src.exists():
        raise HwsiError(f"{src}: no such file or folder")
    items: list[tuple[Path, float | None]] = []
    if src.suffix.lower() == ".csv" and not src.is_dir():
        header, rows = textio.read_csv(src, ConfigFileError)
        cols = [c.lower() for c in header]
        if "slide" not in cols:
            raise ConfigError(f"{src}: CSV needs a 'slide' column (and optionally 'mpp'); found {cols}")
        for n, raw in rows:
            row = {k.lower(): v for k, v in raw.items()}
            name = row["slide"]
            if not name:
                continue
            if "\0" in name:
                raise ConfigError(f"{src} (line {n}): slide path contains a NUL character")
            p = Path(name)
            p = p if p.is_absolute() else src.parent / p
            items.append((p, _parse_mpp(row.get("mpp", ""), f"{src} (line {n})") or mpp))
    elif src.is_dir() and src.suffix.lower() != ".mrxs":
        for p in sorted(src.iterdir()):
            if p.name.lower().endswith(SLIDE_SUFFIXES) and not p.name.startswith("."):
                items.append((p, mpp))
        if not items:
            raise HwsiError(f"{src}: no slide files ({', '.join(SLIDE_SUFFIXES)}) in this folder")
    else:
        if not src.is_file():
            raise HwsiError(f"{src}: not a regular file (a FIFO, socket or device); give a slide file or folder")
        items.append((src, mpp))
    return _unique_ids(items)


def write_tile_store(out: Path, slide_path: Path, slide_id: str, mpp_source: str, grid: Grid,
                     tissue: TissueMask) -> None:
    """Write the tile-stage store atomically."""
    import h5py

    meta = StoreMeta(
        slide_path=str(slide_path.resolve()),
        slide_id=slide_id,
        mpp_level0=grid.mpp_level0,
        target_mpp=grid.target_mpp,
        effective_mpp=grid.effective_mpp,
        region_size=grid.region_size,
        patch_size=grid.patch_size,
        region_size_level0=grid.region_size_level0,
        patch_size_level0=grid.patch_size_level0,
        level0_width=grid.level0_width,
        level0_height=grid.level0_height,
        read_level=grid.read_level,
        read_downsample=grid.read_downsample,
        mpp_source=mpp_source,
    )
    with atomic_path(out) as tmp, h5py.File(tmp, "w") as f:
        write_meta(f, meta)
        f.attrs["n_candidate_regions"] = grid.n_candidates
        write_region_dataset(f, "regions/coords", grid.region_coords.astype(np.int64))
        f.create_dataset("regions/tissue", data=grid.region_tissue.astype(np.float32))
        write_region_dataset(f, "patches/coords", grid.patch_coords.astype(np.int64))
        write_region_dataset(f, "patches/tissue", grid.patch_tissue.astype(bool))
        write_region_dataset(f, "patches/tissue_fraction", grid.patch_fraction.astype(np.float32))
        m = f.create_dataset("tissue/mask", data=tissue.mask.astype(np.uint8), compression="gzip")
        m.attrs["downsample"] = tissue.downsample
        m.attrs["mpp"] = tissue.mask_mpp
        m.attrs["saturation_threshold"] = tissue.saturation_threshold
        t = f.create_dataset("tissue/thumbnail", data=tissue.thumbnail, compression="gzip")
        t.attrs["downsample"] = tissue.thumbnail_downsample
        mark_stage(f, STAGE)


def tile_slide(spec: SlideSpec, job: str | Path, cfg: TileConfig | None = None) -> dict[str, Any]:
    """Tile one slide into its store in ``job``; returns a summary dict (regions, patches, mpp, ...)."""
    cfg = cfg or TileConfig()
    cfg.grid.validate()
    job = Path(job)
    from hwsi.slide.grid import build_grid, check_fits, resolution_plan

    with open_slide(spec.path, mpp=spec.mpp, slide_id=spec.slide_id) as slide:
        scale, _ = resolution_plan(str(slide.path), slide.mpp, cfg.grid)  # fail early if too coarse
        check_fits(slide, cfg.grid, scale)  # ... or if a patch is larger than the slide
        tissue = compute_tissue(slide, cfg.tissue, patch_size_level0=cfg.grid.patch_size * scale,
                                threads=cfg.threads)
        grid = build_grid(slide, tissue.mask, tissue.downsample, cfg.grid)
        write_tile_store(store_path(job, spec.slide_id), slide.path, spec.slide_id, slide.mpp_source, grid, tissue)
        if cfg.preview:
            from hwsi.slide.preview import save_preview

            save_preview(job / "previews" / f"{spec.slide_id}.png", tissue, grid)
        return {
            "regions": grid.n_regions,
            "patches": int(grid.patch_tissue.sum()),
            "mpp": round(slide.mpp, 4),
            "mpp_source": slide.mpp_source,
            "level": grid.read_level,
        }


def update_registry(job: Path, specs: list[SlideSpec], infos: dict[str, dict[str, Any]]) -> None:
    """Merge ``slides.json`` (slide_id -> source path, mpp, mpp_source) with the slides of this run."""
    reg_path = job / "slides.json"
    reg: dict[str, Any] = {}
    if reg_path.is_file():
        try:
            reg = json.loads(reg_path.read_text())
        except ValueError:
            reg = {}
    for s in specs:
        entry = reg.get(s.slide_id, {})
        entry["path"] = str(Path(s.path).resolve())
        if s.slide_id in infos:
            entry["mpp"] = infos[s.slide_id]["mpp"]
            entry["mpp_source"] = infos[s.slide_id]["mpp_source"]
        elif s.mpp is not None and "mpp" not in entry:
            entry["mpp"] = s.mpp
            entry["mpp_source"] = "user"
        reg[s.slide_id] = entry
    write_json_atomic(reg_path, reg)


def tile_batch(source: str | Path, job: str | Path, cfg: TileConfig | None = None, mpp: float | None = None,
               overwrite: bool = False, show_progress: bool = True) -> BatchResult:
    """`hwsi tile` on every slide of ``source``: finished slides skipped, failures recorded, summary printed."""
    cfg = cfg or TileConfig()
    cfg.grid.validate()
    job = Path(job)
    specs = collect_slides(source, mpp)
    items = [BatchItem(s.slide_id, s, str(s.path)) for s in specs]
    infos: dict[str, dict[str, Any]] = {}

    def process(item: BatchItem[SlideSpec]) -> dict[str, Any]:
        info = tile_slide(item.payload, job, cfg)
        infos[item.slide_id] = info
        return info

    def is_done(item: BatchItem[SlideSpec]) -> bool:
        return has_stage(store_path(job, item.slide_id), STAGE)

    result = run_batch(items, job, STAGE, process, is_done, overwrite=overwrite, show_progress=show_progress)
    update_registry(job, specs, infos)
    (job / "tile_config.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")
    return result
