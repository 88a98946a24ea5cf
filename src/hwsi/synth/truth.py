"""Ground-truth sidecar of a SynthPath slide: ``<slide>.truth.h5``.

Layout (schema :data:`TRUTH_SCHEMA`; coordinates are level-0 pixels (x, y) int64 at ``mpp`` µm/px)::

    attrs: schema, slide_id, seed, width, height, mpp, region_size, patch_size, grid_side,
           diagnosis, extent, label, facts (JSON), n_tissue_regions, n_lesion_regions,
           pattern_names, architecture_names, cell_type_names (JSON lists: code -> name)
    regions/coords        (R, 2)  int64   top-left of each scene region (row-major, origin 0, 0)
    regions/tissue        (R,)    float32 tissue fraction
    regions/architecture  (R,)    int8    code into architecture_names
    regions/lesion        (R,)    bool    region is lesional (counts for extent)
    regions/atypia        (R,)    bool    epithelial nuclei of the region are atypical
    patches/coords        (R, G, 2) int64
    patches/pattern       (R, G)  int8    code into pattern_names (background where tissue < 0.5)
    patches/tissue        (R, G)  float32
    cells/x, cells/y      (N,)    int64   nucleus centroid
    cells/type            (N,)    int8    code into cell_type_names
    cells/area_um2        (N,)    float32
    cells/region, cells/patch (N,) int32  scene region index, patch index (row-major) inside it
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from hwsi.synth.classes import ARCHITECTURES, CELL_TYPES, PATTERNS, SynthError
from hwsi.synth.render import sprite_bank
from hwsi.synth.scene import Scene
from hwsi.utils.atomic import atomic_path

TRUTH_SCHEMA = 1
TRUTH_SUFFIX = ".truth.h5"


def truth_path_for(slide_path: str | Path) -> Path:
    """``slides/x.tiff`` -> ``slides/x.truth.h5``."""
    p = Path(slide_path)
    return p.with_name(p.name.split(".")[0] + TRUTH_SUFFIX)


def slide_facts(scene: Scene) -> dict[str, Any]:
    """Slide-level structured facts (classes plus counts measured on the scene)."""
    f = scene.cfg.classes.facts()
    f["n_tissue_regions"] = int(scene.n_tissue_regions)
    f["n_lesion_regions"] = int(scene.region_lesion.sum())
    f["involved_fraction"] = round(f["n_lesion_regions"] / max(1, f["n_tissue_regions"]), 3)
    f["lesion_location"] = lesion_location(scene)
    return f


LOCATIONS: tuple[str, ...] = ("upper left", "upper right", "lower left", "lower right", "central")


def lesion_location(scene: Scene) -> str:
    """Where the lesional regions lie: the quadrant of their centres' mean relative to the slide's centre, or
    "central" when that mean is within a quarter region of the centre line on either axis; "none" without a lesion."""
    ys, xs = np.nonzero(scene.region_lesion)
    if ys.size == 0:
        return "none"
    size = scene.cfg.region_size
    cx = float(((xs + 0.5) * size).mean()) - scene.cfg.width / 2
    cy = float(((ys + 0.5) * size).mean()) - scene.cfg.height / 2
    if abs(cx) < size / 4 or abs(cy) < size / 4:
        return "central"
    return f"{'upper' if cy < 0 else 'lower'} {'left' if cx < 0 else 'right'}"


def write_truth(path: str | Path, scene: Scene, slide_id: str) -> Path:
    """Write the sidecar of ``scene`` atomically; returns its path."""
    cfg = scene.cfg
    nuc = scene.nuclei()
    area = np.zeros(nuc["x"].size, dtype=np.float32)
    for t in range(len(CELL_TYPES)):
        m = nuc["type"] == t
        if m.any():
            area[m] = sprite_bank(t, round(cfg.mpp, 4)).area_um2[nuc["variant"][m]]
    path = Path(path)
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        a = f.attrs
        a["schema"] = TRUTH_SCHEMA
        a["slide_id"] = slide_id
        for k in ("seed", "width", "height", "mpp", "region_size", "patch_size"):
            a[k] = getattr(cfg, k)
        a["grid_side"] = scene.G
        a["diagnosis"] = cfg.classes.diagnosis
        a["extent"] = cfg.classes.extent
        a["label"] = cfg.classes.label
        facts = slide_facts(scene)
        a["facts"] = json.dumps(facts)
        a["n_tissue_regions"] = facts["n_tissue_regions"]
        a["n_lesion_regions"] = facts["n_lesion_regions"]
        a["pattern_names"] = json.dumps(list(PATTERNS))
        a["architecture_names"] = json.dumps(list(ARCHITECTURES))
        a["cell_type_names"] = json.dumps(list(CELL_TYPES))
        f["regions/coords"] = scene.region_coords()
        f["regions/tissue"] = scene.region_tissue.ravel().astype(np.float32)
        f["regions/architecture"] = scene.region_arch.ravel().astype(np.int8)
        f["regions/lesion"] = scene.region_lesion.ravel()
        f["regions/atypia"] = scene.region_atypia.ravel()
        f["patches/coords"] = scene.patch_coords()
        f["patches/pattern"] = scene.per_region(scene.patterns).astype(np.int8)
        f["patches/tissue"] = scene.per_region(scene.patch_tissue).astype(np.float32)
        for k in ("x", "y", "type", "region", "patch"):
            f.create_dataset(f"cells/{k}", data=nuc[k], compression="gzip", compression_opts=1)
        f.create_dataset("cells/area_um2", data=area, compression="gzip", compression_opts=1)
    return path


@dataclass
class Truth:
    """A loaded sidecar: attributes and every dataset as numpy arrays."""

    attrs: dict[str, Any]
    data: dict[str, np.ndarray]

    @property
    def facts(self) -> dict[str, Any]:
        return json.loads(self.attrs["facts"])

    def names(self, kind: str) -> list[str]:
        """``kind`` in pattern, architecture, cell_type."""
        return json.loads(self.attrs[f"{kind}_names"])


def read_truth(path: str | Path) -> Truth:
    """Load a sidecar written by :func:`write_truth`."""
    path = Path(path)
    if not path.is_file():
        raise SynthError(f"{path}: no ground-truth sidecar (write it with `hwsi synth`)")
    with h5py.File(path, "r") as f:
        if int(f.attrs.get("schema", -1)) != TRUTH_SCHEMA:
            raise SynthError(f"{path}: truth schema {f.attrs.get('schema')}, this hwsi reads {TRUTH_SCHEMA}")
        attrs = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in f.attrs.items()}
        data: dict[str, np.ndarray] = {}
        f.visititems(lambda name, obj: data.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None)
    return Truth(attrs, data)
