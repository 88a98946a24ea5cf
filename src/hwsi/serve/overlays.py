"""Overlay data read from a slide's store: tissue mask, region/patch grid, SPF selection and nuclei in a box.

Everything is in level-0 pixel coordinates (docs/design.md §3); the viewer maps them to the screen. The store is
read through :class:`hwsi.store.SlideStore`; the HTTP API's JSON fields ``region_size_level0`` /
``patch_size_level0`` are level-0 pixels (the store's fields of those names), never the store's target-µm/px sizes.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hwsi.cells.nucleus_types import TYPE_COLOURS, TYPE_NAMES
from hwsi.store import SlideStore, StoreMeta

# viewer/GeoJSON colours of nucleus types: the type table's, by type name (RGB); other names cycle through _EXTRA
_EXTRA = [(200, 120, 0), (160, 40, 200), (0, 170, 170), (220, 0, 140), (120, 80, 40)]
MAX_NUCLEI = 20000


def default_type_names() -> dict[int, str]:
    """Type names of the built-in nucleus segmenter (:data:`hwsi.cells.nucleus_types.TYPE_NAMES`)."""
    return dict(TYPE_NAMES)


def type_colour(name: str, index: int) -> tuple[int, int, int]:
    return TYPE_COLOURS.get(name, _EXTRA[index % len(_EXTRA)])


@dataclass
class StoreOverlays:
    """Cached, read-only overlay data of one store (small arrays are kept; cell columns are read on demand)."""

    path: Path
    meta: StoreMeta
    region_coords: np.ndarray  # (R, 2)
    patch_coords: np.ndarray  # (R, G, 2)
    patch_tissue: np.ndarray  # (R, G) bool
    selected: np.ndarray | None  # (R, k) int, -1 padded
    relevance: np.ndarray | None  # (R, G) float, NaN where not a candidate
    offsets: np.ndarray | None  # (R*G+1,)
    type_names: dict[int, str] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def mpp(self) -> float:
        return float(self.meta.mpp_level0)

    @property
    def width(self) -> int:
        return int(self.meta.level0_width)

    @property
    def height(self) -> int:
        return int(self.meta.level0_height)

    @property
    def region_size_level0(self) -> float:
        return float(self.meta.region_size_level0)

    @property
    def patch_size_level0(self) -> float:
        return float(self.meta.patch_size_level0)

    @property
    def grid_side(self) -> int:
        return int(self.meta.grid_side)

    @classmethod
    def load(cls, path: Path) -> "StoreOverlays":
        with SlideStore(path) as s:
            pc = s.patch_coords()
            sel = s.spf_selected() if s.has("spf/selected") else None
            rel = s.spf_relevance() if s.has("spf/relevance") else None
            offs = s.cell_offsets() if s.has_cells else None
            names = default_type_names()
            raw = s.cells_attrs().get("type_names")
            if raw is not None:
                try:
                    parsed = json.loads(raw)
                    names = (
                        {int(k): str(v) for k, v in parsed.items()}
                        if isinstance(parsed, dict)
                        else {i: str(v) for i, v in enumerate(parsed)}
                    )
                except (ValueError, TypeError):
                    pass
            return cls(
                path=path,
                meta=s.meta,
                region_coords=s.region_coords(),
                patch_coords=pc.reshape(pc.shape[0], -1, 2),
                patch_tissue=s.patch_tissue(),
                selected=sel,
                relevance=rel,
                offsets=offs,
                type_names=names,
            )

    # ---- grid and SPF -------------------------------------------------------------------------------------
    def grid(self) -> dict[str, Any]:
        """Regions (level-0 top-left), sizes (level-0 px), and per-region patch tissue flags as '0'/'1' strings
        (row-major)."""
        return {
            "region_size_level0": self.region_size_level0,
            "patch_size_level0": self.patch_size_level0,
            "grid_side": self.grid_side,
            "regions": self.region_coords.tolist(),
            "patch_tissue": ["".join("1" if t else "0" for t in row) for row in self.patch_tissue],
        }

    def spf(self) -> dict[str, Any]:
        """The SPF-selected patches (question-independent) with their Eq. 2 relevance."""
        out: list[dict[str, Any]] = []
        if self.selected is not None:
            for r, row in enumerate(self.selected):
                for g in row:
                    if g < 0:
                        continue
                    x, y = self.patch_coords[r, g]
                    rel = None
                    if self.relevance is not None:
                        v = float(self.relevance[r, g])
                        rel = None if not np.isfinite(v) else round(v, 4)
                    out.append({"region": r, "patch": int(g), "x": int(x), "y": int(y), "relevance": rel})
        return {"available": self.selected is not None, "patch_size_level0": self.patch_size_level0, "patches": out}

    # ---- tissue mask --------------------------------------------------------------------------------------
    def tissue_mask(self) -> tuple[np.ndarray, str]:
        """(mask bool (h, w) covering the whole slide, source name): the store's mask, else the patch flags."""
        with SlideStore(self.path) as s:
            found = s.tissue_mask()
        if found is not None:
            return found
        p = self.patch_size_level0
        mw, mh = max(1, int(np.ceil(self.width / p))), max(1, int(np.ceil(self.height / p)))
        mask = np.zeros((mh, mw), bool)
        pc = self.patch_coords.reshape(-1, 2)
        t = self.patch_tissue.reshape(-1)
        cx = np.clip((pc[t, 0] + p / 2) // p, 0, mw - 1).astype(int)
        cy = np.clip((pc[t, 1] + p / 2) // p, 0, mh - 1).astype(int)
        mask[cy, cx] = True
        return mask, "patches/tissue"

    def tissue_mask_rgba(self, colour: tuple[int, int, int] = (0, 200, 120), alpha: int = 90) -> np.ndarray:
        mask, _ = self.tissue_mask()
        img = np.zeros((*mask.shape, 4), np.uint8)
        img[mask] = (*colour, alpha)
        return img

    # ---- nuclei -------------------------------------------------------------------------------------------
    @property
    def has_cells(self) -> bool:
        return self.offsets is not None

    def patches_in_box(self, x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
        """Flat indices r*G+g of the patches that intersect the level-0 box."""
        pc = self.patch_coords.reshape(-1, 2)
        p = self.patch_size_level0
        hit = (pc[:, 0] < x1) & (pc[:, 0] + p > x0) & (pc[:, 1] < y1) & (pc[:, 1] + p > y0)
        return np.nonzero(hit)[0]

    def nuclei_in_box(
        self, x0: float, y0: float, x1: float, y1: float, limit: int = MAX_NUCLEI
    ) -> dict[str, Any]:
        """Nuclei whose centroid lies in the box: x, y (level-0), type, radius (px) — at most ``limit``."""
        empty: dict[str, Any] = {"x": [], "y": [], "type": [], "radius": [], "truncated": False}
        if self.offsets is None:
            return {**empty, "available": False}
        flat = self.patches_in_box(x0, y0, x1, y1)
        offs = self.offsets
        ranges = [(int(offs[i]), int(offs[i + 1])) for i in flat if i + 1 < len(offs) and offs[i + 1] > offs[i]]
        if not ranges:
            return {**empty, "available": True}
        merged: list[list[int]] = []
        for a, b in ranges:
            if merged and a <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], b)
            else:
                merged.append([a, b])
        cols: dict[str, list[np.ndarray]] = {"x": [], "y": [], "type": [], "area": []}
        with SlideStore(self.path) as s:
            has_area, has_type = s.has_cell_column("area_um2"), s.has_cell_column("type")
            for a, b in merged:
                cols["x"].append(s.cell_column("x", a, b))
                cols["y"].append(s.cell_column("y", a, b))
                cols["type"].append(s.cell_column("type", a, b) if has_type else np.zeros(b - a, np.int64))
                if has_area:
                    cols["area"].append(s.cell_column("area_um2", a, b))
        x = np.concatenate(cols["x"]).astype(np.float64)
        y = np.concatenate(cols["y"]).astype(np.float64)
        typ = np.concatenate(cols["type"]).astype(np.int64)
        if cols["area"]:
            radius = np.sqrt(np.maximum(np.concatenate(cols["area"]).astype(np.float64), 1.0) / np.pi) / self.mpp
        else:
            radius = np.full(x.shape, 3.0 / self.mpp)  # ~3 µm, a typical nucleus
        keep = (x >= x0) & (x < x1) & (y >= y0) & (y < y1)
        idx = np.nonzero(keep)[0]
        truncated = idx.size > limit
        idx = idx[:limit]
        return {
            "available": True,
            "x": x[idx].round(1).tolist(),
            "y": y[idx].round(1).tolist(),
            "type": typ[idx].tolist(),
            "radius": radius[idx].round(1).tolist(),
            "truncated": bool(truncated),
        }

    def all_nuclei(self) -> dict[str, np.ndarray]:
        """Every nucleus of the slide (for export): x, y, type, radius arrays."""
        if self.offsets is None:
            return {k: np.zeros(0) for k in ("x", "y", "type", "radius")}
        with SlideStore(self.path) as s:
            x = s.cell_column("x").astype(np.float64)
            y = s.cell_column("y").astype(np.float64)
            typ = s.cell_column("type").astype(np.int64) if s.has_cell_column("type") else np.zeros(x.shape, np.int64)
            if s.has_cell_column("area_um2"):
                radius = np.sqrt(np.maximum(s.cell_column("area_um2").astype(np.float64), 1.0) / np.pi) / self.mpp
            else:
                radius = np.full(x.shape, 3.0 / self.mpp)
        return {"x": x, "y": y, "type": typ, "radius": radius}

    def types(self) -> list[dict[str, Any]]:
        """Nucleus type legend: index, name, colour (hex)."""
        out = []
        for i, (k, name) in enumerate(sorted(self.type_names.items())):
            r, g, b = type_colour(name, i)
            out.append({"index": k, "name": name, "colour": f"#{r:02x}{g:02x}{b:02x}"})
        return out

    def patch_xy(self, region: int, patch: int) -> tuple[int, int]:
        x, y = self.patch_coords[region, patch]
        return int(x), int(y)
