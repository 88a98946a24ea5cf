"""`hwsi tile`: tissue + grid of each slide into ``JOB/stores/<slide_id>.h5`` (the first stage of every store).

Per slide: open (µm/px), tissue mask, region/patch grid; the store is written under a temporary name and renamed
when complete, with ``stages = ["tile"]`` and the grid + tissue settings (JSON attribute ``tile``). It holds
(hwsi.store schema) ``regions/coords``, ``regions/tissue``, ``patches/coords``, ``patches/tissue``, plus ``patches/tissue_fraction`` (R, G) float32, ``tissue/mask`` (uint8
0/1, attrs ``downsample``, ``mpp``, ``saturation_threshold``) and ``tissue/thumbnail`` (RGB uint8, attr
``downsample``) for the viewer.

``--annotations`` (QuPath GeoJSON, :mod:`hwsi.slide.annotations`) restricts the tissue mask, and so the grid, to the
annotated area before the grid is built; the store records the file (JSON attribute ``annotations``).

Inputs: one slide file, a folder (its slide files; with ``recursive`` those of its sub-folders too), or a CSV with
a ``slide`` column (or TRIDENT's ``wsi``) and optional ``mpp`` column (paths relative to the CSV). A file named
twice (the same path on two CSV rows, a symlink beside its target) is tiled once; two rows naming one file with
different ``mpp`` are an error. Slide ids follow ONE rule (:mod:`hwsi.slide.ids`: the stem; the whole file name
where stems clash, e.g. ``a/x.svs`` and ``b/x.svs`` of a recursive folder; ids the job already holds are kept).
``JOB/slides.json`` maps slide_id -> source path, mpp, mpp_source; a store that holds another file than its slide
is never taken for "already complete".
"""

from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from hwsi import textio
from hwsi.batch import DEFAULT_CLAIM_TIMEOUT_S, BatchItem, BatchResult, lock_path, prepare_job, run_batch
from hwsi.errors import ConfigError, ConfigFileError, HwsiError, SlideError
from hwsi.slide.annotations import TileAnnotations, annotation_files, read_tile_annotations
from hwsi.slide.grid import Grid, GridConfig, build_grid, check_fits, resolution_plan
from hwsi.slide.ids import allocate_ids, path_key
from hwsi.slide.open import SLIDE_SUFFIXES, open_slide
from hwsi.slide.preview import save_preview
from hwsi.slide.tissue import TissueConfig, TissueMask, compute_tissue
from hwsi.store import SlideStore, StoreMeta, grid_fields, has_stage, list_stores, new_store, store_path
from hwsi.utils.atomic import write_json_atomic
from hwsi.utils.launch import Shard
from hwsi.utils.lock import file_lock
from hwsi.utils.outdir import prepare_output_dir

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


def read_registry(job: str | Path) -> dict[str, Any]:
    """``JOB/slides.json`` as a dict (empty if absent or unreadable)."""
    reg_path = Path(job) / "slides.json"
    try:
        reg = json.loads(reg_path.read_text()) if reg_path.is_file() else {}
    except (OSError, ValueError):
        return {}
    return reg if isinstance(reg, dict) else {}


def store_slide_path(store: Path) -> str | None:
    """The resolved ``slide_path`` a store records (None if it has none or cannot be read)."""
    try:
        with SlideStore(store) as s:
            v = s.attr("slide_path")
    except (OSError, ValueError, HwsiError):
        return None
    return path_key(v) if isinstance(v, str) and v else None


def job_slide_ids(job: str | Path) -> dict[str, str]:
    """The ids a job already holds: ``{slide_id: path_key}`` from ``slides.json`` and the stores it lacks."""
    out: dict[str, str] = {}
    for sid, entry in read_registry(job).items():
        p = entry.get("path") if isinstance(entry, dict) else entry
        if isinstance(p, str) and p:
            out[str(sid)] = path_key(p)
    for store in list_stores(job):
        if store.stem not in out:
            p = store_slide_path(store)
            if p:
                out[store.stem] = p
    return out


def _dedupe(items: list[tuple[Path, float | None, str]]) -> list[tuple[Path, float | None]]:
    """One entry per file (keyed by resolved path); the same file with two different µm/px is a ConfigError."""
    seen: dict[str, tuple[Path, float | None, str]] = {}
    for p, m, where in items:
        k = path_key(p)
        if k in seen:
            q, m0, where0 = seen[k]
            if m0 != m:
                raise ConfigError(f"{where}: {p} is also listed at {where0} with another mpp ({m0} vs {m})")
            if str(p) < str(q):  # keep the smallest spelling: the result does not depend on the order
                seen[k] = (p, m, where0)
            continue
        seen[k] = (p, m, where)
    return [(p, m) for p, m, _ in seen.values()]


SLIDE_COLUMNS = ("slide", "wsi")  # hwsi's name, TRIDENT's (`--custom_list_of_wsis`: columns wsi[, mpp])


def slide_files(folder: Path, recursive: bool = False) -> list[Path]:
    """The slide files of a folder (names starting with "." skipped), sorted; with ``recursive`` also those of its
    sub-folders at any depth (symlinked folders are not followed: no loops; an MRXS's data folder holds no slide
    file and is passed over)."""
    if not recursive:
        return [p for p in sorted(folder.iterdir())
                if p.name.lower().endswith(SLIDE_SUFFIXES) and not p.name.startswith(".")]
    out: list[Path] = []
    for root, dirs, files in os.walk(folder, followlinks=False):
        mrxs = [d for d in dirs if d.lower().endswith(".mrxs")]  # a folder named *.mrxs is a slide, as at the top
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in mrxs)
        names = files + mrxs
        out += [Path(root) / n for n in sorted(names)
                if n.lower().endswith(SLIDE_SUFFIXES) and not n.startswith(".")]
    return sorted(out)


def collect_slides(source: str | Path, mpp: float | None = None, job: str | Path | None = None,
                   recursive: bool = False) -> list[SlideSpec]:
    """Slides named by ``source`` (file, folder or CSV ``slide[,mpp]``, or TRIDENT's ``wsi[,mpp]``); ``mpp``
    applies to all (CSV values win); ``recursive``: a folder's sub-folders too.

    Ids come from :func:`hwsi.slide.ids.allocate_ids`, keeping those ``job`` (if given) already holds."""
    src = Path(source)
    if not src.exists():
        raise HwsiError(f"{src}: no such file or folder")
    items: list[tuple[Path, float | None, str]] = []
    if src.suffix.lower() == ".csv" and not src.is_dir():
        header, rows = textio.read_csv(src, ConfigFileError)
        cols = [c.lower() for c in header]
        named = [c for c in SLIDE_COLUMNS if c in cols]
        if not named:
            raise ConfigError(f"{src}: CSV needs a 'slide' column (or TRIDENT's 'wsi'; optionally 'mpp'); found {cols}")
        if len(named) > 1:
            raise ConfigError(f"{src}: CSV has both a 'slide' and a 'wsi' column; keep one")
        for n, raw in rows:
            row = {k.lower(): v for k, v in raw.items()}
            name = row[named[0]]
            if not name:
                continue
            if "\0" in name:
                raise ConfigError(f"{src} (line {n}): slide path contains a NUL character")
            p = Path(name)
            p = p if p.is_absolute() else src.parent / p
            items.append((p, _parse_mpp(row.get("mpp", ""), f"{src} (line {n})") or mpp, f"{src}:{n}"))
    elif src.is_dir() and src.suffix.lower() != ".mrxs":
        items = [(p, mpp, str(p)) for p in slide_files(src, recursive)]
        if not items:
            nested = not recursive and any(slide_files(d, True) for d in src.iterdir()
                                           if d.is_dir() and not d.is_symlink() and not d.name.startswith("."))
            raise HwsiError(f"{src}: no slide files ({', '.join(SLIDE_SUFFIXES)}) in this folder"
                            + ("; its sub-folders hold some: use --recursive" if nested else ""))
    else:
        if not src.is_file():
            raise HwsiError(f"{src}: not a regular file (a FIFO, socket or device); give a slide file or folder")
        items.append((src, mpp, str(src)))
    unique = _dedupe(items)
    ids = allocate_ids([p for p, _ in unique], job_slide_ids(job) if job is not None else None)
    return [SlideSpec(p, ids[path_key(p)], m) for p, m in unique]


def write_tile_store(out: Path, slide_path: Path, slide_id: str, mpp_source: str, grid: Grid,
                     tissue: TissueMask, settings: dict[str, Any] | None = None,
                     annotations: dict[str, Any] | None = None) -> None:
    """Write the tile-stage store atomically (``settings``: the grid and tissue settings, kept as the ``tile``
    attribute so a run can tile a new slide the same way; ``annotations``: the annotation file that restricted
    it, :meth:`TileAnnotations.record`)."""
    meta = StoreMeta(slide_path=str(slide_path.resolve()), slide_id=slide_id, mpp_source=mpp_source,
                     **grid_fields(grid))
    with new_store(out, meta) as w:
        w.set_attr("n_candidate_regions", grid.n_candidates)
        if settings is not None:
            w.set_json_attr("tile", settings)
        if annotations is not None:
            w.set_json_attr("annotations", annotations)
        w.write_grid(grid.region_coords, grid.region_tissue, grid.patch_coords, grid.patch_tissue,
                     grid.patch_fraction)
        w.write_tissue_mask(tissue.mask, downsample=tissue.downsample, mpp=tissue.mask_mpp,
                            saturation_threshold=tissue.saturation_threshold)
        w.write_thumbnail(tissue.thumbnail, tissue.thumbnail_downsample)
        w.mark_stage(STAGE)


def restrict_tissue(tissue: TissueMask, annotations: TileAnnotations, slide_path: Path) -> TissueMask:
    """The tissue mask inside the annotations' include polygons and outside their exclusions; SlideError when no
    tissue is left."""
    mask = tissue.mask & annotations.mask(tissue.mask.shape, tissue.downsample)
    if not mask.any():
        raise SlideError(slide_path, f"no tissue inside the annotations ({annotations.describe()}; the slide "
                         f"has {tissue.tissue_fraction:.2%} tissue)", "check that the file is this slide's")
    return replace(tissue, mask=mask)


def tile_slide(spec: SlideSpec, job: str | Path, cfg: TileConfig | None = None,
               annotations: TileAnnotations | None = None) -> dict[str, Any]:
    """Tile one slide into its store in ``job`` (only inside ``annotations`` where given); returns a summary dict
    (regions, patches, mpp, ...)."""
    cfg = cfg or TileConfig()
    cfg.grid.validate()
    job = Path(job)

    out = store_path(job, spec.slide_id)
    with open_slide(spec.path, mpp=spec.mpp, slide_id=spec.slide_id) as slide:
        scale, _ = resolution_plan(str(slide.path), slide.mpp, cfg.grid)  # fail early if too coarse
        check_fits(slide, cfg.grid, scale)  # ... or if a patch is larger than the slide
        if annotations is not None:
            annotations.check_on_slide(*slide.dimensions)
        tissue = compute_tissue(slide, cfg.tissue, patch_size_level0=cfg.grid.patch_size * scale,
                                threads=cfg.threads)
        if annotations is not None:
            tissue = restrict_tissue(tissue, annotations, slide.path)
        grid = build_grid(slide, tissue.mask, tissue.downsample, cfg.grid)
        write_tile_store(out, slide.path, spec.slide_id, slide.mpp_source, grid, tissue,
                         {"grid": asdict(cfg.grid), "tissue": asdict(cfg.tissue)},
                         annotations.record() if annotations is not None else None)
        if cfg.preview:
            save_preview(job / "previews" / f"{spec.slide_id}.png", tissue, grid)
        return {
            "regions": grid.n_regions,
            "patches": int(grid.patch_tissue.sum()),
            "mpp": round(slide.mpp, 4),
            "mpp_source": slide.mpp_source,
            "level": grid.read_level,
        }


def _merge_registry(job: Path, specs: list[SlideSpec], infos: dict[str, dict[str, Any]]) -> None:
    reg = read_registry(job)
    for s in specs:
        entry = reg.get(s.slide_id, {})
        entry = entry if isinstance(entry, dict) else {}
        entry["path"] = path_key(s.path)
        if s.slide_id in infos:
            entry["mpp"] = infos[s.slide_id]["mpp"]
            entry["mpp_source"] = infos[s.slide_id]["mpp_source"]
        elif s.mpp is not None and "mpp" not in entry:
            entry["mpp"] = s.mpp
            entry["mpp_source"] = "user"
        reg[s.slide_id] = entry
    write_json_atomic(job / "slides.json", reg)


def update_registry(job: Path, specs: list[SlideSpec], infos: dict[str, dict[str, Any]]) -> None:
    """Merge ``slides.json`` (slide_id -> source path, mpp, mpp_source) with the slides of this run (under a lock:
    another process may be merging its own)."""
    with file_lock(lock_path(job, "slides.json")):
        _merge_registry(job, specs, infos)


def claim_slides(source: str | Path, job: Path, mpp: float | None = None,
                 recursive: bool = False) -> tuple[list[SlideSpec], dict[str, str]]:
    """The slides of ``source`` with their ids, registered in ``slides.json`` at once, under the registry's lock:
    a second `hwsi tile` on the job sees these ids as taken. Returns (specs, the ids the job held before)."""
    with file_lock(lock_path(job, "slides.json")):
        known = job_slide_ids(job)
        specs = collect_slides(source, mpp, job, recursive)
        _merge_registry(job, specs, {})
    return specs, known


def load_annotations(option: str | Path, specs: list[SlideSpec]) -> dict[str, TileAnnotations]:
    """``--annotations`` for these slides, keyed by the slide file's :func:`path_key`: every file read and checked
    against its slide's level-0 size now, so that a bad file is one error (exit 2) before anything is tiled (a slide
    that does not open is left to the batch, which records it)."""
    files = annotation_files(option, [(s.slide_id, s.path) for s in specs])
    out: dict[str, TileAnnotations] = {}
    for s in specs:
        if s.slide_id not in files:
            continue
        ann = read_tile_annotations(files[s.slide_id])
        try:
            with open_slide(s.path, mpp=s.mpp, slide_id=s.slide_id) as slide:
                size = slide.dimensions
        except SlideError:
            size = None
        if size is not None:
            ann.check_on_slide(*size)
        out[path_key(s.path)] = ann
    missing = [s.slide_id for s in specs if path_key(s.path) not in out]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        print(f"--annotations {option}: no annotation file for {len(missing)} slide(s) ({shown}); tiled whole",
              file=sys.stderr)
    return out


def tile_batch(source: str | Path, job: str | Path, cfg: TileConfig | None = None, mpp: float | None = None,
               overwrite: bool = False, show_progress: bool = True, shard: Shard | None = None,
               claim_timeout_s: float = DEFAULT_CLAIM_TIMEOUT_S,
               annotations: str | Path | None = None, recursive: bool = False) -> BatchResult:
    """`hwsi tile` on every slide of ``source``: finished slides skipped, failures recorded, summary printed
    (``shard``: this worker's share of the slides, :func:`hwsi.batch.run_batch`; ``annotations``: a QuPath GeoJSON
    file for the one slide, or a folder of ``<slide>.geojson``, :func:`load_annotations`)."""
    cfg = cfg or TileConfig()
    cfg.grid.validate()
    job = Path(job)
    prepare_output_dir(job, what="job folder", create=False)
    first = collect_slides(source, mpp, job, recursive)  # bad input is one error before anything is created
    ann = load_annotations(annotations, first) if annotations is not None else {}
    prepare_job(job, ("previews",) if cfg.preview else ())
    specs, known = claim_slides(source, job, mpp, recursive)
    items = [BatchItem(s.slide_id, s, str(s.path)) for s in specs]
    infos: dict[str, dict[str, Any]] = {}

    def holds(store: Path, spec: SlideSpec) -> bool:  # the store is of this file (or slides.json says so: moved)
        key = path_key(spec.path)
        return store_slide_path(store) == key or known.get(spec.slide_id) == key

    def process(item: BatchItem[SlideSpec]) -> dict[str, Any]:
        store = store_path(job, item.slide_id)
        if store.is_file() and not holds(store, item.payload):  # another run gave this id to another file
            raise SlideError(item.payload.path, f"its slide id {item.slide_id!r} is taken: {store} holds "
                             f"{store_slide_path(store)}", "run `hwsi tile` again: it gives this file another id")
        info = tile_slide(item.payload, job, cfg, ann.get(path_key(item.payload.path)))
        infos[item.slide_id] = info
        return info

    def is_done(item: BatchItem[SlideSpec]) -> bool:
        store = store_path(job, item.slide_id)
        return has_stage(store, STAGE) and holds(store, item.payload)

    def finish() -> None:
        update_registry(job, specs, infos)
        write_json_atomic(job / "tile_config.json", asdict(cfg))

    return run_batch(items, job, STAGE, process, is_done, overwrite=overwrite, show_progress=show_progress,
                     shard=shard, claim_timeout_s=claim_timeout_s, on_finished=finish)
