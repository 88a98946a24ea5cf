"""Cells from GeoJSON: CellViT's per-type features and QuPath exports (docs/formats-cells.md "GeoJSON").

* CellViT (v1, CellViT-Inference, CellViT++) writes ``cells.geojson`` / ``cell_detection.geojson`` as a list of
  Features, ONE PER CELL TYPE, ``properties.objectType = "annotation"``, ``classification = {"name", "color"}`` and
  geometry MultiPolygon (one polygon per nucleus contour) or MultiPoint (one point per centroid).
* QuPath (0.4–0.6, File › Export objects as GeoJSON) writes a ``FeatureCollection``, one Feature per object, with
  ``properties.objectType`` ``annotation`` | ``detection`` | ``cell`` | ``tile`` | ``tmaCore``; a cell's Polygon
  geometry is its CELL boundary and the nucleus sits in the Feature's ``nucleusGeometry``; ``classification`` is
  ``{"name": ...}`` or, for a derived class, ``{"names": ["Tumor", "Positive"]}`` (displayed "Tumor: Positive").

Read as cells: every ``cell`` and ``detection`` object (nucleus outline = ``nucleusGeometry`` where present, else the
object's own geometry); features without ``objectType`` (plain GeoJSON of nuclei); and, only in a file that holds no
cell/detection object, CellViT's per-type annotation features (MultiPoint/MultiPolygon). Everything else
(annotation regions, tiles, TMA cores) is skipped and counted in ``metadata["skipped_objects"]``. Class names map
into the type table (:func:`hwsi.cells.nucleus_types.map_type_names`). Coordinates are level-0 pixels.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from hwsi.cells.cell_files import CellVitCells, CellVitError
from hwsi.cells.nucleus_types import ALL_TYPE_NAMES, map_type_names

CELL_OBJECTS = ("cell", "detection")
_MULTI = ("MultiPoint", "MultiPolygon")


def class_name(props: dict[str, Any]) -> str | None:
    """The classification as QuPath displays it: ``name``, or ``names`` joined by ``": "``; None if unclassified."""
    cls = props.get("classification")
    if isinstance(cls, str):
        return cls
    if not isinstance(cls, dict):
        return None
    names = cls.get("names")
    if isinstance(names, list) and names:
        return ": ".join(str(n) for n in names)
    name = cls.get("name")
    return None if name is None else str(name)


def object_type(props: dict[str, Any]) -> str | None:
    """QuPath's object type (``objectType``; older exports ``object_type`` or ``type``), None where absent."""
    for key in ("objectType", "object_type", "type"):
        if isinstance(props.get(key), str):
            return str(props[key])
    return None


def _ring(poly: Any) -> np.ndarray:
    ring = np.asarray(poly[0], dtype=np.float64).reshape(-1, 2)
    if len(ring) > 1 and np.array_equal(ring[0], ring[-1]):
        ring = ring[:-1]
    return ring


def polygon_centroid(ring: np.ndarray) -> np.ndarray:
    """Area centroid of a polygon ring (x, y); the vertex mean where the area is ~0."""
    x, y = ring[:, 0], ring[:, 1]
    xs, ys = np.roll(x, -1), np.roll(y, -1)
    cross = x * ys - xs * y
    area = cross.sum() / 2
    if abs(area) < 1e-9:
        return ring.mean(axis=0)
    return np.array([((x + xs) * cross).sum(), ((y + ys) * cross).sum()]) / (6 * area)


def _points_and_rings(geom: dict[str, Any]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(centroids, outlines) of the shapes in one geometry: one entry per point or polygon."""
    gtype, coords = geom["type"], geom["coordinates"]
    if gtype == "Point":
        return [np.asarray(coords, dtype=np.float64).reshape(2)], [np.zeros((0, 2))]
    if gtype == "MultiPoint":
        pts = np.asarray(coords, dtype=np.float64).reshape(-1, 2)
        return list(pts), [np.zeros((0, 2)) for _ in range(len(pts))]
    if gtype in ("Polygon", "MultiPolygon"):
        rings = [_ring(p) for p in (coords if gtype == "MultiPolygon" else [coords])]
        return [polygon_centroid(r) for r in rings], rings
    raise ValueError(f"unsupported geometry {gtype!r}")


def _one_cell(ft: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """(centroid, nucleus outline) of one QuPath cell/detection: nucleusGeometry where present, else geometry;
    of several polygons the largest."""
    geom = ft.get("nucleusGeometry") or ft["geometry"]
    cents, rings = _points_and_rings(geom)
    if not cents:
        raise ValueError("empty geometry")
    k = int(np.argmax([len(r) for r in rings]))
    return cents[k], rings[k]


def cells_from_geojson(path: Path, data: Any) -> CellVitCells:
    """Cells of a CellViT or QuPath GeoJSON document (already parsed); see the module docstring."""
    feats = data.get("features", []) if isinstance(data, dict) and data.get("type") == "FeatureCollection" \
        else [data] if isinstance(data, dict) else data
    if not isinstance(feats, list):
        raise CellVitError(path, "expected a GeoJSON FeatureCollection or a list of Features")
    props_of = [ft["properties"] if isinstance(ft, dict) and isinstance(ft.get("properties"), dict) else {}
                for ft in feats]
    kinds = [object_type(p) for p in props_of]
    has_cell_objects = any(k in CELL_OBJECTS for k in kinds)
    cents: list[np.ndarray] = []
    rings: list[np.ndarray] = []
    names: list[str | None] = []
    skipped: dict[str, int] = {}
    n_nucleus = 0
    for j, (ft, props, kind) in enumerate(zip(feats, props_of, kinds)):
        try:
            if not isinstance(ft, dict) or not isinstance(ft.get("geometry"), dict):
                raise ValueError("no geometry")
            if kind in CELL_OBJECTS:
                c, r = _one_cell(ft)
                n_nucleus += isinstance(ft.get("nucleusGeometry"), dict)
                cents.append(c)
                rings.append(r)
                names.append(class_name(props))
            elif kind is None or (kind == "annotation" and not has_cell_objects
                                  and ft["geometry"].get("type") in _MULTI):
                cs, rs = _points_and_rings(ft["geometry"])
                cents.extend(cs)
                rings.extend(rs)
                names.extend([class_name(props)] * len(cs))
            else:
                skipped[kind] = skipped.get(kind, 0) + 1
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise CellVitError(path, f"feature {j} is not a readable cell feature ({exc})") from exc
    if not cents and skipped:
        what = ", ".join(f"{v} {k}" for k, v in skipped.items())
        raise CellVitError(path, f"no cells: skipped {what} object(s); hwsi reads QuPath cell/detection objects "
                                 "or CellViT's per-type MultiPoint/MultiPolygon features")
    mapping = map_type_names(names)
    types = np.array([mapping.codes["" if n is None else n] for n in names], dtype=np.int16)
    cent = np.asarray(cents, dtype=np.float64).reshape(-1, 2)
    if not np.isfinite(cent).all():
        raise CellVitError(path, "non-finite centroid coordinates")
    present = sorted({int(t) for t in types})
    meta = {"order": "qupath objects" if has_cell_objects else "grouped by type",
            "skipped_objects": skipped, "n_nucleus_outlines": n_nucleus, "type_mapping": mapping}
    return CellVitCells(cent, types, np.ones(len(cent), np.float32), {c: ALL_TYPE_NAMES[c] for c in present}, None,
                        rings if any(len(r) for r in rings) else None, None, str(path), meta)
