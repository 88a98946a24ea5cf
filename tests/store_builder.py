"""Test helper: a small extracted slide store written through hwsi.store's own writer (no rendering, no encoders).

The arrays are the caller's (random features, chosen SPF selections, cell counts per patch); the file layout and
attributes are exactly what `hwsi tile` + `hwsi extract` write, so a reader that works here works on real stores.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from hwsi.store import StoreMeta, new_store, rows_to_columns

EXTRACT_STAGES = ("tile", "features", "spf", "cells", "extract")


def write_extracted_store(
    path: Path,
    *,
    region_coords: np.ndarray,
    patch_coords: np.ndarray,
    features: dict[str, np.ndarray],
    selected: np.ndarray,
    relevance: np.ndarray,
    cell_counts: np.ndarray,
    cell_embeddings: np.ndarray,
    region_size_level0: float,
    patch_tissue: np.ndarray | None = None,
    attrs: dict[str, Any] | None = None,
    stages: tuple[str, ...] = EXTRACT_STAGES,
    mpp: float = 0.5,
) -> Path:
    """Write ``path``: grid (``region_coords`` (R, 2), ``patch_coords`` (R, G, 2), ``patch_tissue`` (R, G), all
    tissue by default), ``patches/<name>`` for each of ``features``, ``spf/selected``/``spf/relevance``, and cells:
    ``cell_counts`` (R·G,) cells per patch in (region, patch) order with ``cell_embeddings`` (N, Dc).
    ``attrs``: extra file attributes (e.g. ``patch_encoder``). Level-0 = target pixels (``mpp`` µm/px)."""
    region_coords = np.asarray(region_coords, np.int64).reshape(-1, 2)
    n_regions, g = patch_coords.shape[:2]
    side = int(round(g**0.5))
    tissue = np.ones((n_regions, g), bool) if patch_tissue is None else np.asarray(patch_tissue, bool)
    extent = region_coords.max(0) + int(region_size_level0) if n_regions else np.array([1, 1])
    meta = StoreMeta(
        slide_path=f"/slides/{path.stem}.tiff", slide_id=path.stem, mpp_level0=mpp, target_mpp=mpp, effective_mpp=mpp,
        region_size=int(region_size_level0), patch_size=int(region_size_level0) // side,
        region_size_level0=float(region_size_level0), patch_size_level0=float(region_size_level0) / side,
        level0_width=int(extent[0]), level0_height=int(extent[1]), stages=list(stages),
    )
    counts = np.asarray(cell_counts, np.int64).reshape(-1)
    key = np.repeat(np.arange(n_regions * g), counts)
    cols, emb, offsets = rows_to_columns({}, cell_embeddings, key // g, key % g, n_regions, g)
    path.parent.mkdir(parents=True, exist_ok=True)
    with new_store(path, meta) as w:
        w.write_grid(region_coords, tissue.mean(1), patch_coords, tissue, tissue.astype(np.float32))
        for name, data in features.items():
            w.write_features(name, np.asarray(data, np.float32))
            w.set_encoder(name, int(data.shape[-1]))
        w.write_spf(np.asarray(selected, np.int32), np.asarray(relevance, np.float32))
        w.write_cells(cols, emb, offsets, grid_size=g, attrs={"backend": "test", "scope": "spf_selected"})
        for k, v in (attrs or {}).items():
            w.set_attr(k, v)
    return path
