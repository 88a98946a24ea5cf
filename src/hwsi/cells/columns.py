"""Per-cell columns of the ``cells/*`` store group from segmentation results (the group itself is written and read
by :mod:`hwsi.store.cells`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np

from hwsi.cells.morphology import FEATURE_DIM, empty_table
from hwsi.store.cells import rows_to_columns


class CellResult(Protocol):
    """Anything with a columnar ``table`` (with ``x``, ``y`` in patch pixels) and ``features`` (N, D)."""

    table: dict[str, np.ndarray]
    features: np.ndarray


def cells_to_columns(
    per_patch_results: Sequence[CellResult | None],
    region_idx: np.ndarray,
    patch_idx: np.ndarray,
    offset_xy_level0: np.ndarray,
    scale_to_level0: float,
    *,
    n_regions: int | None = None,
    grid_size: int,
    emb_dim: int | None = None,
) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """Columnar ``cells/*`` data from the segmentation results of several patches.

    ``per_patch_results[i]`` (a :class:`~hwsi.cells.segment.Nuclei` or ``None`` for an empty/unsegmented patch) was
    found in patch ``patch_idx[i]`` of region ``region_idx[i]``, whose top-left is ``offset_xy_level0[i]`` (level-0
    px); a patch pixel is ``scale_to_level0`` level-0 pixels. Where every result carries ``contours`` (patch pixels)
    they are mapped to level 0 and kept (``contour_n`` / ``contour_xy``, :mod:`hwsi.store.cells`). ``grid_size`` is G (patches per region);
    ``n_regions`` defaults to ``max(region_idx)+1``. Returns (columns, embeddings (N, Dc) float32, offsets (R·G+1)).
    """
    region_idx = np.asarray(region_idx, dtype=np.int64)
    patch_idx = np.asarray(patch_idx, dtype=np.int64)
    offs = np.asarray(offset_xy_level0, dtype=np.float64).reshape(-1, 2)
    if not (len(per_patch_results) == len(region_idx) == len(patch_idx) == len(offs)):
        raise ValueError("cells_to_columns: per_patch_results, region_idx, patch_idx, offset_xy_level0 differ in length")
    if n_regions is None:
        n_regions = int(region_idx.max()) + 1 if len(region_idx) else 0
    tables: list[dict[str, np.ndarray]] = []
    embs: list[np.ndarray] = []
    rings: list[np.ndarray] = []
    all_contours = True
    r_rows: list[np.ndarray] = []
    p_rows: list[np.ndarray] = []
    for i, res in enumerate(per_patch_results):
        if res is None or len(res.features) == 0:
            continue
        t = dict(res.table)
        t["x"] = offs[i, 0] + np.asarray(t["x"], dtype=np.float64) * scale_to_level0
        t["y"] = offs[i, 1] + np.asarray(t["y"], dtype=np.float64) * scale_to_level0
        tables.append(t)
        cont = getattr(res, "contours", None)
        if cont is None or len(cont) != len(res.features):
            all_contours = False
        else:
            rings += [offs[i] + np.asarray(c, np.float64).reshape(-1, 2) * scale_to_level0 for c in cont]
        embs.append(np.asarray(res.features, dtype=np.float32))
        r_rows.append(np.full(len(res.features), region_idx[i]))
        p_rows.append(np.full(len(res.features), patch_idx[i]))
    if not tables:
        d = emb_dim if emb_dim is not None else FEATURE_DIM
        return rows_to_columns(empty_table(), np.zeros((0, d), np.float32), np.zeros(0), np.zeros(0),
                               n_regions, grid_size)
    names = list(tables[0])
    for t in tables[1:]:
        if list(t) != names:
            raise ValueError("cells_to_columns: patches have different table columns")
    table = {k: np.concatenate([t[k] for t in tables]) for k in names}
    return rows_to_columns(table, np.concatenate(embs), np.concatenate(r_rows), np.concatenate(p_rows),
                           n_regions, grid_size, contours=rings if all_contours else None)
