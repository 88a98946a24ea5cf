"""Writing a nucleus table to files (CSV + .npy features, or HDF5) and drawing contour overlays."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from hwsi.cells.morphology import FEATURE_NAMES
from hwsi.cells.nucleus_types import TYPE_NAMES
from hwsi.cells.segment import Nuclei
from hwsi.errors import HwsiError
from hwsi.utils.atomic import atomic_path

# overlay colour (RGB) per type: unknown yellow, small round cyan, large/atypical red, elongated green
TYPE_COLORS: dict[int, tuple[int, int, int]] = {0: (255, 230, 0), 1: (0, 220, 255), 2: (255, 40, 40), 3: (40, 220, 40)}
TABLE_SUFFIXES = (".csv", ".h5", ".hdf5")


def table_with_offset(nuc: Nuclei, offset_xy: tuple[float, float] = (0.0, 0.0), scale: float = 1.0) -> dict[str, np.ndarray]:
    """The table with x, y mapped to ``offset + xy * scale`` (e.g. to level-0 pixels)."""
    t = dict(nuc.table)
    t["x"] = offset_xy[0] + t["x"] * scale
    t["y"] = offset_xy[1] + t["y"] * scale
    return t


def write_nuclei(path: str | Path, table: dict[str, np.ndarray], features: np.ndarray,
                 attrs: dict[str, object] | None = None) -> list[Path]:
    """Write ``table`` + ``features`` to ``path``: ``.csv`` (plus ``<stem>.features.npy``) or ``.h5``/``.hdf5``
    (``table/<column>``, ``features`` with attribute ``feature_names``). Atomic; returns the paths written."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in TABLE_SUFFIXES:
        raise HwsiError(f"{path}: output must end in one of {', '.join(TABLE_SUFFIXES)}")
    cols = list(table)
    n = len(features)
    if suffix == ".csv":
        with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["id", *cols, "type_name"])
            arrays = [np.asarray(table[c]) for c in cols]
            for i in range(n):
                row = [i + 1]
                for a in arrays:
                    v = a[i]
                    row.append(int(v) if a.dtype.kind in "iu" else f"{float(v):.6g}")
                row.append(TYPE_NAMES.get(int(table["type"][i]), "unknown"))
                w.writerow(row)
        feat_path = path.with_name(path.stem + ".features.npy")
        with atomic_path(feat_path) as tmp:
            with open(tmp, "wb") as fh:
                np.save(fh, np.asarray(features, dtype=np.float32))
        return [path, feat_path]
    import h5py

    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            g = f.create_group("table")
            for c in cols:
                g.create_dataset(c, data=np.asarray(table[c]))
            d = f.create_dataset("features", data=np.asarray(features, dtype=np.float32))
            d.attrs["feature_names"] = list(FEATURE_NAMES)
            f.attrs["type_names"] = [TYPE_NAMES[k] for k in sorted(TYPE_NAMES)]
            for k, v in (attrs or {}).items():
                f.attrs[k] = v
    return [path]


def draw_overlay(rgb: np.ndarray, labels: np.ndarray, types: np.ndarray) -> np.ndarray:
    """RGB copy of ``rgb`` with each nucleus's outline drawn in its type's colour."""
    from scipy import ndimage as ndi

    out = np.array(rgb[..., :3], dtype=np.uint8, copy=True)
    if labels.max() == 0:
        return out
    edge = labels != ndi.grey_erosion(labels, size=(3, 3), mode="nearest")
    edge &= labels > 0
    lut = np.zeros((int(labels.max()) + 1, 3), dtype=np.uint8)
    for i, t in enumerate(np.asarray(types), start=1):
        lut[i] = TYPE_COLORS.get(int(t), TYPE_COLORS[0])
    out[edge] = lut[labels[edge]]
    return out


def write_png(path: str | Path, rgb: np.ndarray) -> None:
    """Save an RGB uint8 image as PNG atomically."""
    from PIL import Image

    path = Path(path)
    with atomic_path(path) as tmp:
        Image.fromarray(rgb).save(tmp, format="PNG")
