"""Where `hwsi extract` gets its pixels: every region of a tiled store read once, on the grid `hwsi tile` recorded.

A :data:`RegionStream` yields ``(region index, patches (G, P, P, 3) uint8, corrupt-patch mask (G,) or None)``;
:func:`slide_region_stream` is the real one (hwsi.slide reader); tests pass their own.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
import numpy as np

from hwsi.features.extract_config import ExtractError
from hwsi.slide import Grid, iter_regions, open_slide
from hwsi.store import SlideStore, StoreMeta, grid_fields


def slide_path_for(job: Path, meta: StoreMeta, store: Path) -> Path:
    """The slide file of a store: its ``slide_path`` attribute, else the entry in ``JOB/slides.json``."""
    p = Path(meta.slide_path)
    if p.exists():
        return p
    reg = job / "slides.json"
    if reg.is_file():
        try:
            entry = json.loads(reg.read_text()).get(meta.slide_id)
        except ValueError as exc:
            raise ExtractError(f"{reg}: not valid JSON ({exc})") from exc
        cand = entry.get("path") if isinstance(entry, dict) else entry
        if cand and Path(cand).exists():
            return Path(cand)
    raise ExtractError(f"{store}: slide file {meta.slide_path} not found (moved? update JOB/slides.json)")


# (store, meta, slide path, threads) -> (region index, patches (G,P,P,3) uint8, corrupt patches (G,) bool | None)
RegionStream = Callable[[Path, StoreMeta, Path, int], Iterator[tuple[int, np.ndarray, np.ndarray | None]]]


def grid_from_store(s: SlideStore) -> Grid:
    """Rebuild the :class:`hwsi.slide.Grid` that `hwsi tile` laid out from an open store (no re-tiling)."""
    meta = s.meta
    tissue, frac = s.patch_tissue(), s.patch_tissue_fraction()
    return Grid(
        region_coords=s.region_coords(),
        region_tissue=s.region_tissue(),
        patch_coords=s.patch_coords(),
        patch_fraction=frac,
        patch_tissue=tissue,
        **grid_fields(meta),
        scale=float(meta.region_size_level0) / float(meta.region_size),
        n_candidates=int(s.attr("n_candidate_regions", tissue.shape[0])),
    )


def slide_region_stream(store: Path, meta: StoreMeta, slide_path: Path, threads: int
                        ) -> Iterator[tuple[int, np.ndarray, np.ndarray | None]]:
    """Yield (region index, patches (G, P, P, 3) uint8, corrupt-patch mask (G,) or None) for every region of the
    store, each read once by :func:`hwsi.slide.iter_regions` on the grid recorded in the store."""
    with SlideStore(store) as s:
        grid = grid_from_store(s)
    with open_slide(slide_path, mpp=meta.mpp_level0, slide_id=meta.slide_id) as slide:
        if tuple(slide.dimensions) != (meta.level0_width, meta.level0_height):
            raise ExtractError(f"{slide_path}: level-0 size {slide.dimensions} differs from the tiled "
                               f"{(meta.level0_width, meta.level0_height)} in {store} (another file? re-tile it)")
        for rp in iter_regions(slide, grid, threads=threads):
            yield int(rp.index), rp.patches, rp.corrupt_patches
