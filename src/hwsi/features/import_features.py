"""Import patch features computed by TRIDENT or CLAM into a slide store (docs/formats-features.md; docs/design.md §4).

Layouts read (attributes: :mod:`hwsi.features.import_layouts`):

* TRIDENT features ``.h5``: ``features`` (N, D) (``(0,)`` for a slide without tissue), ``coords`` (N, 2) level-0
  top-lefts with the patching attributes; ``features`` attrs ``name``, ``savetodir``, ``encoder``.
* CLAM features ``.h5`` (``extract_features_fp.py``): ``features`` (N, D) float32 and ``coords`` (N, 2) int32,
  chunked by 32 rows, NO attributes. The footprint comes from CLAM's patches file (``--patches``), from
  ``--patch-size-level0``, or is assumed equal to the coordinates' grid step (said so in the report).
* ``.pt`` features (CLAM ``pt_files/``, TRIDENT ``saveas='pt'``): no coordinates, so the patches file is required.

Each foreign patch is matched to the store's patch (``patches/coords``, written by ``hwsi tile``) whose centre is
nearest in Chebyshev distance, if that distance is at most ``tolerance`` × the store's level-0 patch side (default
0.25). Fewer than ``min_matched`` (default 0.5) of the foreign patches matched fails the slide, saying why
(:func:`hwsi.features.import_match.diagnose`). A footprint differing from the store's by more than ``size_rtol``
(5%) is refused, unless TRIDENT's magnification rule explains it (then accepted, and the effective µm/px recorded).

Written: ``patches/<name>`` (R, G, D) float32, zeros where no feature was matched; ``imported/<name>/matched``
(R, G) bool; the :class:`ImportReport` as attributes of ``patches/<name>``; ``encoders`` attribute of the store.
The store is updated atomically (copy, write, rename over).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import h5py  # the TRIDENT/CLAM files only; the slide store is opened through hwsi.store
import numpy as np

from hwsi.errors import StoreError
from hwsi.features.import_config import ImportConfig
from hwsi.features.import_layouts import (
    FeatureImportError,
    Footprint,
    ScaleRule,
    SourceFormat,
    attr_value,
    check_coords,
    detect_format,
    footprint_from_attrs,
    read_pt_features,
    squeeze_features,
    trident_magnification,
)
from hwsi.features.import_match import GridFacts, diagnose, grid_step, match_coords, px
from hwsi.store import SlideStore, StoreMeta, update_store

__all__ = ["FeatureImportError", "ForeignFeatures", "ImportConfig", "ImportReport", "import_features",
           "match_coords", "read_foreign_features"]


@dataclass
class ForeignFeatures:
    """Contents of a TRIDENT/CLAM file: features (N, D) float32, coords (N, 2) int64 level-0 top-left."""

    features: np.ndarray
    coords: np.ndarray
    footprint: Footprint
    source_format: SourceFormat
    attrs: dict[str, Any]
    patches_file: str = ""
    encoder: str = ""

    @property
    def patch_size_level0(self) -> float | None:
        return self.footprint.size_level0


@dataclass
class ImportReport:
    """Outcome of :func:`import_features` (also written as attributes of ``patches/<name>``)."""

    name: str
    source: str
    source_format: str
    patches_file: str
    n_foreign: int
    n_matched: int
    n_unmatched: int
    n_duplicates: int
    n_tissue_missing: int
    dim: int
    foreign_patch_size_level0: float | None
    footprint_source: str
    store_patch_size_level0: float
    scale_rule: ScaleRule
    foreign_effective_mpp: float | None  # µm/px of the pixels the foreign encoder saw, on this slide
    store_effective_mpp: float
    min_matched: float
    encoder: str
    written: bool

    def summary(self) -> str:
        if self.n_foreign == 0:
            what = "nothing written" if not self.written else f"patches/{self.name} all zeros"
            return (f"no patches in the file (the tool found no tissue): {what}; {self.n_tissue_missing} tissue "
                    "patches without a feature")
        scale = ""
        if self.foreign_patch_size_level0 is not None:
            scale = f"; footprint {self.foreign_patch_size_level0:g} level-0 px ({self.footprint_source})"
            if self.scale_rule == "trident-magnification":
                scale += ", accepted by TRIDENT's magnification rule"
            if self.foreign_effective_mpp is not None:
                scale += f", effective {self.foreign_effective_mpp:.4g} µm/px"
        return (f"{self.n_matched}/{self.n_foreign} foreign patches matched ({self.n_unmatched} unmatched, "
                f"{self.n_duplicates} duplicates); {self.n_tissue_missing} tissue patches without a feature{scale}")


def _read_h5(path: Path, *, need_features: bool) -> dict[str, Any]:
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise FeatureImportError(path, f"not a readable HDF5 file ({exc})") from exc
    with f:
        wanted = ("features", "coords") if need_features else ("coords",)
        missing = [k for k in wanted if k not in f or not isinstance(f[k], h5py.Dataset)]
        if missing == ["features"] and detect_format({k: attr_value(v) for k, v in f["coords"].attrs.items()}) \
                != "unknown":
            raise FeatureImportError(path, "a patches file (coordinates only, no 'features'): give it with --patches "
                                           "and the features file of the same slide as FEATURES (CLAM: "
                                           "FEAT/h5_files/<slide>.h5, TRIDENT: features_<encoder>/<slide>.h5)")
        if missing:
            what = ("a TRIDENT/CLAM features file with 'features' and 'coords'" if need_features
                    else "a CLAM/TRIDENT patches file with 'coords'")
            raise FeatureImportError(path, f"missing dataset(s) {missing}; found {sorted(f.keys())} (expected {what})")
        out: dict[str, Any] = {
            "coords": np.asarray(f["coords"][()]),
            "coords_attrs": {k: attr_value(v) for k, v in f["coords"].attrs.items()},
            "file_attrs": {k: attr_value(v) for k, v in f.attrs.items()},
            "has_features": "features" in f,
        }
        if need_features:
            ds = f["features"]
            out["features"] = np.asarray(ds[()])
            out["features_attrs"] = {k: attr_value(v) for k, v in ds.attrs.items()}
            out["coords_dtype"] = f["coords"].dtype
    return out


def resolve_patches_file(patches: str | Path, features_path: Path) -> Path:
    """``patches`` itself if a file, else the patches file of ``features_path``'s slide in that folder:
    ``<stem>.h5`` (CLAM ``patches/``), ``<stem>_patches.h5`` (TRIDENT ``patches/``), or either under ``patches/``."""
    p = Path(patches)
    if p.is_file():
        return p
    if not p.is_dir():
        raise FeatureImportError(p, "patches file or folder not found (--patches)")
    stem = features_path.stem
    tried = [p / f"{stem}.h5", p / f"{stem}_patches.h5", p / "patches" / f"{stem}.h5",
             p / "patches" / f"{stem}_patches.h5"]
    for t in tried:
        if t.is_file():
            return t
    raise FeatureImportError(p, f"no patches file for {features_path.name} (looked for "
                                f"{', '.join(str(t.relative_to(p)) for t in tried)})")


def _same_rows(a: np.ndarray, b: np.ndarray) -> bool:
    if a.shape != b.shape:
        return False
    return bool(np.array_equal(a[np.lexsort(a.T[::-1])], b[np.lexsort(b.T[::-1])]))


def read_foreign_features(path: str | Path, patches: str | Path | None = None,
                          patch_size_level0: float | None = None) -> ForeignFeatures:
    """Read a TRIDENT / CLAM features ``.h5`` or ``.pt`` (+ its patches file, + a stated footprint)."""
    path = Path(path)
    if not path.is_file():
        raise FeatureImportError(path, "features file not found")
    if path.suffix == ".pt":
        if patches is None:
            raise FeatureImportError(path, "a .pt features file has no coordinates: give the patches .h5 of the "
                                           "same run with --patches (CLAM: RESULTS/patches/, TRIDENT: .../patches/)")
        raw: dict[str, Any] = {"features": read_pt_features(path), "coords": None, "coords_attrs": {},
                               "file_attrs": {}, "features_attrs": {}}
    else:
        raw = _read_h5(path, need_features=True)
    feats = squeeze_features(path, raw["features"])
    coords = None if raw["coords"] is None else check_coords(path, raw["coords"])
    attrs = {**raw["file_attrs"], **raw["coords_attrs"]}
    fmt = detect_format(raw["coords_attrs"])
    footprint = footprint_from_attrs(raw["coords_attrs"], path.name)
    patches_file = ""
    if patches is not None:
        pf = resolve_patches_file(patches, path)
        patches_file = str(pf)
        praw = _read_h5(pf, need_features=False)
        pcoords = check_coords(pf, praw["coords"])
        if coords is None:
            if len(pcoords) != len(feats):
                raise FeatureImportError(path, f"{len(feats)} feature rows but the patches file {pf} has "
                                               f"{len(pcoords)} coords: not the same patching run")
            coords = pcoords
        elif not _same_rows(coords, pcoords):
            raise FeatureImportError(path, f"its {len(coords)} coords are not those of the patches file {pf} "
                                           f"({len(pcoords)} coords): not the same slide or patching run")
        attrs = {**praw["coords_attrs"], **attrs}
        if fmt == "unknown":
            fmt = detect_format(praw["coords_attrs"])
        footprint = footprint or footprint_from_attrs(praw["coords_attrs"], f"patches file {pf.name}")
    assert coords is not None
    if len(coords) != len(feats) and not (len(feats) == 0 and len(coords) == 0):
        raise FeatureImportError(path, f"{len(feats)} feature rows but {len(coords)} coords")
    bare = not (raw["coords_attrs"] or raw["features_attrs"] or raw["file_attrs"])
    if fmt == "unknown" and bare and np.issubdtype(raw.get("coords_dtype", np.float64), np.integer):
        fmt = "clam"  # CLAM's save_hdf5(..., attr_dict=None): integer coords, no attribute anywhere
    footprint = _settle_footprint(path, footprint, patch_size_level0, coords)
    encoder = raw["features_attrs"].get("encoder", "")
    return ForeignFeatures(feats, coords, footprint, fmt, attrs, patches_file,
                           "" if encoder in (None, "None") else str(encoder))


def _settle_footprint(path: Path, fp: Footprint | None, stated: float | None, coords: np.ndarray) -> Footprint:
    if stated is not None:
        if fp is not None and fp.size_level0 is not None and abs(fp.size_level0 / stated - 1) > 0.05:
            raise FeatureImportError(path, f"--patch-size-level0 {stated:g} disagrees with the {fp.size_level0:g} "
                                           f"level-0 px of the {fp.source}")
        if fp is None or fp.size_level0 is None:
            return Footprint(float(stated), "stated with --patch-size-level0", fp.patch_size if fp else None)
    if fp is not None and fp.size_level0 is not None:
        return fp
    step = grid_step(coords)
    if step is None:
        return fp or Footprint(None, "unknown: no attributes, too few patches to see a grid")
    return Footprint(float(step[0]), f"assumed = the coordinates' grid step, {step[1]:.0%} of neighbour steps; no "
                                     "attribute states it, give --patches or --patch-size-level0",
                     fp.patch_size if fp else None)


def check_scale(path: Path, fp: Footprint, meta: StoreMeta, size_rtol: float) -> tuple[ScaleRule, float | None]:
    """Whether the foreign footprint is the store's scale: by µm/px, or by TRIDENT's magnification rule; returns
    the rule and the effective µm/px of the foreign patches on this slide, or raises naming the mismatch."""
    ours = float(meta.patch_size_level0)
    if fp.size_level0 is None:
        return "unchecked", None
    size0 = fp.size_level0
    eff = meta.mpp_level0 * size0 / fp.patch_size if fp.patch_size else None
    if abs(size0 / ours - 1.0) <= size_rtol:
        return "mpp", eff
    detail = ""
    if fp.trident_rule and fp.patch_size and fp.target_magnification:
        nominal_f = fp.patch_size * 10.0 / fp.target_magnification  # TRIDENT: µm/px = 10 / magnification
        nominal_s = meta.patch_size * meta.target_mpp
        bucket = trident_magnification(meta.mpp_level0)
        if abs(nominal_f / nominal_s - 1) <= size_rtol and bucket == fp.level0_magnification:
            return "trident-magnification", eff
        if bucket != fp.level0_magnification:
            detail = (f"; TRIDENT took level 0 as {fp.level0_magnification:g}× but the store's slide is "
                      f"{meta.mpp_level0:.4g} µm/px ({bucket}× by TRIDENT's own rule): wrong slide or --mpp")
        else:
            detail = (f"; TRIDENT's patches are {fp.patch_size} px at {fp.target_magnification:g}× "
                      f"(≈ {nominal_f:g} µm), the store's {meta.patch_size} px at {meta.target_mpp:g} µm/px "
                      f"({nominal_s:g} µm)")
    retile = meta.mpp_level0 * size0 / meta.patch_size
    raise FeatureImportError(
        path,
        f"foreign patches are {px(size0)} level-0 px ({fp.source}) but the store's are {px(ours)} "
        f"(target {meta.target_mpp:g} µm/px, patch {meta.patch_size} px){detail}: re-tile with --target-mpp "
        f"{retile:.4g}, or extract the features at this store's scale",
    )


def _check_slide_size(path: Path, fp: Footprint, meta: StoreMeta) -> None:
    if fp.slide_size_level0 is None:
        return
    w, h = fp.slide_size_level0
    if abs(w / meta.level0_width - 1) > 0.01 or abs(h / meta.level0_height - 1) > 0.01:
        raise FeatureImportError(path, f"made on a slide of {w}×{h} level-0 px ({fp.source}) but the store's slide "
                                       f"{meta.slide_id} is {meta.level0_width}×{meta.level0_height}: wrong slide")


def import_features(store: str | Path, features_path: str | Path, cfg: ImportConfig) -> ImportReport:
    """Write the features of a TRIDENT/CLAM file as ``patches/<cfg.name>`` of ``store`` (module docstring)."""
    store, features_path = Path(store), Path(features_path)
    name = cfg.name
    if not name or "/" in name or name.startswith("_") or name in ("coords", "tissue"):
        raise FeatureImportError(features_path, f"invalid feature name {name!r} (no '/', not starting with '_', "
                                                "not 'coords' or 'tissue')")
    ff = read_foreign_features(features_path, cfg.patches, cfg.patch_size_level0)
    with SlideStore(store) as s:
        meta = s.meta
        coords = s.patch_coords()
        tissue = s.patch_tissue()
        exists = s.has_features(name)
    if exists and not cfg.overwrite:
        raise StoreError(store, f"patches/{name} already exists (pass --overwrite to replace it)")
    _check_slide_size(features_path, ff.footprint, meta)
    rule, eff = check_scale(features_path, ff.footprint, meta, cfg.size_rtol)
    ours = float(meta.patch_size_level0)
    r, g = tissue.shape
    side = ff.footprint.size_level0 or ours
    target, _, n_dup = match_coords(ff.coords + side / 2, coords.reshape(-1, 2) + ours / 2, cfg.tolerance * ours)
    ok = target >= 0
    n, n_ok = len(ff.coords), int(ok.sum())
    if n and n_ok < cfg.min_matched * n:
        facts = GridFacts(meta.level0_width, meta.level0_height, ours, r, cfg.tolerance,
                          meta.mpp_level0 * side / meta.patch_size if ff.footprint.size_level0 else None)
        why = diagnose(ff.coords, ~ok, facts)
        raise FeatureImportError(features_path, f"only {n_ok}/{n} foreign patches matched the store's grid (below "
                                                f"--min-matched {cfg.min_matched:g}): {why}")
    d = ff.features.shape[1]
    matched = np.zeros(r * g, dtype=bool)
    matched[target[ok]] = True
    report = ImportReport(
        name=name, source=str(features_path.resolve()), source_format=ff.source_format,
        patches_file=ff.patches_file, n_foreign=n, n_matched=n_ok, n_unmatched=n - n_ok, n_duplicates=n_dup,
        n_tissue_missing=int((tissue & ~matched.reshape(r, g)).sum()), dim=d,
        foreign_patch_size_level0=ff.footprint.size_level0, footprint_source=ff.footprint.source,
        store_patch_size_level0=ours, scale_rule=rule, foreign_effective_mpp=eff,
        store_effective_mpp=float(meta.effective_mpp), min_matched=cfg.min_matched, encoder=ff.encoder,
        written=d > 0,
    )
    if d == 0:  # TRIDENT's empty slide, features (0,): the dimension is unknown, nothing to write
        return report
    out = np.zeros((r * g, d), dtype=np.float32)
    out[target[ok]] = ff.features[ok]
    with update_store(store) as f:
        attrs = {k: "" if v is None else v for k, v in asdict(report).items()}
        f.write_features(name, out.reshape(r, g, d), {**attrs, "kind": "imported"})
        f.write_region_dataset(f"imported/{name}/matched", matched.reshape(r, g))
        f.set_encoder(name, d)
    return report
