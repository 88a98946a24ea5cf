"""What a TRIDENT / CLAM file's attributes say about its patches, and the ``.pt`` features files
(docs/formats-features.md). The HDF5 files themselves are read by :mod:`hwsi.features.import_features`.

* **TRIDENT** (mahmoodlab/TRIDENT 0.3.0 @a91fa84, ``trident/IO.py::coords_to_h5``) puts on ``coords``:
  ``patch_size`` (px at the target magnification),
  ``patch_size_level0 = patch_size * level0_magnification // target_magnification``,
  ``level0_magnification`` (TRIDENT's bucket of the slide's µm/px: < 0.16 → 80, < 0.2 → 60, < 0.3 → 40,
  < 0.6 → 20, < 1.2 → 10, < 2.4 → 5), ``target_magnification``, ``overlap``, ``name``, ``savetodir``,
  ``level0_width``, ``level0_height``. The footprint comes from the MAGNIFICATION, not the µm/px: a "40×" slide
  at 0.2631 µm/px gets 512 level-0 px for 256 px at "20×", where a 0.5 µm/px rule gives 486.5.
* **CLAM** (mahmoodlab/CLAM @53e2409, ``wsi_core/WholeSlideImage.py::process_contour``) puts ``patch_size``,
  ``patch_level``, ``downsample`` (of that level), ``downsampled_level_dim``, ``level_dim`` (the slide's size at
  ``patch_level``), ``name``, ``save_path`` on the ``coords`` of the PATCHES file only; its features files carry no
  attribute at all. Footprint = ``patch_size × downsample``.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from numpy._core.multiarray import _reconstruct  # type: ignore[import-not-found]

from hwsi.errors import HwsiError

SourceFormat = Literal["trident", "clam", "unknown"]
ScaleRule = Literal["mpp", "trident-magnification", "unchecked"]


class FeatureImportError(HwsiError):
    """A foreign features file cannot be read or does not fit the slide's store; names the file."""

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


@dataclass
class Footprint:
    """The level-0 side of one foreign patch and where that number came from."""

    size_level0: float | None
    source: str  # "TRIDENT attributes of F", "CLAM attributes of patches file F", "stated ...", "assumed ..."
    patch_size: int | None = None  # px the encoder saw (at the foreign tool's target scale), when known
    trident_rule: bool = False  # patch_size_level0 == patch_size * level0_magnification // target_magnification
    level0_magnification: float | None = None
    target_magnification: float | None = None
    slide_size_level0: tuple[int, int] | None = None  # (width, height) of the slide the tool patched, when written


def attr_value(v: Any) -> Any:
    """An HDF5 attribute as a plain Python value (bytes decoded, arrays as lists, numpy scalars as Python)."""
    if isinstance(v, bytes):
        return v.decode(errors="replace")
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, np.generic):
        return v.item()
    return v


def _number(attrs: dict[str, Any], key: str) -> float | None:
    v = attrs.get(key)
    if isinstance(v, list) and v:
        v = v[0]
    if isinstance(v, str):  # TRIDENT writes None as the string 'None'
        try:
            v = float(v)
        except ValueError:
            return None
    if isinstance(v, (int, float)) and np.isfinite(v):
        return float(v)
    return None


def trident_magnification(mpp_level0: float) -> int | None:
    """TRIDENT's magnification bucket of a level-0 µm/px (``WSI._fetch_magnification``); None above 2.4."""
    for limit, mag in ((0.16, 80), (0.2, 60), (0.3, 40), (0.6, 20), (1.2, 10), (2.4, 5)):
        if mpp_level0 < limit:
            return mag
    return None


def detect_format(attrs: dict[str, Any]) -> SourceFormat:
    """``trident`` / ``clam`` from the ``coords`` attributes (of the features or the patches file)."""
    if "patch_size_level0" in attrs or "level0_magnification" in attrs:
        return "trident"
    if "patch_size" in attrs and ("patch_level" in attrs or "downsample" in attrs):
        return "clam"
    return "unknown"


def footprint_from_attrs(attrs: dict[str, Any], source: str) -> Footprint | None:
    """The footprint the attributes state (TRIDENT or CLAM), or None when they state none."""
    fmt = detect_format(attrs)
    patch = _number(attrs, "patch_size")
    if fmt == "trident":
        size0 = _number(attrs, "patch_size_level0")
        src_mag, dst_mag = _number(attrs, "level0_magnification"), _number(attrs, "target_magnification")
        rule = (size0 is not None and patch is not None and src_mag is not None and bool(dst_mag)
                and int(patch * src_mag // dst_mag) == int(size0))  # type: ignore[operator]
        w, h = _number(attrs, "level0_width"), _number(attrs, "level0_height")
        return Footprint(size0, f"TRIDENT attributes of {source}", int(patch) if patch else None, rule, src_mag,
                         dst_mag, (int(w), int(h)) if w and h else None)
    if fmt == "clam":
        ds = _number(attrs, "downsample")
        level = _number(attrs, "patch_level")
        if ds is None and level == 0:
            ds = 1.0
        size0 = patch * ds if patch is not None and ds is not None else None
        dims = attrs.get("level_dim")
        slide = None
        if isinstance(dims, list) and len(dims) == 2 and ds is not None:
            slide = (int(round(dims[0] * ds)), int(round(dims[1] * ds)))
        return Footprint(size0, f"CLAM attributes of {source}", int(patch) if patch else None,
                         slide_size_level0=slide)
    return None


def read_pt_features(path: Path) -> np.ndarray:
    """Features of a ``.pt`` file: CLAM's ``pt_files/<slide>.pt`` (``torch.save`` of a float tensor (N, D)) or
    TRIDENT's ``saveas='pt'`` (``torch.save`` of a numpy array). Loaded with ``weights_only=True`` (numpy's array
    reconstruction allowed, nothing else)."""
    import torch

    # numpy >= 2 pickles name numpy._core, numpy 1.x ones numpy.core
    np_globals: list[Any] = [np.ndarray, np.dtype, _reconstruct, (_reconstruct, "numpy.core.multiarray._reconstruct")]
    np_globals += [type(np.dtype(t)) for t in (np.float16, np.float32, np.float64)]
    try:
        with torch.serialization.safe_globals(np_globals):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as exc:
        first = " ".join(str(exc).split())[:160]
        raise FeatureImportError(path, f"not a features .pt saved by CLAM or TRIDENT ({type(exc).__name__}: "
                                       f"{first})") from exc
    if isinstance(obj, torch.Tensor):
        obj = obj.detach().float().numpy()
    if not isinstance(obj, np.ndarray):
        raise FeatureImportError(path, f"holds a {type(obj).__name__}, expected a tensor or array (N, D) of features")
    return obj


def squeeze_features(path: Path, feats: np.ndarray) -> np.ndarray:
    """(N, D) float32 from (N, D), (1, N, D) or (N, 1, D); TRIDENT's empty (0,) becomes (0, 0)."""
    if feats.ndim == 1 and feats.shape[0] == 0:
        return np.zeros((0, 0), np.float32)
    if feats.ndim == 3 and 1 in feats.shape[:2]:
        feats = feats.reshape(-1, feats.shape[-1]) if feats.shape[0] == 1 else feats[:, 0, :]
    if feats.ndim != 2:
        raise FeatureImportError(path, f"'features' must be (N, D), got shape {feats.shape}")
    if not np.issubdtype(feats.dtype, np.number):
        raise FeatureImportError(path, f"'features' must be numbers, got dtype {feats.dtype}")
    if not np.isfinite(feats).all():
        raise FeatureImportError(path, "'features' contain NaN or inf")
    return feats.astype(np.float32, copy=False)


def check_coords(path: Path, coords: np.ndarray) -> np.ndarray:
    """(N, 2) int64 level-0 top-lefts from (N, 2) or (1, N, 2); (0,) is an empty list."""
    if coords.size == 0:
        return np.zeros((0, 2), np.int64)
    if coords.ndim == 3 and coords.shape[0] == 1:
        coords = coords[0]
    if coords.ndim != 2 or coords.shape[1] != 2:
        raise FeatureImportError(path, f"'coords' must be (N, 2), got shape {coords.shape}")
    if not np.isfinite(coords).all():
        raise FeatureImportError(path, "'coords' contain NaN or inf")
    return np.rint(coords).astype(np.int64)
