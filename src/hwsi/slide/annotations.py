"""QuPath annotations that restrict `hwsi tile` (``--annotations FILE.geojson | DIR``; docs/slide.md "Annotations").

A GeoJSON file of annotations, as QuPath 0.4–0.6 writes it (File › Export objects as GeoJSON: a FeatureCollection,
or a bare list of Features; coordinates level-0 pixels, y down), read by :mod:`hwsi.slide.roi_geometry` (the one
reader of GeoJSON polygons): every ``annotation`` Polygon / MultiPolygon, with its holes. Detections, cells,
tiles, TMA cores and points/lines are skipped. Each polygon is

* an **exclusion** when its QuPath class is one of :data:`EXCLUDE_CLASSES` — QuPath's own ``Ignore*`` class (the
  standard class for "leave this out of analysis"), ``Exclude``, ``Excluded``, ``Exclusion`` — compared without
  case and without a trailing ``*``, on the class name or, for a derived class, any of its parts (``Ignore*:
  pen`` too). ``Other`` is *not* an exclusion: it is QuPath's standard class for other tissue (and the class hwsi's
  own export gives unknown nuclei);
* an **include** otherwise (a tissue outline, an ROI, unclassified or of any other class).

The area tiled is (the union of the includes, or the whole slide if the file has only exclusions) minus the union
of the exclusions. It is applied to the tissue mask before the grid is built, so a patch's tissue fraction is the
share of its area that is tissue AND inside (at the mask's resolution, 16 µm/px by default), and the usual
``min_patch_tissue`` / ``min_region_tissue`` rules decide what is kept.

Refused, one line naming the file (exit code 2, before any slide is tiled): not JSON, not GeoJSON, no annotation
polygon, a self-intersecting or degenerate ring, more than :data:`MAX_ANNOTATION_VERTICES` vertices, a vertex
outside the slide (more than :data:`EDGE_TOLERANCE_PX` past its level-0 edges: another slide's annotations, or
coordinates at another level).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hwsi.errors import ConfigError
from hwsi.slide.roi_geometry import EXCLUDE_CLASSES, RoiError, geojson_polygons, is_exclusion
from hwsi.textio import read_json

MAX_ANNOTATION_VERTICES = 200_000  # tissue outlines are long; checking a 200,000-vertex ring takes ~0.3 s
EDGE_TOLERANCE_PX = 1.0  # QuPath writes annotations that touch the image edge at exactly 0 / width / height
ANNOTATION_SUFFIXES = (".geojson", ".json")


Polygon = tuple[np.ndarray, ...]  # exterior ring then holes, (n, 2) level-0 px, closed


@dataclass(frozen=True)
class TileAnnotations:
    """The include and exclude polygons of one annotation file (level-0 px)."""

    path: Path
    include: tuple[Polygon, ...]  # empty: the whole slide
    exclude: tuple[Polygon, ...]
    where: tuple[str, ...]  # where each polygon (include, then exclude) is in the file, for messages

    def check_on_slide(self, width: int, height: int) -> None:
        """RoiError naming the file when a vertex lies outside the slide's level-0 extent (beyond the tolerance)."""
        t = EDGE_TOLERANCE_PX
        for where, poly in zip(self.where, self.include + self.exclude):
            for ring in poly:
                bad = (ring[:, 0] < -t) | (ring[:, 1] < -t) | (ring[:, 0] > width + t) | (ring[:, 1] > height + t)
                if bad.any():
                    x, y = ring[int(np.flatnonzero(bad)[0])]
                    raise RoiError(f"{self.path}: {where}: vertex ({x:g}, {y:g}) lies outside the slide ({width} x "
                                   f"{height} level-0 px); annotations must be in this slide's level-0 pixels, as "
                                   "QuPath exports them (another slide's file, or another level?)")

    def mask(self, shape: tuple[int, int], downsample: float) -> np.ndarray:
        """(h, w) bool at a tissue mask's resolution (mask px (i, j) = level-0 [j·ds, (j+1)·ds) × [i·ds, ...)):
        inside an include (everything when there is none) and outside every exclusion."""
        keep = _rasterise(self.include, shape, downsample) if self.include else np.ones(shape, bool)
        if self.exclude:
            keep &= ~_rasterise(self.exclude, shape, downsample)
        return keep

    def record(self) -> dict[str, Any]:
        """What the store records (JSON attribute ``annotations``)."""
        return {"file": str(self.path), "include_polygons": len(self.include), "exclude_polygons": len(self.exclude),
                "exclude_classes": sorted(EXCLUDE_CLASSES)}

    def describe(self) -> str:
        inc = f"{len(self.include)} include polygon(s)" if self.include else "the whole slide"
        return f"{self.path}: {inc} minus {len(self.exclude)} exclusion(s)"


def _rasterise(polygons: tuple[Polygon, ...], shape: tuple[int, int], ds: float) -> np.ndarray:
    """Union of polygons (holes cut out of their own polygon) on a mask grid; cv2's scan-line fill, 1/16 px."""
    import cv2

    h, w = shape
    out = np.zeros((h, w), bool)
    for poly in polygons:
        ext = poly[0] / ds - 0.5  # mask pixel centres at integer coordinates (cv2's convention)
        x0, y0 = max(0, math.floor(ext[:, 0].min())), max(0, math.floor(ext[:, 1].min()))
        x1, y1 = min(w, math.ceil(ext[:, 0].max()) + 1), min(h, math.ceil(ext[:, 1].max()) + 1)
        if x0 >= x1 or y0 >= y1:
            continue
        canvas = np.zeros((y1 - y0, x1 - x0), np.uint8)
        rings = [np.round((r[:-1] / ds - 0.5 - (x0, y0)) * 16).astype(np.int32) for r in poly]
        cv2.fillPoly(canvas, [rings[0]], 1, lineType=cv2.LINE_8, shift=4)
        if len(rings) > 1:
            cv2.fillPoly(canvas, rings[1:], 0, lineType=cv2.LINE_8, shift=4)
        out[y0:y1, x0:x1] |= canvas.astype(bool)
    return out


def read_tile_annotations(path: str | Path) -> TileAnnotations:
    """The include/exclude polygons of a QuPath GeoJSON file (rules: module docstring); RoiError naming the file."""
    p = Path(path)
    found = geojson_polygons(read_json(p), str(p), MAX_ANNOTATION_VERTICES)
    if not found:
        raise RoiError(f"{p}: no Polygon or MultiPolygon annotation (hwsi tile --annotations takes QuPath "
                       "annotations: tissue outlines / ROIs, and Ignore* / Exclude ones to leave out)")
    inc = [(w, poly) for w, props, poly in found if not is_exclusion(props)]
    exc = [(w, poly) for w, props, poly in found if is_exclusion(props)]
    return TileAnnotations(p, tuple(q for _, q in inc), tuple(q for _, q in exc), tuple(w for w, _ in inc + exc))


def annotation_files(option: str | Path, slides: list[tuple[str, Path]]) -> dict[str, Path]:
    """``--annotations`` -> {slide_id: file}. A FILE applies to the one slide of the source (more slides: a
    ConfigError); a DIR gives each slide ``DIR/<slide_id>``, ``DIR/<file stem>`` or ``DIR/<file name>`` with a
    ``.geojson`` / ``.json`` suffix (QuPath scripts name exports by the image name, with or without its
    extension); slides without one are tiled whole (the caller reports them)."""
    opt = Path(option)
    if opt.is_file():
        if len(slides) != 1:
            raise ConfigError(f"--annotations {opt}: one file applies to one slide, but the source names "
                              f"{len(slides)}; give a folder of <slide>.geojson files instead")
        return {slides[0][0]: opt}
    if not opt.is_dir():
        raise ConfigError(f"--annotations {opt}: no such file or folder")
    out: dict[str, Path] = {}
    for sid, slide in slides:
        for name in dict.fromkeys((sid, slide.stem, slide.name)):
            hit = next((opt / f"{name}{s}" for s in ANNOTATION_SUFFIXES if (opt / f"{name}{s}").is_file()), None)
            if hit is not None:
                out[sid] = hit
                break
    if not out:
        raise ConfigError(f"--annotations {opt}: no <slide>.geojson file for any of the {len(slides)} slide(s) "
                          f"(looked for e.g. {slides[0][0]}.geojson)" if slides else f"--annotations {opt}: no slides")
    return out
