"""Cells from GeoJSON: the real CellViT++ and QuPath files of ../shared/data, and QuPath stand-ins for what that
file lacks (derived classes ``classification.names``, a cell's ``nucleusGeometry``), written the way QuPath's
``PathObjectTypeAdapters`` / ``GsonTools.PathClassTypeAdapter`` write them (qupath/qupath @e7662d8)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from hwsi.cells.cellvit import CellVitError, read_cellvit_cells
from hwsi.cells.geojson_cells import polygon_centroid


def test_real_cellvit_plus_plus_detection_geojson(shared_data: Path) -> None:
    """CellViT++'s <name>_cell_detection.geojson: 3 per-type MultiPoint 'annotation' features, 37,927 cells."""
    c = read_cellvit_cells(shared_data / "foreign/cellvit-plus-plus/JP2K-33003-2_cell_detection.geojson")
    assert len(c) == 37927
    assert np.bincount(c.types, minlength=7)[4:7].tolist() == [36, 3562, 34329]  # neoplastic, inflammatory, connective
    assert c.type_map == {4: "neoplastic", 5: "inflammatory", 6: "connective"}
    assert c.metadata["order"] == "grouped by type" and c.metadata["type_mapping"].unknown == ()
    assert c.contours is None  # detections are centroids only
    np.testing.assert_allclose(c.centroids[0], [20290.0, 9161.0])


def test_real_qupath_export_reads_cells_and_skips_annotations(shared_data: Path) -> None:
    """QuPath 0.6.0 export: 121 'cell' objects are cells; its 10 annotations (rectangles, circles, points) are not."""
    path = shared_data / "foreign/qupath/Single_cells.geojson"
    c = read_cellvit_cells(path)
    assert len(c) == 121
    assert c.metadata["skipped_objects"] == {"annotation": 10}
    assert c.types.tolist() == [0] * 121 and c.metadata["type_mapping"].unknown == ("single_cells_demo",)
    raw = json.loads(path.read_text())["features"]
    cells = [f for f in raw if f["properties"]["objectType"] == "cell"]
    assert c.contours is not None and len(c.contours) == 121
    ring = np.asarray(cells[0]["geometry"]["coordinates"][0], float)[:-1]
    np.testing.assert_allclose(c.contours[0], ring)  # no nucleusGeometry in this export: the cell outline is kept
    np.testing.assert_allclose(c.centroids[0], polygon_centroid(ring))
    lo, hi = ring.min(0), ring.max(0)
    assert (lo <= c.centroids[0]).all() and (c.centroids[0] <= hi).all()


def _qupath_feature(ring: list, object_type: str, classification: dict | None, nucleus: list | None = None) -> dict:
    ft = {"type": "Feature", "id": "5e0f7b8e-0000-4000-8000-000000000000",
          "geometry": {"type": "Polygon", "coordinates": [ring]}, "properties": {"objectType": object_type}}
    if nucleus is not None:
        ft["nucleusGeometry"] = {"type": "Polygon", "coordinates": [nucleus]}
    if classification is not None:
        ft["properties"]["classification"] = classification
    return ft


def _square(x: float, y: float, r: float) -> list:
    return [[x - r, y - r], [x + r, y - r], [x + r, y + r], [x - r, y + r], [x - r, y - r]]


def test_qupath_derived_classes_and_nucleus_geometry(tmp_path: Path) -> None:
    feats = [
        _qupath_feature(_square(0, 0, 500), "annotation", {"name": "Tumor", "color": [200, 0, 0]}),
        _qupath_feature(_square(100, 100, 12), "cell", {"names": ["Tumor", "Positive"], "color": [200, 0, 0]},
                        nucleus=_square(102, 98, 5)),
        _qupath_feature(_square(200, 100, 12), "cell", {"names": ["Immune cells", "Negative"], "color": [1, 2, 3]}),
        _qupath_feature(_square(300, 100, 6), "detection", {"name": "Stroma", "color": [150, 200, 150]}),
        _qupath_feature(_square(400, 100, 6), "detection", None),
        _qupath_feature(_square(0, 0, 64), "tile", None),
    ]
    p = tmp_path / "export.geojson"
    p.write_text(json.dumps({"type": "FeatureCollection", "features": feats}))
    c = read_cellvit_cells(p)
    assert len(c) == 4
    np.testing.assert_allclose(c.centroids, [[102, 98], [200, 100], [300, 100], [400, 100]])
    np.testing.assert_allclose(c.contours[0], np.asarray(_square(102, 98, 5))[:-1])  # the nucleus, not the cell
    assert c.types.tolist() == [4, 5, 6, 0]  # by base class "Tumor", "Immune cells"; Stroma; unclassified
    m = c.metadata["type_mapping"]
    assert m.by_base_class == ("Tumor: Positive", "Immune cells: Negative") and m.unknown == ()
    assert c.metadata["skipped_objects"] == {"annotation": 1, "tile": 1} and c.metadata["n_nucleus_outlines"] == 1


def test_annotations_only_is_an_error_naming_what_was_skipped(tmp_path: Path) -> None:
    p = tmp_path / "regions.geojson"
    p.write_text(json.dumps({"type": "FeatureCollection", "features": [
        _qupath_feature(_square(0, 0, 500), "annotation", {"name": "Tumor", "color": [200, 0, 0]})] * 2}))
    with pytest.raises(CellVitError, match=r"regions\.geojson: no cells: skipped 2 annotation object\(s\)"):
        read_cellvit_cells(p)


def test_cellvit_multipolygon_keeps_contours(tmp_path: Path) -> None:
    """CellViT's cells.geojson: one MultiPolygon per type, one polygon per nucleus (closed ring)."""
    feats = [{"type": "Feature", "id": "x", "geometry": {"type": "MultiPolygon", "coordinates": [
        [_square(10, 10, 2)], [_square(50, 10, 3)]]},
        "properties": {"objectType": "annotation", "classification": {"name": "Dead", "color": [254, 255, 0]}}}]
    p = tmp_path / "cells.geojson"
    p.write_text(json.dumps(feats))
    c = read_cellvit_cells(p)
    np.testing.assert_allclose(c.centroids, [[10, 10], [50, 10]])
    assert c.types.tolist() == [7, 7] and [len(r) for r in c.contours] == [4, 4]
    feats[0]["geometry"] = {"type": "LineString", "coordinates": [[0, 0], [1, 1]]}
    del feats[0]["properties"]["objectType"]  # plain GeoJSON of nuclei: every feature must be a cell
    p.write_text(json.dumps(feats))
    with pytest.raises(CellVitError, match="feature 0 is not a readable cell feature .*LineString"):
        read_cellvit_cells(p)
