"""The ``cells/*`` group of a slide store (see :mod:`hwsi.store.layout`): a columnar per-cell table sorted by
(region, patch), a CSR index ``cells/offsets`` (R·G+1) and ``cells/embeddings`` (N, Dc).

Bounded memory: :func:`write_cells` with ``append=True`` extends resizable datasets, so a caller segments and writes
one region at a time (regions in increasing order); nothing holds more than one region's cells, and only the
offsets vector (R·G+1 int64, ~1 MB for 500 regions) is rewritten per append.

Columns written (each (N,)): ``region`` int32, ``patch`` int32, ``x``, ``y`` int64 level-0 centroid (rounded),
then every other numeric column of the source table (e.g. area_um2, type, type_prob, ...; patch-pixel ``x``/``y``
are replaced by the level-0 ones). Building these columns from segmentation results is
:func:`hwsi.cells.columns.cells_to_columns`.

Nucleus contours (optional; stores written before they existed have neither dataset and still read, with
:func:`read_contours` returning None): ``cells/contour_n`` (N,) int32, the number of vertices of each cell's
outline (0 = none), is an ordinary per-cell column; ``cells/contour_xy`` (M, 2) float32 holds the vertices of
every outline one after the other in row order (M = sum of contour_n), level-0 pixels, open rings (the first
vertex is not repeated).
"""

from __future__ import annotations

from typing import Any

import h5py
import numpy as np

from hwsi.errors import StoreError

GROUP = "cells"
_CHUNK_ROWS = 16384
CONTOUR_N = "contour_n"
CONTOUR_XY = "contour_xy"
_NOT_COLUMNS = ("embeddings", "offsets", CONTOUR_XY)


def column_names(g: h5py.Group) -> list[str]:
    """The per-cell (N,) columns of a ``cells`` group (not embeddings, offsets or the contour vertices)."""
    return [k for k in g if k not in _NOT_COLUMNS and isinstance(g[k], h5py.Dataset)]


def pack_contours(contours: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(contour_n (N,) int32, contour_xy (M, 2) float32) of N outlines ((k, 2) x, y each; k = 0 for none)."""
    rings = [np.asarray(c, np.float64).reshape(-1, 2) for c in contours]
    n = np.array([len(r) for r in rings], np.int32)
    xy = np.concatenate(rings).astype(np.float32) if rings and n.sum() else np.zeros((0, 2), np.float32)
    return n, xy


def rows_to_columns(
    table: dict[str, np.ndarray],
    embeddings: np.ndarray,
    region_idx: np.ndarray,
    patch_idx: np.ndarray,
    n_regions: int,
    grid_size: int,
    contours: list[np.ndarray] | None = None,
) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """Sort per-cell rows by (region, patch), drop rows with region or patch −1, build CSR offsets (R·G+1).

    ``table`` must already hold level-0 ``x``/``y``; ``contours`` (one level-0 (k, 2) outline per row, k = 0 for
    none) become the ``contour_n`` / ``contour_xy`` entries (module docstring). Returns (columns incl.
    ``region``/``patch``, embeddings, offsets).
    """
    region_idx = np.asarray(region_idx, dtype=np.int64)
    patch_idx = np.asarray(patch_idx, dtype=np.int64)
    n = len(region_idx)
    if len(patch_idx) != n or len(embeddings) != n or any(len(v) != n for v in table.values()):
        raise ValueError(
            f"rows_to_columns: lengths differ (region {n}, patch {len(patch_idx)}, embeddings {len(embeddings)}, "
            f"table {sorted({len(v) for v in table.values()})})"
        )
    keep = (region_idx >= 0) & (patch_idx >= 0)
    if keep.any() and (region_idx[keep].max() >= n_regions or patch_idx[keep].max() >= grid_size):
        raise ValueError(f"rows_to_columns: region/patch index out of range (R={n_regions}, G={grid_size})")
    key = region_idx * grid_size + patch_idx
    order = np.flatnonzero(keep)
    order = order[np.argsort(key[order], kind="stable")]
    cols: dict[str, np.ndarray] = {
        "region": region_idx[order].astype(np.int32),
        "patch": patch_idx[order].astype(np.int32),
    }
    for name, v in table.items():
        v = np.asarray(v)
        if name in ("x", "y"):
            cols[name] = np.rint(v[order]).astype(np.int64)
        elif v.dtype.kind in "biuf":
            cols[name] = v[order]
    if contours is not None:
        if len(contours) != n:
            raise ValueError(f"rows_to_columns: {len(contours)} contours for {n} rows")
        cols[CONTOUR_N], cols[CONTOUR_XY] = pack_contours([contours[i] for i in order])
    counts = np.bincount(key[order], minlength=n_regions * grid_size)
    offsets = np.zeros(n_regions * grid_size + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    emb = np.asarray(embeddings, dtype=np.float32)[order]
    return cols, emb, offsets


def write_cells(
    f: h5py.File,
    columns: dict[str, np.ndarray],
    embeddings: np.ndarray,
    offsets: np.ndarray,
    *,
    grid_size: int,
    append: bool = False,
    attrs: dict[str, Any] | None = None,
) -> None:
    """Write (or, with ``append``, extend) the ``cells/*`` group of an open store.

    Appending requires the same columns and embedding width, the same offsets length, and rows that come after
    the stored ones in (region, patch) order (e.g. one region at a time, in increasing order).
    """
    offsets = np.asarray(offsets, dtype=np.int64)
    n = int(offsets[-1]) if len(offsets) else 0
    xy = columns.get(CONTOUR_XY)
    columns = {k: v for k, v in columns.items() if k != CONTOUR_XY}
    if len(embeddings) != n or any(len(v) != n for v in columns.values()):
        raise StoreError(f.filename, f"write_cells: {n} cells in offsets but columns/embeddings have other lengths")
    if (xy is None) != (CONTOUR_N not in columns) or (
            xy is not None and len(xy) != int(np.asarray(columns[CONTOUR_N], np.int64).sum())):
        raise StoreError(f.filename, f"write_cells: {CONTOUR_XY} must hold sum({CONTOUR_N}) vertices")
    if (len(offsets) - 1) % grid_size:
        raise StoreError(f.filename, f"write_cells: offsets length {len(offsets)} is not R*{grid_size}+1")
    embeddings = np.asarray(embeddings, dtype=np.float32)
    embeddings = embeddings.reshape(n, embeddings.shape[-1] if embeddings.ndim == 2 else -1)  # n = 0 keeps its width
    if not append or GROUP not in f:
        if GROUP in f:
            del f[GROUP]
        g = f.create_group(GROUP)
        g.attrs["grid_size"] = grid_size
        g.attrs["n_regions"] = (len(offsets) - 1) // grid_size
        for name, v in columns.items():
            g.create_dataset(name, data=v, maxshape=(None,), chunks=(_CHUNK_ROWS,))
        d = max(1, embeddings.shape[1])
        data = embeddings if embeddings.shape[1] else np.zeros((n, d), np.float32)
        rows = max(1, min(_CHUNK_ROWS, (1 << 20) // (4 * d)))  # ~1 MB chunks
        g.create_dataset("embeddings", data=data, maxshape=(None, d), chunks=(rows, d))
        g.create_dataset("offsets", data=offsets)
        if xy is not None:
            g.create_dataset(CONTOUR_XY, data=np.asarray(xy, np.float32).reshape(-1, 2), maxshape=(None, 2),
                             chunks=(_CHUNK_ROWS, 2))
    else:
        g = f[GROUP]
        old = g["offsets"][:]
        if len(old) != len(offsets) or int(g.attrs["grid_size"]) != grid_size:
            raise StoreError(f.filename, "write_cells(append): offsets length or grid size differ from the stored ones")
        if set(columns) != set(column_names(g)):
            raise StoreError(f.filename, f"write_cells(append): columns {sorted(columns)} differ from the stored ones")
        if n and embeddings.shape[1] != g["embeddings"].shape[1]:
            raise StoreError(f.filename, "write_cells(append): embedding width differs from the stored one")
        if n:
            first_new = int(np.flatnonzero(np.diff(offsets))[0])  # first (region, patch) key with new cells
            old_keys = np.flatnonzero(np.diff(old))
            if len(old_keys) and first_new <= int(old_keys[-1]):
                raise StoreError(f.filename, "write_cells(append): new cells must come after the stored ones "
                                 "in (region, patch) order")
        m = int(old[-1])
        for name, v in columns.items():
            ds = g[name]
            ds.resize((m + n,))
            ds[m:] = v
        ds = g["embeddings"]
        ds.resize((m + n, ds.shape[1]))
        if n:
            ds[m:] = embeddings
        if xy is not None and len(xy):
            ds = g[CONTOUR_XY]
            k = ds.shape[0]
            ds.resize((k + len(xy), 2))
            ds[k:] = np.asarray(xy, np.float32).reshape(-1, 2)
        g["offsets"][:] = old + offsets
    for k, v in (attrs or {}).items():
        g.attrs[k] = v


def read_cells(
    f: h5py.File, region: int, patch: int | None = None
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Cells of one patch (``patch`` given) or of a whole region: (columns, embeddings (n, Dc))."""
    if GROUP not in f or "offsets" not in f[GROUP]:
        raise StoreError(f.filename, "no cells (run `hwsi extract` with cells enabled)")
    g = f[GROUP]
    G = int(g.attrs["grid_size"])
    R = int(g.attrs["n_regions"])
    if not 0 <= region < R or (patch is not None and not 0 <= patch < G):
        raise StoreError(f.filename, f"read_cells: region {region} / patch {patch} out of range (R={R}, G={G})")
    if patch is None:
        a, b = (int(v) for v in g["offsets"][region * G: region * G + G + 1][[0, -1]])
    else:
        a, b = (int(v) for v in g["offsets"][region * G + patch: region * G + patch + 2])
    cols = {k: g[k][a:b] for k in column_names(g)}
    return cols, g["embeddings"][a:b]


def read_contours(f: h5py.File, start: int = 0, stop: int | None = None) -> list[np.ndarray] | None:
    """The level-0 outlines ((k, 2) float64 each, k = 0 for none) of cell rows ``start:stop``; None in a store
    written without contours."""
    if GROUP not in f or CONTOUR_N not in f[GROUP] or CONTOUR_XY not in f[GROUP]:
        return None
    g = f[GROUP]
    counts = g[CONTOUR_N][:].astype(np.int64)
    stop = len(counts) if stop is None else stop
    ends = np.cumsum(counts)
    first = int(ends[start - 1]) if start > 0 else 0
    last = int(ends[stop - 1]) if stop > start else first
    xy = g[CONTOUR_XY][first:last].astype(np.float64)
    return np.split(xy, np.cumsum(counts[start:stop])[:-1]) if stop > start else []


def cell_counts(f: h5py.File) -> np.ndarray:
    """(R, G) number of cells of each patch."""
    g = f[GROUP]
    G = int(g.attrs["grid_size"])
    return np.diff(g["offsets"][:]).reshape(-1, G)
