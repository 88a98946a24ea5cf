"""`hwsi export` GeoJSON against QuPath's own layout (docs/formats-cells.md "Export to QuPath").

The layout is read from a real QuPath 0.6.0 export (``../shared/data/foreign/qupath/Single_cells.geojson``, read in
place): our features must use the Feature keys, geometry types, ``properties`` keys, ``objectType`` values,
``classification {name, color}`` and ``measurements`` form that QuPath writes. The export is then read back by
hwsi's own QuPath reader (nuclei, types, outlines) and its regions/tiles checked against the store's SPF numbers.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import numpy as np
import pytest

from hwsi.cells.cellvit import read_cellvit_cells
from hwsi.serve.geojson import NUCLEUS_MEASUREMENTS, QUPATH_CLASSES, QUPATH_REGION
from hwsi.store import SlideStore
from synthetic_store import make_synthetic_job

SID = "qp"
# QuPath's object types (qupath-core PathObjectTypeAdapters) and its standard classes (PathClass
# StandardPathClasses: name, RGB) for the types exported under them
QUPATH_OBJECT_TYPES = {"annotation", "detection", "cell", "tile", "tmaCore"}
QUPATH_STANDARD = {"Tumor": (200, 0, 0), "Stroma": (150, 200, 150), "Immune cells": (160, 90, 160),
                   "Necrosis": (50, 50, 50), "Other": (255, 200, 0), "Region*": (0, 0, 180)}


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> Path:
    job = tmp_path_factory.mktemp("qpjob")
    make_synthetic_job(job, SID, width=2048, height=1536, contours=True,
                       type_names={0: "unknown", 1: "neoplastic", 2: "inflammatory", 3: "connective"})
    return job


@pytest.fixture(scope="module")
def exported(job: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from hwsi.cli import main

    out = tmp_path_factory.mktemp("qpout") / f"{SID}.geojson"
    assert main(["export", str(job), SID, "--out", str(out), "--regions", "--patches"]) == 0
    return out


def _layout(features: list[dict]) -> dict[str, set]:
    """What a list of GeoJSON Features uses: Feature keys, geometry types, property keys, object types."""
    return {
        "feature_keys": {k for f in features for k in f},
        "geometry": {f["geometry"]["type"] for f in features},
        "properties": {k for f in features for k in f["properties"]},
        "object_types": {f["properties"]["objectType"] for f in features},
    }


def _check_feature_like_qupath(f: dict) -> None:
    uuid.UUID(f["id"])  # QuPath writes a UUID per object
    props = f["properties"]
    cls = props["classification"]
    assert set(cls) == {"name", "color"} and isinstance(cls["name"], str) and cls["name"]
    assert len(cls["color"]) == 3 and all(isinstance(c, int) and 0 <= c <= 255 for c in cls["color"])
    if "measurements" in props:  # QuPath 0.4+: a flat object name -> number (not 0.2's list of {name, value})
        m = props["measurements"]
        assert isinstance(m, dict) and m
        assert all(isinstance(k, str) and isinstance(v, float) and np.isfinite(v) for k, v in m.items())
    ring = f["geometry"]["coordinates"][0]
    assert len(f["geometry"]["coordinates"]) == 1 and ring[0] == ring[-1] and len(ring) >= 4  # closed exterior
    assert all(len(p) == 2 and all(isinstance(v, (int, float)) for v in p) for p in ring)


def test_export_uses_qupaths_own_layout(shared_data: Path, exported: Path) -> None:
    real = json.loads((shared_data / "foreign/qupath/Single_cells.geojson").read_text(encoding="utf-8"))
    ours = json.loads(exported.read_text(encoding="utf-8"))
    assert set(ours) == set(real) == {"type", "features"} and ours["type"] == real["type"] == "FeatureCollection"
    theirs, mine = _layout(real["features"]), _layout(ours["features"])
    assert mine["feature_keys"] == theirs["feature_keys"] == {"type", "id", "geometry", "properties"}
    assert mine["geometry"] <= theirs["geometry"]  # Polygon (QuPath also writes Point annotations)
    assert mine["properties"] <= theirs["properties"] | {"name"}, mine["properties"] - theirs["properties"]
    assert theirs["object_types"] <= QUPATH_OBJECT_TYPES and mine["object_types"] <= QUPATH_OBJECT_TYPES
    # QuPath's own classified objects pass the same per-feature check as ours
    for f in real["features"]:
        if "classification" in f["properties"] and f["geometry"]["type"] == "Polygon":
            _check_feature_like_qupath(f)
    for f in ours["features"]:
        _check_feature_like_qupath(f)
    # measurement names: QuPath's "<Compartment>: <name>" form ("Cell: Area", "Cytoplasm: CD68 max"); ours put the
    # nucleus measurements under QuPath's "Nucleus: " compartment
    real_keys = {k for f in real["features"] for k in f["properties"].get("measurements", {})}
    assert real_keys and all(": " in k for k in real_keys) and {k.split(": ")[0] for k in real_keys} == {
        "Cell", "Cytoplasm"}
    nuc = [f for f in ours["features"] if f["properties"]["objectType"] == "detection"]
    keys = {k for f in nuc for k in f["properties"]["measurements"]}
    assert "Nucleus: Area µm^2" in keys and all(k.startswith("Nucleus: ") for k in keys), keys


def test_export_nuclei_are_the_stored_outlines_and_read_back(job: Path, exported: Path) -> None:
    ours = json.loads(exported.read_text(encoding="utf-8"))
    nuc = [f for f in ours["features"] if f["properties"]["objectType"] == "detection"]
    with SlideStore(job / "stores" / f"{SID}.h5") as s:
        contours = s.cell_contours()
        types = s.cell_column("type").astype(int)
        area = s.cell_column("area_um2").astype(float)
    assert contours is not None and len(nuc) == len(contours) == len(types) > 20
    for f, c, a in zip(nuc, contours, area):
        ring = np.asarray(f["geometry"]["coordinates"][0])
        assert len(ring) == len(c) + 1 == 13  # the stored 12-vertex outline, closed; not the 16-gon fallback
        np.testing.assert_allclose(ring[:-1], c, atol=0.006)
        assert f["properties"]["measurements"]["Nucleus: Area µm^2"] == pytest.approx(a, abs=1e-3)
        assert "hwsi: equivalent radius px" not in f["properties"]["measurements"]
    # hwsi's QuPath names and colours are QuPath's standard classes
    names = {0: "Other", 1: "Tumor", 2: "Immune cells", 3: "Stroma"}
    for f, t in zip(nuc, types):
        cls = f["properties"]["classification"]
        assert cls["name"] == names[t] and tuple(cls["color"]) == QUPATH_STANDARD[names[t]]
    # hwsi's own QuPath reader reads the export back: same nuclei, outlines, and types
    back = read_cellvit_cells(exported)
    assert len(back) == len(nuc)
    assert back.metadata["skipped_objects"] == {"annotation": len(ours["features"]) - len(nuc)
                                                - sum(f["properties"]["objectType"] == "tile"
                                                      for f in ours["features"]),
                                                "tile": sum(f["properties"]["objectType"] == "tile"
                                                            for f in ours["features"])}
    code = {"neoplastic": 4, "inflammatory": 5, "connective": 6, "unknown": 0}
    expect = [code[{0: "unknown", 1: "neoplastic", 2: "inflammatory", 3: "connective"}[t]] for t in types]
    assert back.types.tolist() == expect
    for c, r in zip(contours, back.contours):
        np.testing.assert_allclose(r, c, atol=0.006)


def test_export_regions_and_tiles_carry_spf_relevance(job: Path, exported: Path) -> None:
    ours = json.loads(exported.read_text(encoding="utf-8"))
    with SlideStore(job / "stores" / f"{SID}.h5") as s:
        rc, tissue, rel, sel = s.region_coords(), s.patch_tissue(), s.spf_relevance(), s.spf_selected()
        rs, ps = s.meta.region_size_level0, s.meta.patch_size_level0
    regions = [f for f in ours["features"] if f["properties"]["classification"]["name"] == QUPATH_REGION[0]]
    assert len(regions) == len(rc)
    for f in regions:
        r = int(f["properties"]["measurements"]["hwsi: region"])
        assert f["properties"]["objectType"] == "annotation"
        assert tuple(f["properties"]["classification"]["color"]) == QUPATH_STANDARD["Region*"]
        x0, y0 = np.asarray(f["geometry"]["coordinates"][0]).min(0)
        x1, y1 = np.asarray(f["geometry"]["coordinates"][0]).max(0)
        assert (x0, y0, x1 - x0, y1 - y0) == (rc[r, 0], rc[r, 1], rs, rs)
        m = f["properties"]["measurements"]
        assert m["SPF relevance max"] == pytest.approx(float(np.nanmax(rel[r])), abs=1e-4)
        assert m["Tissue patches"] == tissue[r].sum() and m["SPF selected patches"] == (sel[r] >= 0).sum()
    tiles = [f for f in ours["features"] if f["properties"]["objectType"] == "tile"]
    assert len(tiles) == int(tissue.sum())
    n_selected = 0
    for f in tiles:
        m = f["properties"]["measurements"]
        r, g = int(m["hwsi: region"]), int(m["hwsi: patch"])
        assert tissue[r, g] and m["SPF relevance"] == pytest.approx(float(rel[r, g]), abs=1e-4)
        ring = np.asarray(f["geometry"]["coordinates"][0])
        assert (ring.max(0) - ring.min(0)).tolist() == [ps, ps]
        n_selected += int(m["SPF selected"])
        assert (m["SPF selected"] == 1) == (g in sel[r])
    assert n_selected == int((sel >= 0).sum())


def test_store_without_outlines_exports_equivalent_circles(tmp_path: Path) -> None:
    from hwsi.cli import main

    make_synthetic_job(tmp_path, "old", width=1024, height=1024)  # a store written before outlines were kept
    out = tmp_path / "old.geojson"
    assert main(["export", str(tmp_path), "old", "--out", str(out), "--no-spf"]) == 0
    nuc = json.loads(out.read_text())["features"]
    assert nuc and all(len(f["geometry"]["coordinates"][0]) == 17 for f in nuc)  # 16-gon, closed
    assert all(f["properties"]["measurements"]["hwsi: equivalent radius px"] > 0 for f in nuc)
    assert {f["properties"]["classification"]["name"] for f in nuc} <= {"Other", "small_round", "large_atypical",
                                                                         "elongated"}
    assert QUPATH_CLASSES["unknown"][0] == "Other" and "area_um2" in NUCLEUS_MEASUREMENTS
