"""Do a file's cells belong to this slide? (docs/formats-cells.md "Checks against the slide").

A cells file of another slide, or one in another level's / µm/px's pixels, would otherwise attach no cell (or the
wrong ones) and the extraction would report "done, cells=0". :func:`check_cells_on_slide` refuses it when more than
:data:`MAX_OUTSIDE_FRACTION` of its cells lie outside the slide's level-0 extent, naming the file, the counts, the
cells' extent and the likely reason, from the file's ``wsi_metadata`` where present (CellViT writes ``base_mpp``,
``target_patch_mpp``, ``orig_n_tiles_cols``/``rows``, ``patch_size``, ``downsampling``; no slide width/height).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from hwsi.cells.cell_files import CellVitCells, CellVitError

MAX_OUTSIDE_FRACTION = 0.5  # refuse above this fraction of cells outside the slide
MPP_TOLERANCE = 0.15  # relative µm/px difference reported as a mismatch


@dataclass(frozen=True)
class SlideFit:
    """How a file's cells sit on the slide: cells outside it, and the file's µm/px (None where not stated)."""

    n_cells: int
    n_outside_slide: int
    file_mpp: float | None


def _number(meta: dict[str, Any], key: str) -> float | None:
    v = meta.get(key)
    try:
        f = float(v)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return f if np.isfinite(f) and f > 0 else None


def file_grid_extent(meta: dict[str, Any]) -> tuple[float, float] | None:
    """About how many level-0 px CellViT's tile grid covered (cols, rows × patch size × downsampling × target/base
    µm/px), or None where the metadata lack any of these."""
    cols, rows, size = (_number(meta, k) for k in ("orig_n_tiles_cols", "orig_n_tiles_rows", "patch_size"))
    if cols is None or rows is None or size is None:
        return None
    base, target = _number(meta, "base_mpp"), _number(meta, "target_patch_mpp")
    scale = (_number(meta, "downsampling") or 1.0) * (target / base if base and target else 1.0)
    return cols * size * scale, rows * size * scale


def _reasons(cells: CellVitCells, width: int, height: int, mpp: float | None, file_mpp: float | None) -> str:
    meta = cells.metadata.get("wsi_metadata") or {}
    out = []
    if file_mpp is not None and mpp is not None and abs(file_mpp / mpp - 1) > MPP_TOLERANCE:
        out.append(f"the file says {file_mpp:g} µm/px, the slide {mpp:g} µm/px")
    grid = file_grid_extent(meta)
    if grid is not None:
        out.append(f"the file's tile grid covers about {grid[0]:.0f}×{grid[1]:.0f} px")
    span = cells.centroids.max(axis=0)
    ratio = max(span[0] / max(width, 1), span[1] / max(height, 1))
    if ratio > 1.5:
        out.append(f"the cells reach {ratio:.1f}× the slide's size")
    facts = "; ".join(out)
    return (f"{facts + '; ' if facts else ''}likely the output of another slide, or coordinates at another "
            "level / µm/px")


def check_cells_on_slide(cells: CellVitCells, width_level0: int, height_level0: int,
                         mpp_level0: float | None = None) -> SlideFit:
    """Count the cells outside the slide's level-0 extent; :class:`CellVitError` (naming the file) when more than
    :data:`MAX_OUTSIDE_FRACTION` of them are."""
    meta = cells.metadata.get("wsi_metadata") or {}
    file_mpp = _number(meta, "base_mpp") or _number(meta, "mpp")
    n = len(cells)
    if n == 0:
        return SlideFit(0, 0, file_mpp)
    x, y = cells.centroids[:, 0], cells.centroids[:, 1]
    outside = (x < 0) | (y < 0) | (x >= width_level0) | (y >= height_level0)
    n_out = int(outside.sum())
    if n_out > MAX_OUTSIDE_FRACTION * n:
        lo, hi = cells.centroids.min(axis=0), cells.centroids.max(axis=0)
        raise CellVitError(cells.source, (
            f"{n_out} of {n} cells ({100 * n_out / n:.0f} %) lie outside the slide ({width_level0}×{height_level0} "
            f"level-0 px; hwsi refuses above {100 * MAX_OUTSIDE_FRACTION:.0f} %): they span x {lo[0]:.0f}–{hi[0]:.0f}, "
            f"y {lo[1]:.0f}–{hi[1]:.0f}; {_reasons(cells, width_level0, height_level0, mpp_level0, file_mpp)}"))
    return SlideFit(n, n_out, file_mpp)
