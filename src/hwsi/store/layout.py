"""Layout and attributes of the per-slide HDF5 feature store (docs/design.md §4). Lowest layer: imports nothing
else from hwsi but errors/utils.

Layout (schema version :data:`SCHEMA_VERSION`; all coordinates are level-0 pixels, (x, y), int64)::

    attrs: schema_version, hwsi_version, slide_path, slide_id, mpp_level0, target_mpp, effective_mpp,
           region_size, patch_size, region_size_level0, patch_size_level0, level0_width, level0_height,
           read_level, read_downsample, stages (JSON list of completed stages), encoders (JSON dict name->dim)
    regions/coords      (R, 2)    int64   top-left of each region
    regions/tissue      (R,)      float32 tissue fraction of the region
    patches/coords      (R, G, 2) int64   G = (region_size/patch_size)^2, row-major inside the region
    patches/tissue      (R, G)    bool    patch counts as tissue
    patches/<encoder>   (R, G, D) float32 frozen features, chunked one region per chunk (or float16: hwsi extract
                                          --feature-dtype float16; read back as float32, docs/devices.md)
    spf/relevance       (R, G)    float32 Eq. 2 relevance r_ij (NaN where not a candidate)
    spf/selected        (R, k)    int32   selected patch indices per region, -1 padded
    cells/<column>      (N,)      columnar per-cell table, sorted by (region, patch)
    cells/offsets       (R*G+1,)  int64   CSR offsets: cells of patch (r, g) are rows offsets[r*G+g]:offsets[r*G+g+1]
    cells/embeddings    (N, Dc)   float32 c_ijk

    tissue/mask         (h, w)    uint8   tissue mask of `hwsi tile` (attrs downsample, mpp, saturation_threshold)
    tissue/thumbnail    (h, w, 3) uint8   slide thumbnail (attr downsample: level-0 px per thumbnail px)

Sizes: ``region_size``/``patch_size`` are pixels at the target µm/px (``*_px_target`` in code that also holds
level-0 sizes); ``region_size_level0``/``patch_size_level0`` are level-0 pixels.

A store is written to a temporary name and renamed when complete (:func:`hwsi.utils.atomic.atomic_path`);
later stages add to a copy and rename it over the original, so a killed run never leaves a half-written store.
This module holds the layout and the attribute codec; :mod:`hwsi.store.reader` / :mod:`hwsi.store.writer` open
stores (nothing outside :mod:`hwsi.store` opens one with h5py).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import h5py
import numpy as np

from hwsi import __version__
from hwsi.errors import StoreError

SCHEMA_VERSION = 1
STORE_SUFFIX = ".h5"
#: dtypes patch features are stored in (every reader returns float32)
FeatureDtype = Literal["float32", "float16"]
FEATURE_DTYPES: tuple[str, ...] = get_args(FeatureDtype)


class RegionGridShape:
    """``grid_side`` / ``patches_per_region`` of a class with ``region_size`` and ``patch_size`` (pixels at the
    target µm/px): shared by :class:`StoreMeta` and :class:`hwsi.slide.grid.Grid`."""

    region_size: int
    patch_size: int

    @property
    def grid_side(self) -> int:
        return self.region_size // self.patch_size

    @property
    def patches_per_region(self) -> int:
        return self.grid_side**2


@dataclass
class StoreMeta(RegionGridShape):
    """File attributes of a store. Resolution is µm per pixel; sizes are pixels."""

    slide_path: str
    slide_id: str
    mpp_level0: float
    target_mpp: float
    effective_mpp: float
    region_size: int
    patch_size: int
    region_size_level0: float
    patch_size_level0: float
    level0_width: int
    level0_height: int
    read_level: int = 0
    read_downsample: float = 1.0
    mpp_source: str = ""
    stages: list[str] = field(default_factory=list)
    encoders: dict[str, int] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


# the geometry a store shares with :class:`hwsi.slide.grid.Grid` (same names, same units): copied by name
GRID_FIELDS = ("mpp_level0", "target_mpp", "effective_mpp", "region_size", "patch_size", "region_size_level0",
               "patch_size_level0", "level0_width", "level0_height", "read_level", "read_downsample")


def grid_fields(obj: Any) -> dict[str, Any]:
    """The :data:`GRID_FIELDS` of a Grid or a :class:`StoreMeta`, by name."""
    return {name: getattr(obj, name) for name in GRID_FIELDS}


_JSON_ATTRS = ("stages", "encoders", "extra")


def write_meta(f: h5py.File, meta: StoreMeta) -> None:
    f.attrs["schema_version"] = SCHEMA_VERSION
    f.attrs["hwsi_version"] = __version__
    for k, v in asdict(meta).items():
        f.attrs[k] = json.dumps(v) if k in _JSON_ATTRS else v


def check_schema(f: h5py.File, path: str | Path = "") -> None:
    """Raise :class:`StoreError` naming the file unless it records this hwsi's :data:`SCHEMA_VERSION`."""
    version = int(f.attrs.get("schema_version", -1))
    if version != SCHEMA_VERSION:
        raise StoreError(path or f.filename, f"schema_version {version}, this hwsi reads {SCHEMA_VERSION}")


def read_meta(f: h5py.File, path: str | Path = "") -> StoreMeta:
    check_schema(f, path)
    kw: dict[str, Any] = {}
    for name in StoreMeta.__dataclass_fields__:
        if name not in f.attrs:
            if name in _JSON_ATTRS or name in ("read_level", "read_downsample", "mpp_source"):
                continue
            raise StoreError(path or f.filename, f"missing attribute {name!r}")
        v = f.attrs[name]
        if name in _JSON_ATTRS:
            v = json.loads(v)
        elif isinstance(v, np.generic):
            v = v.item()
        elif isinstance(v, bytes):
            v = v.decode()
        kw[name] = v
    return StoreMeta(**kw)


def store_path(job: str | Path, slide_id: str) -> Path:
    """Where the store of ``slide_id`` lives in a job folder."""
    return Path(job) / "stores" / f"{slide_id}{STORE_SUFFIX}"


def list_stores(job: str | Path) -> list[Path]:
    return sorted((Path(job) / "stores").glob(f"*{STORE_SUFFIX}"))


def has_stage(path: str | Path, stage: str) -> bool:
    """True if the store exists, is readable, and records ``stage`` as complete."""
    path = Path(path)
    if not path.is_file():
        return False
    try:
        with h5py.File(path, "r") as f:
            return stage in json.loads(f.attrs.get("stages", "[]"))
    except (OSError, ValueError):
        return False


def attr_value(v: Any) -> Any:
    """An HDF5 attribute as a Python value (bytes decoded, numpy scalars unwrapped)."""
    if isinstance(v, bytes):
        return v.decode(errors="replace")
    if isinstance(v, np.generic):
        return v.item()
    return v


def mark_stage(f: h5py.File, stage: str) -> None:
    stages = json.loads(f.attrs.get("stages", "[]"))
    if stage not in stages:
        stages.append(stage)
    f.attrs["stages"] = json.dumps(stages)


def write_region_dataset(f: h5py.File, name: str, data: np.ndarray) -> h5py.Dataset:
    """Create ``name`` chunked one region (first axis) per chunk, replacing any earlier version."""
    if name in f:
        del f[name]
    chunks = (1, *data.shape[1:]) if data.ndim >= 2 and data.shape[0] > 0 else None
    return f.create_dataset(name, data=data, chunks=chunks)


def create_region_dataset(f: h5py.File, name: str, shape: tuple[int, ...], dtype: Any) -> h5py.Dataset:
    """Empty dataset chunked one region per chunk, for streaming writes."""
    if name in f:
        del f[name]
    chunks = (1, *shape[1:]) if len(shape) >= 2 and shape[0] > 0 else None
    return f.create_dataset(name, shape=shape, dtype=dtype, chunks=chunks)


def copy_for_update(src: str | Path, tmp: str | Path) -> None:
    """Copy a finished store to a temporary path so a later stage can add to it and rename it back."""
    shutil.copyfile(src, tmp)
