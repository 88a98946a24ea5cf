"""A region of interest on a slide: a level-0 rectangle or the union of GeoJSON polygons (docs/roi.md).
This module owns reading GeoJSON polygons (QuPath annotations) and ROIs and placing an ROI on a store's patch grid
(:func:`place_roi`, no torch: the server checks an ROI with it). It sits in the slide stage because `hwsi tile
--annotations` needs the same reading (:mod:`hwsi.slide.annotations`); :mod:`hwsi.model.roi` selects the slide's
tokens inside an ROI.

    roi = parse_rect("2048,0,1024,1024", "--roi")          # x, y, w, h in level-0 pixels
    roi = read_roi_geojson("annotations.geojson")          # QuPath's export, a Feature, a FeatureCollection, ...
    roi = roi_from_geojson({"type": "Polygon", "coordinates": [...]}, "roi")   # an API body's geometry
    [(where, props, (exterior, *holes)), ...] = geojson_polygons(obj, "FILE")  # checked polygons + properties
    roi.contains(points_level0)                            # (N, 2) -> (N,) bool, holes excluded, polygons united
    placed = place_roi(store, roi)                         # tissue patches inside; RoiError if outside / none

GeoJSON layouts read (coordinates are level-0 pixels, y down, as QuPath 0.2–0.6 writes them with File › Export
objects as GeoJSON): a bare Polygon / MultiPolygon / GeometryCollection geometry, a Feature, a FeatureCollection,
or a JSON list of Features (QuPath's layout without "Export as FeatureCollection"). Features whose
``properties.objectType`` is set and is not ``"annotation"`` (detections, cells, tiles, TMA cores) are skipped;
non-polygon geometries (points, lines) too. Every polygon kept is united with the others.

Refused (a :class:`RoiError` naming the option or file): not 4 numbers / not GeoJSON, no polygon, a ring of fewer
than 3 distinct vertices or of zero area, a self-intersecting ring, non-finite coordinates, more than
:data:`MAX_ROI_VERTICES` vertices in all (``max_vertices`` of :func:`geojson_polygons`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hwsi.errors import HwsiError
from hwsi.store import SlideStore
from hwsi.textio import read_json

MAX_ROI_VERTICES = 5_000  # all rings together, for an ROI: its point test (patch centres x edges) runs per request
_POLYGONAL = ("Polygon", "MultiPolygon", "GeometryCollection")


class RoiError(HwsiError):
    """An ROI cannot be used; the message starts with the option or file that gave it."""


EXCLUDE_CLASSES = frozenset({"ignore", "exclude", "excluded", "exclusion"})


def class_names(props: dict[str, Any]) -> list[str]:
    """The parts of a Feature's QuPath class: ``{"name": "Tumor"}`` -> ["Tumor"], ``{"names": ["Ignore*", "pen"]}``
    -> ["Ignore*", "pen"], a name with ``": "`` split the same way; [] when unclassified."""
    cls = props.get("classification")
    if isinstance(cls, str):
        return [p.strip() for p in cls.split(":")]
    if not isinstance(cls, dict):
        return []
    names = cls.get("names")
    if isinstance(names, list) and names:
        return [str(n).strip() for n in names]
    name = cls.get("name")
    return [] if name is None else [p.strip() for p in str(name).split(":")]


def is_exclusion(props: dict[str, Any]) -> bool:
    """True when a Feature's QuPath class marks an area to leave out: QuPath's ``Ignore*``, or ``Exclude``,
    ``Excluded``, ``Exclusion`` (:data:`EXCLUDE_CLASSES`; any case, a trailing ``*`` dropped, any part of a derived
    class). ``Other`` is not: it is QuPath's class for other tissue."""
    return any(n.rstrip("*").strip().lower() in EXCLUDE_CLASSES for n in class_names(props))


def _in_polygons(pts: np.ndarray, polygons: tuple[tuple[np.ndarray, ...], ...]) -> np.ndarray:
    """(M, 2) -> (M,) bool: inside at least one polygon (its exterior, none of its holes; even–odd rule)."""
    out = np.zeros(len(pts), bool)
    for poly in polygons:
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


@dataclass(frozen=True)
class Roi:
    """The union of ``polygons`` minus the union of ``exclude``; each polygon is its exterior ring then its holes,
    (n, 2) float64 level-0 px."""

    polygons: tuple[tuple[np.ndarray, ...], ...]
    label: str  # where it came from: "--roi 0,0,512,512", a file name, "roi" (an API body)
    kind: str  # "rectangle" | "polygon"
    exclude: tuple[tuple[np.ndarray, ...], ...] = ()  # a GeoJSON file's Ignore* / Exclude annotations

    @property
    def bounds_level0(self) -> tuple[float, float, float, float]:
        """(x0, y0, x1, y1) of the exterior rings, level-0 px."""
        pts = np.concatenate([p[0] for p in self.polygons])
        return float(pts[:, 0].min()), float(pts[:, 1].min()), float(pts[:, 0].max()), float(pts[:, 1].max())

    @property
    def n_vertices(self) -> int:
        return sum(len(r) - 1 for p in self.polygons + self.exclude for r in p)

    def contains(self, points_level0: np.ndarray) -> np.ndarray:
        """(N, 2) level-0 points -> (N,) bool: inside at least one polygon (inside its exterior, in none of its
        holes; even–odd rule over the polygon's rings) and in no exclusion. Points exactly on an edge count as
        inside on the left/top edges only (the usual half-open rule), so a grid of rectangles splits patch centres
        without overlap."""
        pts = np.asarray(points_level0, np.float64).reshape(-1, 2)
        out = _in_polygons(pts, self.polygons)
        if self.exclude and out.any():
            idx = np.flatnonzero(out)
            out[idx[_in_polygons(pts[idx], self.exclude)]] = False
        return out

    def to_geojson(self) -> dict[str, Any]:
        """The ROI as one GeoJSON MultiPolygon geometry (what the chat history records); exclusions, where there
        are, as the foreign member ``"exclude"`` (MultiPolygon coordinates)."""
        out: dict[str, Any] = {"type": "MultiPolygon",
                               "coordinates": [[np.round(r, 2).tolist() for r in p] for p in self.polygons]}
        if self.exclude:
            out["exclude"] = [[np.round(r, 2).tolist() for r in p] for p in self.exclude]
        return out

    def describe(self) -> str:
        """``"x 0..1024, y 0..1024 (level-0 px, rectangle)"`` or ``"... (level-0 px, 2 polygons of FILE)"``."""
        x0, y0, x1, y1 = (int(round(v)) for v in self.bounds_level0)
        if self.kind == "rectangle":
            return f"x {x0}..{x1}, y {y0}..{y1} (level-0 px, rectangle)"
        n, m = len(self.polygons), len(self.exclude)
        minus = f" minus {m} exclusion{'s' if m != 1 else ''}" if m else ""
        return (f"x {x0}..{x1}, y {y0}..{y1} (level-0 px, {n} polygon{'s' if n != 1 else ''}{minus} of "
                f"{self.label})")


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


def _candidate_pairs(lo: np.ndarray, hi: np.ndarray, chunk: int = 1 << 22) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(i, j) edge index pairs, i != j, whose x extents overlap: a sweep over the edges sorted by their left end,
    each paired with the later ones that start before it ends (about n x the edges a vertical line meets, not n²,
    for an outline), in chunks of at most ``chunk`` pairs (one edge's pairs are never split)."""
    n = len(lo)
    order = np.argsort(lo[:, 0], kind="stable")
    x0, x1 = lo[order, 0], hi[order, 0]
    stop = np.searchsorted(x0, x1, side="right")  # sorted edges k+1 .. stop-1 start before edge k ends
    counts = np.maximum(stop - np.arange(n) - 1, 0)
    total = np.concatenate([[0], np.cumsum(counts)])
    k0 = 0
    while k0 < n:
        k1 = max(k0 + 1, int(np.searchsorted(total, total[k0] + chunk, side="right")) - 1)
        k1 = min(k1, n)
        c = counts[k0:k1]
        if c.sum():
            ks = np.repeat(np.arange(k0, k1), c)
            ms = ks + 1 + np.arange(len(ks)) - np.repeat(total[k0:k1] - total[k0], c)
            yield order[ks], order[ms]
        k0 = k1


def _segments_cross(ring: np.ndarray) -> bool:
    """True if two non-adjacent edges of a closed ring (n+1, 2) intersect (touching counts). Only edge pairs whose
    bounding boxes overlap are tested (:func:`_candidate_pairs`), so an outline of 10^5 vertices takes about a
    second."""
    a, b = ring[:-1], ring[1:]
    n = len(a)
    if n < 4:
        return False
    lo_xy, hi_xy = np.minimum(a, b), np.maximum(a, b)

    def orient(p: np.ndarray, q: np.ndarray, r: np.ndarray) -> np.ndarray:
        return np.sign((q[:, 0] - p[:, 0]) * (r[:, 1] - p[:, 1]) - (q[:, 1] - p[:, 1]) * (r[:, 0] - p[:, 0]))

    def on_segment(p: np.ndarray, s: np.ndarray, e: np.ndarray) -> np.ndarray:
        return np.all((np.minimum(s, e) <= p) & (p <= np.maximum(s, e)), axis=1)

    for ii, jj in _candidate_pairs(lo_xy, hi_xy):
        d = np.abs(ii - jj)
        keep = ((d > 1) & (d != n - 1)  # not neighbours (the ring closes: edge 0 meets edge n-1)
                & (lo_xy[ii, 1] <= hi_xy[jj, 1]) & (lo_xy[jj, 1] <= hi_xy[ii, 1]))
        ii, jj = ii[keep], jj[keep]
        if ii.size == 0:
            continue
        p1, p2, q1, q2 = a[ii], b[ii], a[jj], b[jj]
        o1, o2, o3, o4 = orient(p1, p2, q1), orient(p1, p2, q2), orient(q1, q2, p1), orient(q1, q2, p2)
        if ((o1 * o2 < 0) & (o3 * o4 < 0)).any():
            return True
        if (((o1 == 0) & on_segment(q1, p1, p2)) | ((o2 == 0) & on_segment(q2, p1, p2))
                | ((o3 == 0) & on_segment(p1, q1, q2)) | ((o4 == 0) & on_segment(p2, q1, q2))).any():
            return True  # collinear overlap or an endpoint on the other edge
    return False


def _ring(coords: Any, label: str, where: str, max_vertices: int = MAX_ROI_VERTICES) -> np.ndarray:
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
    if len(r) - 1 > max_vertices:
        raise _too_many(f"{label}: {where}: {len(r) - 1} vertices; at most {max_vertices} in all")
    if _segments_cross(r):
        raise RoiError(f"{label}: {where} intersects itself (draw it without crossing edges)")
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


def _features(obj: Any, label: str) -> list[tuple[str, Any, dict[str, Any]]]:
    """(where, geometry, properties) of each ROI candidate of a GeoJSON value (layouts: module docstring);
    properties are ``{}`` for a bare geometry or a Feature without them."""
    if isinstance(obj, dict) and obj.get("type") in _POLYGONAL + ("Point", "MultiPoint", "LineString",
                                                                    "MultiLineString"):
        return [("geometry", obj, {})]
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
        props = f.get("properties") if isinstance(f.get("properties"), dict) else {}
        kind = props.get("objectType")
        if kind is not None and kind != "annotation":
            continue  # QuPath detections / cells / tiles are not regions of interest
        if f.get("geometry") is not None:
            out.append((f"{where}.geometry", f["geometry"], props))
    return out


def _too_many(what: str) -> RoiError:
    return RoiError(f"{what} (simplify the annotation, e.g. QuPath's Objects > Annotations > Simplify shape)")


def geojson_polygons(obj: Any, label: str, max_vertices: int = MAX_ROI_VERTICES,
                     ) -> list[tuple[str, dict[str, Any], tuple[np.ndarray, ...]]]:
    """Every (annotation) polygon of a GeoJSON value, checked (module docstring), with where it is and the
    properties of the Feature it came from: ``[("features[3].geometry polygon 0", properties, (exterior, *holes)),
    ...]``; [] when there is none."""
    found = [(where, props, pi, rings) for where, geom, props in _features(obj, label)
             for pi, rings in enumerate(_polygons(geom, label, where))]
    n_listed = sum(len(r) if isinstance(r, list) else 0 for *_, rings in found for r in rings)
    if n_listed > max_vertices + len(found) * 8:  # before any per-ring work (closing positions allowed for)
        raise _too_many(f"{label}: {n_listed} positions; at most {max_vertices} vertices")
    out = [(f"{where} polygon {pi}", props, tuple(_ring(r, label, f"{where} polygon {pi} ring {ri}", max_vertices)
                                                  for ri, r in enumerate(rings)))
           for where, props, pi, rings in found]
    n = sum(len(r) - 1 for *_, p in out for r in p)
    if n > max_vertices:
        raise _too_many(f"{label}: {n} vertices; at most {max_vertices}")
    return out


def roi_from_geojson(obj: Any, label: str) -> Roi:
    """The union of every (annotation) polygon of a GeoJSON value minus those classed as exclusions
    (:func:`is_exclusion`: QuPath's ``Ignore*``, ``Exclude``, ...); ``label`` names it in errors and the summary."""
    found = geojson_polygons(obj, label)
    polygons = [p for _, props, p in found if not is_exclusion(props)]
    if not polygons:
        what = "only Ignore*/Exclude annotations, nothing" if found else "no Polygon or MultiPolygon annotation"
        raise RoiError(f"{label}: {what} to use as the region of interest")
    return Roi(tuple(polygons), label, "polygon", tuple(p for _, props, p in found if is_exclusion(props)))


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


@dataclass
class RoiPlacement:
    """An ROI on a store's region/patch grid: which tissue patches have their centre inside."""

    inside: np.ndarray  # (R, G) bool, tissue patches with the centre inside the ROI
    overlap: np.ndarray  # (R,) share of each region's tissue patches inside
    patch_coords_level0: np.ndarray  # (R, G, 2) top-left corners
    patch_size_level0: float


def place_roi(store: str | Path, roi: Roi) -> RoiPlacement:
    """Where ``roi`` falls on the store's patches; RoiError when it lies outside the slide or holds no tissue patch
    (a patch counts when its centre lies inside)."""
    with SlideStore(Path(store)) as s:
        meta = s.meta
        pcoords = s.patch_coords().astype(np.float64)
        n_regions, g = pcoords.shape[:2]
        tissue = s.patch_tissue() if s.has("patches/tissue") else np.ones((n_regions, g), bool)
    width, height = float(meta.level0_width), float(meta.level0_height)
    x0, y0, x1, y1 = roi.bounds_level0
    if x1 <= 0 or y1 <= 0 or x0 >= width or y0 >= height:
        raise RoiError(f"{roi.label}: lies outside the slide (ROI {roi.describe()}; level 0 is "
                       f"{int(width)} x {int(height)} px)")
    ps = float(meta.patch_size_level0)
    inside = roi.contains(pcoords.reshape(-1, 2) + ps / 2).reshape(n_regions, g) & tissue
    if not inside.any():
        raise RoiError(f"{roi.label}: contains no tissue patch of the slide (ROI {roi.describe()}; a patch counts "
                       f"when its centre lies inside, patches are {ps:g} level-0 px)")
    n_tissue = tissue.sum(1)
    overlap = np.where(n_tissue > 0, inside.sum(1) / np.maximum(n_tissue, 1), 0.0)
    return RoiPlacement(inside, overlap, pcoords, ps)
