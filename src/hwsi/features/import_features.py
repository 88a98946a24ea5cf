"""Import patch features computed by TRIDENT or CLAM into a slide store (docs/design.md §4, last paragraph).

Both tools write one HDF5 file per slide with

* ``features`` (N, D) float — one row per patch (CLAM may store (1, N, D) or (N, 1, D); squeezed here),
* ``coords`` (N, 2) int — the level-0 TOP-LEFT (x, y) of each patch.

Attributes on ``coords`` give the patch footprint when present: TRIDENT writes ``patch_size_level0`` (and
``patch_size``, ``target_magnification``...); CLAM writes ``patch_size`` and ``patch_level`` (and in patch files
``downsample``); the footprint is then ``patch_size × downsample`` (or ``patch_size`` at level 0).

Each foreign patch is matched to the patch of our grid (``patches/coords`` of the store, written by ``hwsi tile``)
whose top-left is nearest in Chebyshev distance, if that distance is at most ``tolerance`` × our level-0 patch side
(default 0.25). A footprint that differs from ours by more than ``size_rtol`` (5%) is an error: the features would
describe a different scale. Foreign patches without a match (outside our regions, or off-grid) are counted, as are
two foreign rows falling on one of our patches (the nearer wins).

Written: ``patches/<name>`` (R, G, D) float32, one region per chunk, zeros where no feature was matched;
``imported/<name>/matched`` (R, G) bool; the counts and the source as attributes of ``patches/<name>``; ``encoders``
attribute of the store updated. The store is updated atomically (copy, write, rename over).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import h5py  # the TRIDENT/CLAM features file only; the slide store is opened through hwsi.store
import numpy as np

from hwsi.errors import HwsiError, StoreError
from hwsi.store import SlideStore, update_store


class FeatureImportError(HwsiError):
    """A foreign features file cannot be read or does not fit the slide's store; names the file."""

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


@dataclass
class ForeignFeatures:
    """Contents of a TRIDENT/CLAM file: features (N, D) float32, coords (N, 2) int64 level-0 top-left."""

    features: np.ndarray
    coords: np.ndarray
    patch_size_level0: float | None
    source_format: str  # "trident" | "clam" | "unknown"
    attrs: dict[str, Any]


@dataclass
class ImportReport:
    """Outcome of :func:`import_features`."""

    name: str
    source: str
    source_format: str
    n_foreign: int
    n_matched: int
    n_unmatched: int
    n_duplicates: int
    n_tissue_missing: int
    dim: int
    foreign_patch_size_level0: float | None
    store_patch_size_level0: float

    def summary(self) -> str:
        return (
            f"{self.n_matched}/{self.n_foreign} foreign patches matched ({self.n_unmatched} unmatched, "
            f"{self.n_duplicates} duplicates); {self.n_tissue_missing} tissue patches without a feature"
        )


def _attr(v: Any) -> Any:
    if isinstance(v, bytes):
        return v.decode(errors="replace")
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, np.generic):
        return v.item()
    return v


def read_foreign_features(path: str | Path) -> ForeignFeatures:
    """Read ``features`` and ``coords`` (+ footprint attributes) of a TRIDENT or CLAM features ``.h5``."""
    path = Path(path)
    if not path.is_file():
        raise FeatureImportError(path, "features file not found")
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise FeatureImportError(path, f"not a readable HDF5 file ({exc})") from exc
    with f:
        missing = [k for k in ("features", "coords") if k not in f]
        if missing:
            raise FeatureImportError(path, f"missing dataset(s) {missing}; found {sorted(f.keys())} "
                                     "(expected a TRIDENT/CLAM features file with 'features' and 'coords')")
        feats = np.asarray(f["features"][()])
        coords = np.asarray(f["coords"][()])
        attrs = {k: _attr(v) for k, v in f["coords"].attrs.items()}
        file_attrs = {k: _attr(v) for k, v in f.attrs.items()}
    if feats.ndim == 3 and 1 in feats.shape[:2]:
        feats = feats.reshape(-1, feats.shape[-1]) if feats.shape[0] == 1 else feats[:, 0, :]
    if coords.ndim == 3 and coords.shape[0] == 1:
        coords = coords[0]
    if feats.ndim != 2:
        raise FeatureImportError(path, f"'features' must be (N, D), got shape {feats.shape}")
    if coords.ndim != 2 or coords.shape[1] != 2:
        raise FeatureImportError(path, f"'coords' must be (N, 2), got shape {coords.shape}")
    if len(coords) != len(feats):
        raise FeatureImportError(path, f"{len(feats)} feature rows but {len(coords)} coords")
    if not np.isfinite(feats).all():
        raise FeatureImportError(path, "'features' contain NaN or inf")
    size0: float | None = None
    fmt = "unknown"
    if "patch_size_level0" in attrs:
        size0, fmt = float(attrs["patch_size_level0"]), "trident"
    elif "patch_size" in attrs and ("patch_level" in attrs or "downsample" in attrs):
        fmt = "clam"
        ds = attrs.get("downsample")
        if ds is not None:
            ds_val = float(np.ravel(ds)[0])
            size0 = float(attrs["patch_size"]) * ds_val
        elif int(attrs["patch_level"]) == 0:
            size0 = float(attrs["patch_size"])
    elif "patch_size" in attrs:
        fmt = "clam"
    merged = {**file_attrs, **attrs}
    return ForeignFeatures(feats.astype(np.float32), np.rint(coords).astype(np.int64), size0, fmt, merged)


def match_coords(
    foreign: np.ndarray, ours: np.ndarray, max_dist: float
) -> tuple[np.ndarray, np.ndarray, int]:
    """Match foreign top-lefts (N, 2) to our flat patch top-lefts (M, 2) in Chebyshev distance ≤ ``max_dist``.

    Returns (target (N,) int64 index into ours or −1, distance (N,), number of duplicates dropped). When several
    foreign rows hit one of our patches, the nearest (then the first) keeps it.
    """
    from scipy.spatial import cKDTree

    n = len(foreign)
    target = np.full(n, -1, dtype=np.int64)
    dist = np.full(n, np.inf)
    if n == 0 or len(ours) == 0:
        return target, dist, 0
    tree = cKDTree(np.asarray(ours, dtype=np.float64))
    d, j = tree.query(np.asarray(foreign, dtype=np.float64), k=1, p=np.inf)
    ok = d <= max_dist
    target[ok] = j[ok]
    dist[ok] = d[ok]
    # resolve duplicates: order by (target, distance, row) and keep the first of each target
    idx = np.flatnonzero(ok)
    order = idx[np.lexsort((idx, dist[idx], target[idx]))]
    first = np.ones(len(order), dtype=bool)
    first[1:] = target[order][1:] != target[order][:-1]
    dup = order[~first]
    target[dup] = -1
    return target, dist, int(len(dup))


def import_features(
    store: str | Path,
    features_path: str | Path,
    name: str,
    *,
    tolerance: float = 0.25,
    size_rtol: float = 0.05,
    overwrite: bool = False,
) -> ImportReport:
    """Write the features of a TRIDENT/CLAM file as ``patches/<name>`` of ``store`` (see the module docstring)."""
    store = Path(store)
    if not name or "/" in name or name.startswith("_"):
        raise FeatureImportError(features_path, f"invalid feature name {name!r} (no '/', not starting with '_')")
    ff = read_foreign_features(features_path)
    with SlideStore(store) as s:
        meta = s.meta
        coords = s.patch_coords()
        tissue = s.patch_tissue()
        exists = s.has_features(name)
    if exists and not overwrite:
        raise StoreError(store, f"patches/{name} already exists (pass --overwrite to replace it)")
    if name in ("coords", "tissue"):
        raise FeatureImportError(features_path, f"feature name {name!r} is reserved")
    ours_size = float(meta.patch_size_level0)
    if ff.patch_size_level0 is not None and abs(ff.patch_size_level0 / ours_size - 1.0) > size_rtol:
        raise FeatureImportError(
            features_path,
            f"foreign patches are {ff.patch_size_level0:g} level-0 px but the store's are {ours_size:g} "
            f"(target {meta.target_mpp} µm/px, patch {meta.patch_size} px): re-tile with a matching patch size "
            "/ µm/px, or extract the features at this store's scale",
        )
    r, g = tissue.shape
    target, _, n_dup = match_coords(ff.coords, coords.reshape(-1, 2), tolerance * ours_size)
    d = ff.features.shape[1]
    out = np.zeros((r * g, d), dtype=np.float32)
    matched = np.zeros(r * g, dtype=bool)
    ok = target >= 0
    out[target[ok]] = ff.features[ok]
    matched[target[ok]] = True
    matched = matched.reshape(r, g)
    report = ImportReport(
        name=name,
        source=str(Path(features_path).resolve()),
        source_format=ff.source_format,
        n_foreign=len(ff.features),
        n_matched=int(ok.sum()),
        n_unmatched=int(len(ff.features) - ok.sum()),
        n_duplicates=n_dup,
        n_tissue_missing=int((tissue & ~matched).sum()),
        dim=d,
        foreign_patch_size_level0=ff.patch_size_level0,
        store_patch_size_level0=ours_size,
    )
    with update_store(store) as f:
        attrs = {k: "" if v is None else v for k, v in asdict(report).items()}
        f.write_features(name, out.reshape(r, g, d), {**attrs, "kind": "imported"})
        f.write_region_dataset(f"imported/{name}/matched", matched)
        f.set_encoder(name, d)
    return report
