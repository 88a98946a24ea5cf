"""Read access to a slide store: :class:`SlideStore`, opened read-only, schema version checked on open.

Every accessor returns numpy arrays in the layout of :mod:`hwsi.store.layout` (coordinates level-0 px (x, y)
int64); a missing dataset raises :class:`~hwsi.errors.StoreError` naming the file and the stage that writes it,
except where an accessor documents a fallback (``None`` or a derived array).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from hwsi.errors import StoreError
from hwsi.store.cells import GROUP as CELLS_GROUP
from hwsi.store.cells import cell_counts, read_cells, read_contours
from hwsi.store.layout import StoreMeta, attr_value, read_meta

# dataset names a tissue mask may have (the first present wins; `hwsi tile` writes tissue/mask)
MASK_DATASETS = ("tissue/mask", "tissue_mask", "mask/tissue", "masks/tissue", "tissue")


class SlideStore:
    """A finished store, read-only (``with SlideStore(path) as s:``); :attr:`meta` holds its attributes."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise StoreError(self.path, "no such store (run `hwsi tile` first)")
        try:
            self._f = h5py.File(self.path, "r")
        except OSError as exc:
            raise StoreError(self.path, f"not a readable HDF5 file ({exc})") from exc
        try:
            self.meta: StoreMeta = read_meta(self._f, self.path)
        except BaseException:
            self._f.close()
            raise

    def __enter__(self) -> SlideStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._f.close()

    # ---- attributes and datasets ---------------------------------------------------------------------------
    def attr(self, name: str, default: Any = None) -> Any:
        """A file attribute as a Python value (``default`` if absent)."""
        return attr_value(self._f.attrs[name]) if name in self._f.attrs else default

    def json_attr(self, name: str, default: Any = None) -> Any:
        """A JSON-encoded file attribute, decoded (``default`` if absent, empty or not JSON)."""
        raw = self.attr(name)
        if not raw:
            return default
        try:
            return json.loads(raw)
        except (TypeError, ValueError):
            return default

    def has(self, name: str) -> bool:
        """True if dataset or group ``name`` (e.g. ``"spf/selected"``) exists."""
        return name in self._f

    def dataset_info(self, name: str) -> tuple[tuple[int, ...], np.dtype, dict[str, Any]]:
        """(shape, dtype, attributes) of dataset ``name`` without reading it."""
        ds = self._require(name, "tile")
        return tuple(ds.shape), ds.dtype, {k: attr_value(v) for k, v in ds.attrs.items()}

    def datasets(self) -> dict[str, np.ndarray]:
        """Every dataset of the store by name (for comparing whole stores; reads everything)."""
        out: dict[str, np.ndarray] = {}
        self._f.visititems(lambda n, o: out.__setitem__(n, o[()]) if isinstance(o, h5py.Dataset) else None)
        return out

    def _require(self, name: str, stage: str) -> h5py.Dataset:
        if name not in self._f:
            raise StoreError(self.path, f"missing dataset {name!r} (run `hwsi {stage}`)")
        return self._f[name]

    @property
    def stages(self) -> list[str]:
        return list(self.meta.stages)

    # ---- grid (hwsi tile) ----------------------------------------------------------------------------------
    @property
    def n_regions(self) -> int:
        return int(self._require("regions/coords", "tile").shape[0])

    def region_coords(self) -> np.ndarray:
        """(R, 2) int64 top-left of each region."""
        return self._require("regions/coords", "tile")[:].astype(np.int64).reshape(-1, 2)

    def region_tissue(self) -> np.ndarray:
        """(R,) float32 tissue fraction of each region."""
        return self._require("regions/tissue", "tile")[:]

    def patch_coords(self) -> np.ndarray:
        """(R, G, 2) int64 top-left of each patch."""
        return self._require("patches/coords", "tile")[:].astype(np.int64)

    def patch_tissue(self) -> np.ndarray:
        """(R, G) bool: the patch counts as tissue."""
        return self._require("patches/tissue", "tile")[:].astype(bool)

    def patch_tissue_fraction(self) -> np.ndarray:
        """(R, G) float32 tissue fraction (0/1 from :meth:`patch_tissue` in stores written before it was kept)."""
        if "patches/tissue_fraction" in self._f:
            return self._f["patches/tissue_fraction"][:]
        return self.patch_tissue().astype(np.float32)

    def tissue_mask(self) -> tuple[np.ndarray, str] | None:
        """(mask > 0 as bool (h, w), dataset name) of the first 2-d dataset of :data:`MASK_DATASETS`, else None."""
        for name in MASK_DATASETS:
            if name in self._f and isinstance(self._f[name], h5py.Dataset) and self._f[name].ndim == 2:
                return self._f[name][:] > 0, name
        return None

    def thumbnail(self) -> tuple[np.ndarray, float]:
        """(thumbnail (h, w, 3) uint8, level-0 px per thumbnail px)."""
        ds = self._require("tissue/thumbnail", "tile")
        return ds[:], float(ds.attrs["downsample"])

    # ---- features (hwsi extract / hwsi import-features) ----------------------------------------------------
    def has_features(self, encoder: str) -> bool:
        return f"patches/{encoder}" in self._f

    def feature_dim(self, encoder: str) -> int:
        return int(self._features(encoder).shape[-1])

    def feature_dtype(self, encoder: str) -> str:
        """How ``patches/<encoder>`` is stored on disk: ``"float32"`` or ``"float16"`` (read back as float32)."""
        return str(self._features(encoder).dtype)

    def _features(self, encoder: str) -> h5py.Dataset:
        key = f"patches/{encoder}"
        if key not in self._f:
            raise StoreError(self.path, f"no patch features {encoder!r} (run `hwsi extract` with this encoder)")
        return self._f[key]

    def patch_features(self, encoder: str, regions: int | slice | np.ndarray | None = None) -> np.ndarray:
        """``patches/<encoder>`` (R, G, D) float32, or the rows ``regions`` (one chunk per region); a float16 store
        (``hwsi extract --feature-dtype float16``) is read back as float32 for compute."""
        ds = self._features(encoder)
        x = ds[:] if regions is None else ds[regions]
        return x if x.dtype == np.float32 else x.astype(np.float32)

    # ---- SPF (hwsi extract) --------------------------------------------------------------------------------
    def spf_selected(self) -> np.ndarray:
        """(R, k) int64 SPF-selected patch indices per region, -1 padded."""
        return self._require("spf/selected", "extract")[:].astype(np.int64)

    def spf_relevance(self) -> np.ndarray:
        """(R, G) float32 Eq. 2 relevance (NaN where not a candidate)."""
        return self._require("spf/relevance", "extract")[:].astype(np.float32)

    def spf_terms(self) -> list[str] | None:
        """The vocabulary terms SPF scored against (``spf/terms``), or None if not recorded."""
        if "spf/terms" not in self._f:
            return None
        return [t.decode() if isinstance(t, bytes) else str(t) for t in self._f["spf/terms"][:]]

    # ---- cells (hwsi extract) ------------------------------------------------------------------------------
    @property
    def has_cells(self) -> bool:
        return f"{CELLS_GROUP}/offsets" in self._f

    def cell_offsets(self) -> np.ndarray:
        """(R·G+1,) int64 CSR offsets: cells of patch (r, g) are rows ``offsets[r*G+g]:offsets[r*G+g+1]``."""
        return self._require(f"{CELLS_GROUP}/offsets", "extract")[:].astype(np.int64)

    def cell_dim(self) -> int:
        return int(self._require(f"{CELLS_GROUP}/embeddings", "extract").shape[-1])

    def cell_embeddings(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Rows ``start:stop`` of ``cells/embeddings`` (N, Dc) float32."""
        return self._require(f"{CELLS_GROUP}/embeddings", "extract")[start:stop]

    def has_cell_column(self, name: str) -> bool:
        return f"{CELLS_GROUP}/{name}" in self._f

    def cell_column(self, name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Rows ``start:stop`` of the per-cell column ``cells/<name>``."""
        return self._require(f"{CELLS_GROUP}/{name}", "extract")[start:stop]

    def cell_contours(self, start: int = 0, stop: int | None = None) -> list[np.ndarray] | None:
        """Level-0 nucleus outlines of cell rows ``start:stop`` ((k, 2) each, k = 0 for none); None in a store
        written without contours (see :mod:`hwsi.store.cells`)."""
        return read_contours(self._f, start, stop)

    def cells_attrs(self) -> dict[str, Any]:
        """Attributes of the ``cells`` group (backend, scope, type_names, ...); empty if there is none."""
        if CELLS_GROUP not in self._f:
            return {}
        return {k: attr_value(v) for k, v in self._f[CELLS_GROUP].attrs.items()}

    def cells_of(self, region: int, patch: int | None = None) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """Cells of one patch (or a whole region): (columns, embeddings (n, Dc))."""
        return read_cells(self._f, region, patch)

    def cell_counts(self) -> np.ndarray:
        """(R, G) number of cells of each patch."""
        return cell_counts(self._f)


def read_store_meta(path: str | Path) -> StoreMeta:
    """The attributes of the store at ``path`` (schema version checked)."""
    with SlideStore(path) as s:
        return s.meta
