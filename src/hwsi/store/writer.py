"""Write access to a slide store: :func:`new_store` (a fresh store, `hwsi tile`) and :func:`update_store` (a later
stage adds to a copy and renames it over the original), both yielding a :class:`StoreWriter`.

Either way the file on disk changes only when the ``with`` block succeeds (:func:`hwsi.utils.atomic.atomic_path`);
a failure or a kill leaves the original untouched.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from hwsi.errors import StoreError
from hwsi.store.cells import GROUP as CELLS_GROUP
from hwsi.store.cells import write_cells
from hwsi.store.layout import (
    FEATURE_DTYPES,
    FeatureDtype,
    StoreMeta,
    attr_value,
    check_schema,
    copy_for_update,
    create_region_dataset,
    mark_stage,
    write_meta,
    write_region_dataset,
)
from hwsi.utils.atomic import atomic_path


class StoreWriter:
    """An open store being written (only inside :func:`new_store` / :func:`update_store`)."""

    def __init__(self, f: h5py.File, path: Path) -> None:
        self._f = f
        self.path = path

    # ---- attributes ----------------------------------------------------------------------------------------
    def attr(self, name: str, default: Any = None) -> Any:
        return attr_value(self._f.attrs[name]) if name in self._f.attrs else default

    def json_attr(self, name: str, default: Any = None) -> Any:
        raw = self.attr(name)
        return json.loads(raw) if raw else default

    def set_attr(self, name: str, value: Any) -> None:
        self._f.attrs[name] = value

    def set_json_attr(self, name: str, value: Any) -> None:
        self._f.attrs[name] = json.dumps(value)

    def mark_stage(self, stage: str) -> None:
        mark_stage(self._f, stage)

    def drop_stage(self, stage: str) -> None:
        self.set_json_attr("stages", [s for s in self.json_attr("stages", []) if s != stage])

    def set_encoder(self, name: str, dim: int) -> None:
        """Record ``name -> dim`` in the ``encoders`` attribute (JSON dict)."""
        enc = json.loads(self._f.attrs.get("encoders", "{}"))
        enc[name] = int(dim)
        self._f.attrs["encoders"] = json.dumps(enc)

    def has(self, name: str) -> bool:
        return name in self._f

    # ---- grid and tissue (hwsi tile) -----------------------------------------------------------------------
    def write_grid(self, region_coords: np.ndarray, region_tissue: np.ndarray, patch_coords: np.ndarray,
                   patch_tissue: np.ndarray, patch_tissue_fraction: np.ndarray | None = None) -> None:
        """``regions/coords``, ``regions/tissue``, ``patches/coords``, ``patches/tissue`` (+ ``tissue_fraction``)."""
        write_region_dataset(self._f, "regions/coords", np.asarray(region_coords).astype(np.int64))
        if "regions/tissue" in self._f:
            del self._f["regions/tissue"]
        self._f.create_dataset("regions/tissue", data=np.asarray(region_tissue).astype(np.float32))
        write_region_dataset(self._f, "patches/coords", np.asarray(patch_coords).astype(np.int64))
        write_region_dataset(self._f, "patches/tissue", np.asarray(patch_tissue).astype(bool))
        if patch_tissue_fraction is not None:
            write_region_dataset(self._f, "patches/tissue_fraction",
                                 np.asarray(patch_tissue_fraction).astype(np.float32))

    def region_coords(self) -> np.ndarray:
        return self._f["regions/coords"][:]

    def set_patch_tissue(self, tissue: np.ndarray) -> None:
        """Overwrite ``patches/tissue`` in place (same shape)."""
        self._f["patches/tissue"][...] = tissue

    def write_tissue_mask(self, mask: np.ndarray, **attrs: Any) -> None:
        """``tissue/mask`` (h, w) uint8, gzip, with ``attrs`` (downsample, mpp, saturation_threshold)."""
        m = self._f.create_dataset("tissue/mask", data=np.asarray(mask).astype(np.uint8), compression="gzip")
        for k, v in attrs.items():
            m.attrs[k] = v

    def write_thumbnail(self, thumbnail: np.ndarray, downsample: float) -> None:
        """``tissue/thumbnail`` (h, w, 3) uint8, gzip; ``downsample`` level-0 px per thumbnail px."""
        t = self._f.create_dataset("tissue/thumbnail", data=thumbnail, compression="gzip")
        t.attrs["downsample"] = downsample

    # ---- features ------------------------------------------------------------------------------------------
    def create_features(self, encoder: str, shape: tuple[int, ...], dtype: FeatureDtype = "float32") -> h5py.Dataset:
        """Empty ``patches/<encoder>`` (R, G, D), one chunk per region; assign rows ``ds[r] = ...`` (float32 rows
        are rounded to ``dtype`` by HDF5). float16 halves the store; :meth:`SlideStore.patch_features` reads either
        as float32 (docs/devices.md)."""
        if dtype not in FEATURE_DTYPES:
            raise StoreError(self.path, f"patches/{encoder}: feature dtype must be float32 or float16, got {dtype!r}")
        return create_region_dataset(self._f, f"patches/{encoder}", shape, np.dtype(dtype))

    def write_features(self, encoder: str, data: np.ndarray, attrs: dict[str, Any] | None = None) -> None:
        """``patches/<encoder>`` (R, G, D) with dataset ``attrs``, replacing an earlier version (record it with
        :meth:`set_encoder`)."""
        ds = write_region_dataset(self._f, f"patches/{encoder}", data)
        for k, v in (attrs or {}).items():
            ds.attrs[k] = v

    def write_region_dataset(self, name: str, data: np.ndarray) -> None:
        """Any other per-region dataset (e.g. ``patches/corrupt``), chunked one region per chunk."""
        write_region_dataset(self._f, name, data)

    # ---- SPF -----------------------------------------------------------------------------------------------
    def write_spf(self, selected: np.ndarray, relevance: np.ndarray, *, kept_eq1: np.ndarray | None = None,
                  diverse: np.ndarray | None = None, tau: np.ndarray | None = None,
                  terms: list[str] | None = None, text_embeddings: np.ndarray | None = None,
                  attrs: dict[str, Any] | None = None) -> None:
        """The ``spf`` group (replacing an earlier one): ``selected`` (R, k), ``relevance`` (R, G) and, when given,
        ``kept_eq1``/``diverse`` (R, G), ``tau`` (R,), ``terms``, ``text_embeddings``, group ``attrs``."""
        if "spf" in self._f:
            del self._f["spf"]
        g = self._f.create_group("spf")
        g.create_dataset("selected", data=selected)
        for name, arr in (("relevance", relevance), ("kept_eq1", kept_eq1), ("diverse", diverse)):
            if arr is not None:
                g.create_dataset(name, data=arr, chunks=(1, arr.shape[1]) if arr.shape[0] else None)
        if tau is not None:
            g.create_dataset("tau", data=tau)
        if terms is not None:
            g.create_dataset("terms", data=np.array(terms, dtype=h5py.string_dtype()))
        if text_embeddings is not None:
            g.create_dataset("text_embeddings", data=text_embeddings)
        g.attrs.update(attrs or {})

    # ---- cells ---------------------------------------------------------------------------------------------
    @property
    def has_cells(self) -> bool:
        return CELLS_GROUP in self._f

    def delete_cells(self) -> None:
        if CELLS_GROUP in self._f:
            del self._f[CELLS_GROUP]

    def write_cells(self, columns: dict[str, np.ndarray], embeddings: np.ndarray, offsets: np.ndarray, *,
                    grid_size: int, append: bool = False, attrs: dict[str, Any] | None = None) -> None:
        """Write (or extend) ``cells/*``: see :func:`hwsi.store.cells.write_cells`."""
        write_cells(self._f, columns, embeddings, offsets, grid_size=grid_size, append=append, attrs=attrs)

    def set_cells_attrs(self, **attrs: Any) -> None:
        for k, v in attrs.items():
            self._f[CELLS_GROUP].attrs[k] = v


@contextlib.contextmanager
def new_store(path: str | Path, meta: StoreMeta) -> Iterator[StoreWriter]:
    """Write a new store at ``path`` (schema version, hwsi version and ``meta`` as attributes); atomic."""
    path = Path(path)
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        write_meta(f, meta)
        yield StoreWriter(f, path)


@contextlib.contextmanager
def update_store(path: str | Path) -> Iterator[StoreWriter]:
    """Open a COPY of the finished store ``path`` for writing; rename it over ``path`` when the block succeeds.

    A failure (or a kill) leaves the original untouched and only a ``*.tmp-<pid>`` file behind (deleted on error).
    """
    path = Path(path)
    if not path.is_file():
        raise StoreError(path, "no such store (run `hwsi tile` first)")
    with atomic_path(path) as tmp:
        copy_for_update(path, tmp)
        with h5py.File(tmp, "r+") as f:
            check_schema(f, path)
            yield StoreWriter(f, path)
