"""Ingest of a CellViT run (docs/design.md §5 "Cells", backend b): detections + per-cell token embeddings.

Formats read (facts about CellViT's outputs, re-implemented here; all coordinates are level-0 pixels):

* ``cells.json`` / ``cell_detection.json``: ``{"wsi_metadata": {...}, "type_map": {"0": "Background", ...},
  "cells": [cell, ...]}`` or a bare list of cells. A cell is ``{"bbox": [[r0, c0], [r1, c1]], "centroid": [x, y],
  "contour": [[x, y], ...], "type": int, "type_prob": float, ...}`` (``cell_detection.json`` has no contour).
  The centroid is (x, y); CellViT's bbox is (row, col) corners and is kept as given. A missing centroid is taken
  from the contour mean, then from the bbox centre.
* ``cells.geojson`` / ``cell_detection.geojson``: a list of GeoJSON Features, one per cell type, with
  ``geometry`` MultiPolygon (contours) or MultiPoint (centroids) and ``properties.classification.name``.
  These group cells by type, so their order cannot be matched to embeddings (refused with embeddings).
* embeddings: ``cells.pt`` — a tensor (N, D), a dict with one of ``x``/``cell_tokens``/``embeddings``/``tokens``/
  ``features`` (and optional ``positions``), or CellViT's pickled graph object (a torch-geometric ``Data`` subclass
  with ``x`` = tokens and ``positions``), read WITHOUT torch-geometric by a restricted unpickler that only builds
  tensors and plain containers; or ``.npy`` (N, D). 384-d for CellViT-256, 1280-d for CellViT-SAM-H.
"""

from __future__ import annotations

import io
import json
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hwsi.errors import HwsiError


class CellVitError(HwsiError):
    """A CellViT output file is missing, malformed or inconsistent with its companion file."""

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


KNOWN_DIMS = {384: "CellViT-256", 1280: "CellViT-SAM-H"}
_TOKEN_KEYS = ("x", "cell_tokens", "embeddings", "tokens", "features")


@dataclass
class CellVitCells:
    """Cells of a CellViT run, level-0 coordinates. ``embeddings`` is None when no token file was given."""

    centroids: np.ndarray  # (N, 2) float64 x, y
    types: np.ndarray  # (N,) int16
    type_prob: np.ndarray  # (N,) float32
    type_map: dict[int, str]
    bbox: np.ndarray | None = None  # (N, 2, 2) as in the file (CellViT: (row, col) corners)
    contours: list[np.ndarray] | None = None  # N arrays (k, 2) x, y
    embeddings: np.ndarray | None = None  # (N, D) float32
    source: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.centroids.shape[0])

    @property
    def table(self) -> dict[str, np.ndarray]:
        """Columnar table (x, y level-0, type, type_prob), the shape :func:`hwsi.store.rows_to_columns` takes."""
        return {"x": self.centroids[:, 0], "y": self.centroids[:, 1], "type": self.types, "type_prob": self.type_prob}


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise CellVitError(path, "no such file")
    if path.suffix == ".snappy":
        raise CellVitError(path, "snappy-compressed CellViT output is not supported; rerun CellViT without "
                                 "compression or decompress it to plain JSON first")
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CellVitError(path, f"not valid JSON ({exc})") from exc


def _type_map(raw: Any) -> dict[int, str]:
    if not isinstance(raw, dict):
        return {}
    out: dict[int, str] = {}
    for k, v in raw.items():
        # CellViT writes {"0": "Background", ...}; accept the inverse {"Background": 0} as well
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out[int(v)] = str(k)
        else:
            try:
                out[int(k)] = str(v)
            except ValueError:
                continue
    return out


def _cells_from_list(path: Path, cells: list, type_map: dict[int, str], meta: dict) -> CellVitCells:
    n = len(cells)
    cent = np.zeros((n, 2), dtype=np.float64)
    types = np.zeros(n, dtype=np.int16)
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
            types[i] = int(c.get("type", 0))
            prob[i] = float(c.get("type_prob", 1.0))
        except (TypeError, ValueError) as exc:
            raise CellVitError(path, f"cell {i} is malformed ({exc})") from exc
        contours.append(con)
        any_contour |= len(con) > 0
    if not np.isfinite(cent).all():
        raise CellVitError(path, "non-finite centroid coordinates")
    return CellVitCells(cent, types, prob, type_map, bbox if np.isfinite(bbox).any() else None,
                        contours if any_contour else None, None, str(path), meta)


def _cells_from_geojson(path: Path, feats: list) -> CellVitCells:
    cents: list[np.ndarray] = []
    types: list[np.ndarray] = []
    contours: list[np.ndarray] = []
    names: dict[str, int] = {}
    for j, ft in enumerate(feats):
        try:
            geom = ft["geometry"]
            props = ft.get("properties", {})
            cls = props.get("classification", {}).get("name", "unknown") if isinstance(props, dict) else "unknown"
            t = names.setdefault(str(cls), len(names))
            gtype = geom["type"]
            coords = geom["coordinates"]
            if gtype == "MultiPoint":
                pts = np.asarray(coords, dtype=np.float64).reshape(-1, 2)
                cents.append(pts)
                contours.extend(np.zeros((0, 2)) for _ in range(len(pts)))
            elif gtype == "Point":
                cents.append(np.asarray(coords, dtype=np.float64).reshape(1, 2))
                contours.append(np.zeros((0, 2)))
            elif gtype in ("MultiPolygon", "Polygon"):
                polys = coords if gtype == "MultiPolygon" else [coords]
                pts = []
                for poly in polys:
                    ring = np.asarray(poly[0], dtype=np.float64).reshape(-1, 2)
                    if len(ring) > 1 and np.array_equal(ring[0], ring[-1]):
                        ring = ring[:-1]
                    pts.append(ring.mean(axis=0))
                    contours.append(ring)
                cents.append(np.asarray(pts, dtype=np.float64).reshape(-1, 2))
            else:
                raise CellVitError(path, f"feature {j}: unsupported geometry {gtype!r}")
            types.append(np.full(len(cents[-1]), t, dtype=np.int16))
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise CellVitError(path, f"feature {j} is not a CellViT GeoJSON feature ({exc})") from exc
    cent = np.concatenate(cents) if cents else np.zeros((0, 2))
    ty = np.concatenate(types) if types else np.zeros(0, np.int16)
    has_contours = any(len(c) for c in contours)
    return CellVitCells(cent, ty, np.ones(len(cent), np.float32), {v: k for k, v in names.items()}, None,
                        contours if has_contours else None, None, str(path), {"grouped_by_type": True})


def read_cellvit_cells(path: str | Path) -> CellVitCells:
    """Read ``cells.json``, ``cell_detection.json`` or their ``.geojson`` variants (see the module docstring)."""
    path = Path(path)
    data = _read_json(path)
    if isinstance(data, dict) and data.get("type") == "FeatureCollection":
        data = data.get("features", [])
    if isinstance(data, list) and data and isinstance(data[0], dict) and "geometry" in data[0]:
        return _cells_from_geojson(path, data)
    if isinstance(data, dict):
        if "cells" not in data or not isinstance(data["cells"], list):
            raise CellVitError(path, "expected a list of cells or an object with a \"cells\" list")
        meta = data.get("wsi_metadata", {}) if isinstance(data.get("wsi_metadata"), dict) else {}
        return _cells_from_list(path, data["cells"], _type_map(data.get("type_map")), meta)
    if isinstance(data, list):
        return _cells_from_list(path, data, {}, {})
    raise CellVitError(path, f"expected a list of cells or an object, got {type(data).__name__}")


# --- embeddings --------------------------------------------------------------------------------------------
class _Opaque:
    """Stand-in for a class that is not loaded (e.g. torch-geometric's Data): keeps its state, runs nothing."""

    _args: tuple = ()
    _state: Any = None  # objects rebuilt by copyreg skip __init__

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._args = args
        self._state: Any = kwargs or None

    def __setstate__(self, state: Any) -> None:
        self._state = state

    def __setitem__(self, key: Any, value: Any) -> None:  # dict-like subclasses rebuilt item by item
        if not isinstance(self._state, dict):
            self._state = {}
        self._state[key] = value


_ALLOWED_TORCH = ("torch._utils", "torch._tensor", "torch.storage", "torch.serialization")


def _restricted_pickle_module() -> Any:
    import torch

    class Unpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            if module.startswith(_ALLOWED_TORCH) and (name.startswith("_rebuild") or name.endswith("Storage")):
                return super().find_class(module, name)
            if module == "torch" and (name.endswith("Storage") or name in ("Size", "device", "Tensor")
                                      or isinstance(getattr(torch, name, None), torch.dtype)):
                return super().find_class(module, name)
            if module == "collections" and name == "OrderedDict":
                return super().find_class(module, name)
            if module in ("copyreg", "copy_reg") and name in ("_reconstructor", "__newobj__"):
                return super().find_class(module, name)
            if module == "builtins" and name in ("object", "dict", "list", "tuple", "set", "frozenset"):
                return super().find_class(module, name)
            return type(name, (_Opaque,), {"__module__": f"_opaque.{module}"})

    class Module:
        pass

    mod = Module()
    mod.Unpickler = Unpickler  # type: ignore[attr-defined]
    mod.load = lambda fh, **kw: Unpickler(fh, **kw).load()  # type: ignore[attr-defined]
    mod.__name__ = "hwsi_restricted_pickle"  # type: ignore[attr-defined]
    return mod


def _find_tokens(obj: Any, depth: int = 0) -> tuple[Any, Any]:
    """(tokens, positions) found in a loaded object: a tensor/array, a dict, or an opaque object's state."""
    import torch

    if depth > 6:
        return None, None
    if isinstance(obj, (torch.Tensor, np.ndarray)):
        return obj, None
    if isinstance(obj, _Opaque):
        return _find_tokens(obj._state, depth + 1)
    if isinstance(obj, dict):
        for k in _TOKEN_KEYS:
            v = obj.get(k)
            if isinstance(v, (torch.Tensor, np.ndarray)) and v.ndim == 2:
                return v, obj.get("positions")
        for v in obj.values():
            if isinstance(v, (dict, _Opaque)):
                t, p = _find_tokens(v, depth + 1)
                if t is not None:
                    return t, p
    return None, None


def read_cell_embeddings(path: str | Path) -> tuple[np.ndarray, np.ndarray | None]:
    """Read per-cell token embeddings → (tokens (N, D) float32, positions (N, 2) or None)."""
    path = Path(path)
    if not path.is_file():
        raise CellVitError(path, "no such file")
    if path.suffix == ".npy":
        try:
            arr = np.load(path, allow_pickle=False)
        except ValueError as exc:
            raise CellVitError(path, f"not a plain .npy array ({exc})") from exc
        tokens, positions = arr, None
    else:
        import torch

        raw = path.read_bytes()
        try:
            obj = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
        except Exception:  # noqa: BLE001 - a pickled CellViT graph object: retry with the restricted unpickler
            try:
                obj = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=False,
                                 pickle_module=_restricted_pickle_module())
            except Exception as exc:  # noqa: BLE001
                raise CellVitError(path, f"not a readable torch file ({type(exc).__name__}: {exc})") from exc
        tokens, positions = _find_tokens(obj)
        if tokens is None:
            raise CellVitError(path, f"no (N, D) token tensor found (looked for a tensor or keys {list(_TOKEN_KEYS)})")
    tokens = np.asarray(tokens.detach().cpu().numpy() if hasattr(tokens, "detach") else tokens)
    if tokens.ndim != 2:
        raise CellVitError(path, f"token embeddings must be (N, D), got shape {tokens.shape}")
    if not np.issubdtype(tokens.dtype, np.floating) or not np.isfinite(tokens).all():
        raise CellVitError(path, "token embeddings must be finite floats")
    if positions is not None:
        positions = np.asarray(positions.detach().cpu().numpy() if hasattr(positions, "detach") else positions,
                               dtype=np.float64)
        if positions.shape != (len(tokens), 2):
            raise CellVitError(path, f"positions shape {positions.shape} does not match {len(tokens)} tokens")
    return tokens.astype(np.float32), positions


def load_cellvit(cells_path: str | Path, embeddings_path: str | Path | None = None,
                 expected_dim: int | None = None) -> CellVitCells:
    """Read a CellViT run: cells (+ token embeddings, checked for one token per cell, in order).

    Raises :class:`CellVitError` naming the file when counts differ, when the cells file groups cells by type
    (GeoJSON, no order to match tokens to), or when ``expected_dim`` is given and differs.
    """
    cells = read_cellvit_cells(cells_path)
    if embeddings_path is None:
        return cells
    if cells.metadata.get("grouped_by_type"):
        raise CellVitError(cells_path, "GeoJSON groups cells by type, so tokens cannot be matched to cells; "
                                       "use cells.json with cells.pt")
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
