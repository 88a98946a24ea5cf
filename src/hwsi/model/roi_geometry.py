"""A region of interest on a slide: a level-0 rectangle or the union of GeoJSON polygons (docs/serving.md, "Asking
about a region"). This module owns reading an ROI; :mod:`hwsi.model.roi` selects the slide's tokens inside it.

    roi = parse_rect("2048,0,1024,1024", "--roi")          # x, y, w, h in level-0 pixels
    roi = read_roi_geojson("annotations.geojson")          # QuPath's export, a Feature, a FeatureCollection, ...
    roi = roi_from_geojson({"type": "Polygon", "coordinates": [...]}, "roi")   # an API body's geometry
    roi.contains(points_level0)                            # (N, 2) -> (N,) bool, holes excluded, polygons united

GeoJSON layouts read (coordinates are level-0 pixels, y down, as QuPath 0.2–0.6 writes them with File › Export
objects as GeoJSON): a bare Polygon / MultiPolygon / GeometryCollection geometry, a Feature, a FeatureCollection,
or a JSON list of Features (QuPath's layout without "Export as FeatureCollection"). Features whose
``properties.objectType`` is set and is not ``"annotation"`` (detections, cells, tiles, TMA cores) are skipped;
non-polygon geometries (points, lines) too. Every polygon kept is united with the others.

Refused (a :class:`RoiError` naming the option or file): not 4 numbers / not GeoJSON, no polygon, a ring of fewer
than 3 distinct vertices or of zero area, a self-intersecting ring, non-finite coordinates, more than
:data:`MAX_ROI_VERTICES` vertices in all.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hwsi.errors import HwsiError
from hwsi.textio import read_json

MAX_ROI_VERTICES = 20_000  # all rings together; a QuPath brush annotation of a whole tissue section is ~1–5 k
_POLYGONAL = ("Polygon", "MultiPolygon", "GeometryCollection")


class RoiError(HwsiError):
    """An ROI cannot be used; the message starts with the option or file that gave it."""


@dataclass(frozen=True)
class Roi:
    """The union of ``polygons``; each polygon is its exterior ring then its holes, (n, 2) float64 level-0 px."""

    polygons: tuple[tuple[np.ndarray, ...], ...]
    label: str  # where it came from: "--roi 0,0,512,512", a file name, "roi" (an API body)
    kind: str  # "rectangle" | "polygon"

    @property
    def bounds_level0(self) -> tuple[float, float, float, float]:
        """(x0, y0, x1, y1) of the exterior rings, level-0 px."""
        pts = np.concatenate([p[0] for p in self.polygons])
        return float(pts[:, 0].min()), float(pts[:, 1].min()), float(pts[:, 0].max()), float(pts[:, 1].max())

    @property
    def n_vertices(self) -> int:
        return sum(len(r) - 1 for p in self.polygons for r in p)

    def contains(self, points_level0: np.ndarray) -> np.ndarray:
        """(N, 2) level-0 points -> (N,) bool: inside at least one polygon (inside its exterior, in none of its
        holes; even–odd rule over the polygon's rings). Points exactly on an edge count as inside on the left/top
        edges only (the usual half-open rule), so a grid of rectangles splits patch centres without overlap."""
        pts = np.asarray(points_level0, np.float64).reshape(-1, 2)
        out = np.zeros(len(pts), bool)
        for poly in self.polygons:
            ext = poly[0]
            box = ((pts[:, 0] >= ext[:, 0].min()) & (pts[:, 0] <= ext[:, 0].max())
                   & (pts[:, 1] >= ext[:, 1].min()) & (pts[:, 1] <= ext[:, 1].max()) & ~out)
            if not box.any():
                continue
            odd = np.zeros(int(box.sum()), bool)
            for ring in poly:
                odd ^= _crossings_odd(pts[box], ring)
            out[np.flatnonzero(box)[odd]] = True
        return out

    def to_geojson(self) -> dict[str, Any]:
        """The ROI as one GeoJSON MultiPolygon geometry (what the chat history records)."""
        return {"type": "MultiPolygon",
                "coordinates": [[np.round(r, 2).tolist() for r in p] for p in self.polygons]}

    def describe(self) -> str:
        """``"x 0..1024, y 0..1024 (level-0 px, rectangle)"`` or ``"... (level-0 px, 2 polygons of FILE)"``."""
        x0, y0, x1, y1 = (int(round(v)) for v in self.bounds_level0)
        if self.kind == "rectangle":
            return f"x {x0}..{x1}, y {y0}..{y1} (level-0 px, rectangle)"
        n = len(self.polygons)
        return f"x {x0}..{x1}, y {y0}..{y1} (level-0 px, {n} polygon{'s' if n != 1 else ''} of {self.label})"


def _crossings_odd(pts: np.ndarray, ring: np.ndarray) -> np.ndarray:
    """Even–odd ray casting of ``pts`` (M, 2) against one closed ring (n+1, 2): True where the ray crosses oddly."""
    odd = np.zeros(len(pts), bool)
    x, y = pts[:, 0:1], pts[:, 1:2]
    n_edges = len(ring) - 1
    for lo in range(0, n_edges, 4096):  # edges in chunks: memory M × 4096
        hi = min(lo + 4096, n_edges)
        a, b = ring[lo:hi][None], ring[lo + 1: hi + 1][None]
        ax, ay, bx, by = a[..., 0], a[..., 1], b[..., 0], b[..., 1]
        straddle = (ay > y) != (by > y)
        with np.errstate(divide="ignore", invalid="ignore"):
            xc = ax + (y - ay) * (bx - ax) / (by - ay)
        odd ^= ((straddle & (x < xc)).sum(axis=1) % 2).astype(bool)
    return odd


def _segments_cross(ring: np.ndarray) -> bool:
    """True if two non-adjacent edges of a closed ring (n+1, 2) intersect (touching counts)."""
    a, b = ring[:-1], ring[1:]
    n = len(a)
    if n < 4:
        return False

    def orient(p: np.ndarray, q: np.ndarray, r: np.ndarray) -> np.ndarray:
        return np.sign((q[..., 0] - p[..., 0]) * (r[..., 1] - p[..., 1]) - (q[..., 1] - p[..., 1]) * (r[..., 0] - p[..., 0]))

    idx = np.arange(n)
    for lo in range(0, n, 512):
        i = idx[lo: lo + 512, None]
        j = idx[None, :]
        pair = (j > i + 1) & ~((i == 0) & (j == n - 1))  # not the same, not neighbours (the ring closes)
        if not pair.any():
            continue
        p1, p2, q1, q2 = a[i[:, 0]][:, None], b[i[:, 0]][:, None], a[None], b[None]
        o1, o2, o3, o4 = orient(p1, p2, q1), orient(p1, p2, q2), orient(q1, q2, p1), orient(q1, q2, p2)
        proper = (o1 * o2 < 0) & (o3 * o4 < 0)
        if (proper & pair).any():
            return True
        # collinear overlaps: an endpoint of one segment on the other
        for o, p, s, e in ((o1, q1, p1, p2), (o2, q2, p1, p2), (o3, p1, q1, q2), (o4, p2, q1, q2)):
            on = (o == 0) & (np.minimum(s[..., 0], e[..., 0]) <= p[..., 0]) & (p[..., 0] <= np.maximum(s[..., 0], e[..., 0])) \
                & (np.minimum(s[..., 1], e[..., 1]) <= p[..., 1]) & (p[..., 1] <= np.maximum(s[..., 1], e[..., 1]))
            if (on & pair).any():
                return True
    return False


def _ring(coords: Any, label: str, where: str) -> np.ndarray:
    try:
        r = np.asarray(coords, dtype=np.float64)
    except (TypeError, ValueError):
        raise RoiError(f"{label}: {where}: coordinates are not numbers") from None
    if r.ndim != 2 or r.shape[1] < 2 or r.shape[0] < 3:
        raise RoiError(f"{label}: {where}: a ring needs at least 3 [x, y] positions")
    r = r[:, :2]
    if not np.isfinite(r).all():
        raise RoiError(f"{label}: {where}: coordinates must be finite numbers")
    if not np.array_equal(r[0], r[-1]):
        r = np.vstack([r, r[:1]])  # GeoJSON closes rings; an unclosed one is closed here
    keep = np.ones(len(r), bool)
    keep[1:] = np.any(r[1:] != r[:-1], axis=1)  # drop repeated consecutive vertices
    r = r[keep]
    if len(r) < 4:
        raise RoiError(f"{label}: {where}: a ring needs at least 3 distinct vertices")
    area = 0.5 * abs(float(np.sum(r[:-1, 0] * r[1:, 1] - r[1:, 0] * r[:-1, 1])))
    if area <= 0:
        raise RoiError(f"{label}: {where}: the ring has zero area")
    return r


def _polygons(geom: Any, label: str, where: str) -> list[list[Any]]:
    """The coordinate lists (rings) of each polygon of a geometry; [] for a non-polygonal one."""
    if not isinstance(geom, dict) or not isinstance(geom.get("type"), str):
        raise RoiError(f"{label}: {where}: not a GeoJSON geometry (an object with a \"type\")")
    t = geom["type"]
    if t == "GeometryCollection":
        parts = geom.get("geometries")
        if not isinstance(parts, list):
            raise RoiError(f"{label}: {where}: GeometryCollection without a \"geometries\" list")
        return [p for i, g in enumerate(parts) for p in _polygons(g, label, f"{where}.geometries[{i}]")]
    if t not in ("Polygon", "MultiPolygon"):
        return []
    c = geom.get("coordinates")
    if not isinstance(c, list) or not c:
        raise RoiError(f"{label}: {where}: {t} without coordinates")
    polys = [c] if t == "Polygon" else c
    if not all(isinstance(p, list) and p for p in polys):
        raise RoiError(f"{label}: {where}: {t} coordinates are not lists of rings")
    return polys


def _features(obj: Any, label: str) -> list[tuple[str, Any]]:
    """(where, geometry) of each ROI candidate of a GeoJSON value (layouts: module docstring)."""
    if isinstance(obj, dict) and obj.get("type") in _POLYGONAL + ("Point", "MultiPoint", "LineString",
                                                                    "MultiLineString"):
        return [("geometry", obj)]
    if isinstance(obj, dict) and obj.get("type") == "Feature":
        feats, base = [obj], "feature"
    elif isinstance(obj, dict) and obj.get("type") == "FeatureCollection":
        feats, base = obj.get("features"), "features"
        if not isinstance(feats, list):
            raise RoiError(f"{label}: FeatureCollection without a \"features\" list")
    elif isinstance(obj, list):
        feats, base = obj, ""
    else:
        raise RoiError(f"{label}: not a GeoJSON geometry, Feature, FeatureCollection or list of Features")
    out = []
    for i, f in enumerate(feats):
        where = f"{base}[{i}]" if base != "feature" else base
        if not isinstance(f, dict) or f.get("type") != "Feature":
            raise RoiError(f"{label}: {where}: not a GeoJSON Feature")
        props = f.get("properties") or {}
        kind = props.get("objectType") if isinstance(props, dict) else None
        if kind is not None and kind != "annotation":
            continue  # QuPath detections / cells / tiles are not regions of interest
        if f.get("geometry") is not None:
            out.append((f"{where}.geometry", f["geometry"]))
    return out


def roi_from_geojson(obj: Any, label: str) -> Roi:
    """The union of every (annotation) polygon of a GeoJSON value; ``label`` names it in errors and the summary."""
    polygons: list[tuple[np.ndarray, ...]] = []
    for where, geom in _features(obj, label):
        for pi, rings in enumerate(_polygons(geom, label, where)):
            polygons.append(tuple(_ring(r, label, f"{where} polygon {pi} ring {ri}") for ri, r in enumerate(rings)))
    if not polygons:
        raise RoiError(f"{label}: no Polygon or MultiPolygon annotation to use as the region of interest")
    roi = Roi(tuple(polygons), label, "polygon")
    if roi.n_vertices > MAX_ROI_VERTICES:
        raise RoiError(f"{label}: {roi.n_vertices} vertices; at most {MAX_ROI_VERTICES} (simplify the annotation)")
    for pi, poly in enumerate(polygons):
        for ri, ring in enumerate(poly):
            if _segments_cross(ring):
                raise RoiError(f"{label}: polygon {pi} ring {ri} intersects itself (draw it without crossing edges)")
    return roi


def read_roi_geojson(path: str | Path) -> Roi:
    """The ROI of a GeoJSON file (layouts: module docstring); errors name the file."""
    p = Path(path)
    return roi_from_geojson(read_json(p), str(p))  # unreadable / not UTF-8 / not JSON: InputFileError naming it


def parse_rect(text: str, label: str = "--roi") -> Roi:
    """``"x,y,w,h"`` (level-0 px, w and h > 0) -> a rectangle ROI."""
    parts = [s.strip() for s in str(text).split(",")]
    try:
        x, y, w, h = (float(s) for s in parts)
    except ValueError:
        raise RoiError(f"{label} {text}: expected x,y,w,h (four numbers, level-0 px) or a .geojson file") from None
    if not all(np.isfinite([x, y, w, h])) or w <= 0 or h <= 0:
        raise RoiError(f"{label} {text}: x, y must be finite and the width and height > 0 (level-0 px)")
    ring = np.array([[x, y], [x + w, y], [x + w, y + h], [x, y + h], [x, y]], np.float64)
    return Roi(((ring,),), f"{label} {text}", "rectangle")


def parse_roi_option(value: str, label: str = "--roi") -> Roi:
    """``--roi``: a ``.geojson``/``.json`` file, else ``x,y,w,h``."""
    if Path(value).suffix.lower() in (".geojson", ".json"):
        if not Path(value).is_file():
            raise RoiError(f"{label} {value}: no such file")
        return read_roi_geojson(value)
    return parse_rect(value, label)
