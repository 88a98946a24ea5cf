"""Ingest of a CellViT run (docs/design.md §5 "Cells", backend b): detections + per-cell token embeddings.

Formats (docs/formats-cells.md; all coordinates are level-0 pixels):

* ``cells.json`` / ``cell_detection.json`` (plain or ``.snappy``): ``{"wsi_metadata": {...}, "type_map": {...},
  "cells": [cell, ...]}`` or a bare list of cells. A cell is ``{"bbox": [[r0, c0], [r1, c1]], "centroid": [x, y],
  "contour": [[x, y], ...], "type": int, "type_prob": float, ...}`` (``cell_detection.json`` has no contour or
  type_prob). ``type_map`` is ``{"1": "Neoplastic", ...}`` (CellViT++ / CellViT-Inference) or ``{"Neoplastic": 1,
  ...}`` (CellViT v1); without one, CellViT's PanNuke ids are assumed. The file's ids are mapped BY NAME into the
  type table (:mod:`hwsi.cells.nucleus_types`). The centroid is (x, y); CellViT's bbox is (row, col) corners and
  is kept as given. A missing centroid is taken from the contour mean, then from the bbox centre.
* GeoJSON (CellViT's per-type features, QuPath exports): :mod:`hwsi.cells.geojson_cells`. These have no cell order
  that tokens could follow, so they are refused together with embeddings.
* embeddings (``cells.pt``, ``.npy``): :mod:`hwsi.cells.cellvit_tokens`. Where to find all of these for a slide:
  :mod:`hwsi.cells.cellvit_layouts`; the check against the slide: :mod:`hwsi.cells.cellvit_checks`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hwsi.cells.cell_files import CellVitCells, CellVitError, read_json_file
from hwsi.cells.cellvit_tokens import KNOWN_DIMS, read_cell_embeddings
from hwsi.cells.geojson_cells import cells_from_geojson
from hwsi.cells.nucleus_types import ALL_TYPE_NAMES, PANNUKE_IDS, map_type_names

__all__ = ["KNOWN_DIMS", "Attachment", "CellVitCells", "CellVitError", "attach_cells_to_grid", "load_cellvit",
           "read_cell_embeddings", "read_cellvit_cells"]


def source_type_map(raw: Any) -> dict[int, str]:
    """The file's id → class name: ``{"0": "Background", ...}`` (CellViT++) or ``{"Background": 0, ...}`` (v1)."""
    if not isinstance(raw, dict):
        return {}
    out: dict[int, str] = {}
    for k, v in raw.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out[int(v)] = str(k)
        else:
            try:
                out[int(k)] = str(v)
            except ValueError:
                continue
    return out


def _cells_from_list(path: Path, cells: list, file_map: dict[int, str], meta: dict[str, Any]) -> CellVitCells:
    n = len(cells)
    cent = np.zeros((n, 2), dtype=np.float64)
    ids = np.zeros(n, dtype=np.int64)
    prob = np.ones(n, dtype=np.float32)
    bbox = np.full((n, 2, 2), np.nan, dtype=np.float64)
    contours: list[np.ndarray] = []
    any_contour = False
    for i, c in enumerate(cells):
        if not isinstance(c, dict):
            raise CellVitError(path, f"cell {i} is not an object")
        try:
            con = np.asarray(c.get("contour", []), dtype=np.float64).reshape(-1, 2)
            if "bbox" in c:
                bbox[i] = np.asarray(c["bbox"], dtype=np.float64).reshape(2, 2)
            if "centroid" in c:
                cent[i] = np.asarray(c["centroid"], dtype=np.float64).reshape(2)
            elif len(con):
                cent[i] = con.mean(axis=0)
            elif "bbox" in c:
                cent[i] = bbox[i].mean(axis=0)[::-1]  # (row, col) -> (x, y)
            else:
                raise CellVitError(path, f"cell {i} has no centroid, contour or bbox")
            ids[i] = int(c.get("type", 0))
            prob[i] = float(c.get("type_prob", 1.0))
        except (TypeError, ValueError) as exc:
            raise CellVitError(path, f"cell {i} is malformed ({exc})") from exc
        contours.append(con)
        any_contour |= len(con) > 0
    if not np.isfinite(cent).all():
        raise CellVitError(path, "non-finite centroid coordinates")
    if not file_map:
        file_map = dict(PANNUKE_IDS)
        meta = {**meta, "type_map_assumed": "PanNuke"}
    missing = sorted(set(np.unique(ids).tolist()) - set(file_map))
    if missing:
        raise CellVitError(path, f"type id(s) {missing[:10]} are not in the file's type_map {file_map}")
    mapping = map_type_names(file_map.values())
    lut = {i: mapping.codes[name] for i, name in file_map.items()}
    types = np.array([lut[int(t)] for t in ids], dtype=np.int16)
    present = sorted({int(t) for t in types})
    meta = {**meta, "type_mapping": mapping, "source_type_ids": {name: i for i, name in file_map.items()}}
    return CellVitCells(cent, types, prob, {c: ALL_TYPE_NAMES[c] for c in present},
                        bbox if np.isfinite(bbox).any() else None, contours if any_contour else None, None,
                        str(path), meta)


def read_cellvit_cells(path: str | Path) -> CellVitCells:
    """Read ``cells.json``, ``cell_detection.json`` (plain or ``.snappy``) or a CellViT / QuPath GeoJSON."""
    path = Path(path)
    data = read_json_file(path)
    if isinstance(data, dict) and data.get("type") in ("FeatureCollection", "Feature"):
        return cells_from_geojson(path, data)
    if isinstance(data, list) and data and isinstance(data[0], dict) and "geometry" in data[0]:
        return cells_from_geojson(path, data)
    if isinstance(data, dict):
        if "cells" not in data or not isinstance(data["cells"], list):
            raise CellVitError(path, "expected a list of cells or an object with a \"cells\" list")
        meta = data.get("wsi_metadata", {}) if isinstance(data.get("wsi_metadata"), dict) else {}
        return _cells_from_list(path, data["cells"], source_type_map(data.get("type_map")),
                                {"wsi_metadata": meta})
    if isinstance(data, list):
        return _cells_from_list(path, data, {}, {})
    raise CellVitError(path, f"expected a list of cells or an object, got {type(data).__name__}")


def load_cellvit(cells_path: str | Path, embeddings_path: str | Path | None = None,
                 expected_dim: int | None = None) -> CellVitCells:
    """Read a CellViT run: cells (+ token embeddings, checked for one token per cell, in order).

    Raises :class:`CellVitError` naming the file when counts differ, when the cells file is GeoJSON (no cell order
    to match tokens to), or when ``expected_dim`` is given and differs.
    """
    cells = read_cellvit_cells(cells_path)
    if embeddings_path is None:
        return cells
    if "order" in cells.metadata:
        raise CellVitError(cells_path, f"GeoJSON ({cells.metadata['order']}) has no cell order that tokens could "
                                       "follow, so tokens cannot be matched to cells; use cells.json with cells.pt")
    tokens, positions = read_cell_embeddings(embeddings_path)
    if len(tokens) != len(cells):
        raise CellVitError(embeddings_path, f"{len(tokens)} token embeddings but {len(cells)} cells in {cells_path}")
    if expected_dim is not None and tokens.shape[1] != expected_dim:
        raise CellVitError(embeddings_path, f"embedding dim {tokens.shape[1]}, expected {expected_dim}")
    if positions is not None and len(cells):
        # CellViT stores token positions per cell; they must follow the same cell order as the json
        if np.median(np.hypot(*(positions - cells.centroids).T)) > 64:
            raise CellVitError(embeddings_path, f"token positions do not follow the cell order of {cells_path}")
    cells.embeddings = tokens
    return cells


# --- grid attachment ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Attachment:
    """Region/patch of each cell (−1 when outside every region) and how many were unmatched."""

    region_idx: np.ndarray
    patch_idx: np.ndarray
    n_unmatched: int


def attach_cells_to_grid(
    centroids_level0: np.ndarray,
    region_coords: np.ndarray,
    region_size_level0: float,
    patch_size_level0: float,
    grid_side: int,
) -> Attachment:
    """Map level-0 centroids to (region, patch): region r covers [x_r, x_r+size) × [y_r, y_r+size); patch index is
    row-major ``row * grid_side + col``. Cells in no region get −1/−1 (counted in ``n_unmatched``). If regions
    overlap, the first listed wins. O(N) through a lookup table when the regions sit on one lattice of
    ``region_size_level0`` (the usual grid), else one vectorised pass over the cells per region.
    """
    c = np.asarray(centroids_level0, dtype=np.float64).reshape(-1, 2)
    rc = np.asarray(region_coords, dtype=np.float64).reshape(-1, 2)
    n = len(c)
    region_idx = np.full(n, -1, dtype=np.int64)
    patch_idx = np.full(n, -1, dtype=np.int64)
    if region_size_level0 <= 0 or patch_size_level0 <= 0 or grid_side <= 0:
        raise ValueError("attach_cells_to_grid: sizes and grid_side must be positive")
    if n == 0 or len(rc) == 0:
        return Attachment(region_idx, patch_idx, n)
    origin = rc.min(axis=0)
    lattice = (rc - origin) / region_size_level0
    if np.allclose(lattice, np.round(lattice), atol=1e-6) and lattice.max() < 1e5:
        # regions on one lattice (the usual grid): a dense lookup table, O(N)
        k = np.round(lattice).astype(np.int64)
        table = np.full((k[:, 1].max() + 1, k[:, 0].max() + 1), -1, dtype=np.int64)
        for r in range(len(k) - 1, -1, -1):  # reverse so the first listed region wins
            table[k[r, 1], k[r, 0]] = r
        cell_k = np.floor((c - origin) / region_size_level0).astype(np.int64)
        ok = (cell_k >= 0).all(axis=1) & (cell_k[:, 0] < table.shape[1]) & (cell_k[:, 1] < table.shape[0])
        region_idx[ok] = table[cell_k[ok, 1], cell_k[ok, 0]]
    else:
        for r in range(len(rc)):  # one vectorised pass over the cells per region
            free = region_idx < 0
            dx = c[:, 0] - rc[r, 0]
            dy = c[:, 1] - rc[r, 1]
            region_idx[free & (dx >= 0) & (dy >= 0) & (dx < region_size_level0) & (dy < region_size_level0)] = r
    hit = region_idx >= 0
    d = c[hit] - rc[region_idx[hit]]
    col = np.clip((d[:, 0] // patch_size_level0).astype(np.int64), 0, grid_side - 1)
    row = np.clip((d[:, 1] // patch_size_level0).astype(np.int64), 0, grid_side - 1)
    patch_idx[hit] = row * grid_side + col
    return Attachment(region_idx, patch_idx, int((region_idx < 0).sum()))
