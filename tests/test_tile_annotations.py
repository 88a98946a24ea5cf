"""`hwsi tile --annotations`: QuPath GeoJSON annotations restrict the grid (hwsi.slide.annotations; docs/slide.md).

Annotation files are written in QuPath's own export layout (qupath-core PathObjectTypeAdapters: a FeatureCollection,
or the bare list of Features QuPath writes without "Export as FeatureCollection"; ``id``, ``objectType``,
``classification {name | names, color}``, ``isLocked``), and the real QuPath 0.6.0 export of ../shared/data is
used as it is. The kept patches are checked against the polygons with the ROI reader's point test (ray casting,
not the rasteriser the tiler uses).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from hwsi.cli import main
from hwsi.slide.annotations import read_tile_annotations
from hwsi.slide.roi_geometry import RoiError, is_exclusion, place_roi, read_roi_geojson, roi_from_geojson
from hwsi.store import SlideStore, list_stores
from hwsi.synth.pyramid import write_pyramid_tiff

W = H = 1024
TILE = ["--region-size", "512", "--patch-size", "64", "--target-mpp", "0.5", "-q"]


def _tissue(x0: int, y0: int, w: int, h: int) -> np.ndarray:
    yy, xx = np.mgrid[y0: y0 + h, x0: x0 + w]
    return np.stack([200 + 0 * xx, 110 + (xx % 40), 170 + (yy % 30)], -1).astype(np.uint8)  # tissue everywhere


@pytest.fixture(scope="module")
def slides(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("annslides")
    for name in ("a", "b"):
        write_pyramid_tiff(d / f"{name}.tiff", W, H, 0.5, _tissue, tile_size=256, threads=1, min_level_side=256)
    return d


def _feature(geom: dict, object_type: str = "annotation", cls: dict | None = None) -> dict:
    props: dict = {"objectType": object_type}
    if cls is not None:
        props["classification"] = cls
    props["isLocked"] = False
    return {"type": "Feature", "id": "6f1d0c7e-2b9a-4d7e-9a51-0c7c6f3a9e10", "geometry": geom, "properties": props}


def _rect(x: float, y: float, w: float, h: float) -> list:
    return [[x, y], [x + w, y], [x + w, y + h], [x, y + h], [x, y]]


def _poly(*rings: list) -> dict:
    return {"type": "Polygon", "coordinates": list(rings)}


def _write(path: Path, obj: object) -> Path:
    path.write_text(json.dumps(obj), encoding="utf-8")
    return path


def _tile(job: Path, slide: Path, ann: Path | None, *extra: str) -> tuple[np.ndarray, np.ndarray, float]:
    args = ["tile", str(slide), "--out", str(job), *TILE, *extra]
    assert main(args + (["--annotations", str(ann)] if ann else [])) == 0
    with SlideStore(job / "stores" / f"{slide.stem}.h5") as s:
        pc, pt = s.patch_coords().reshape(-1, 2), s.patch_tissue().reshape(-1)
        return pc[pt], pc, float(s.meta.patch_size_level0)


def _inside_share(roi_obj: object, corners: np.ndarray, size: float) -> np.ndarray:
    """Share of each patch's area inside a GeoJSON value's polygons (8 x 8 sample points, ray casting)."""
    roi = roi_from_geojson(roi_obj, "test")
    off = (np.arange(8) + 0.5) * size / 8
    pts = corners[:, None, :] + np.stack(np.meshgrid(off, off), -1).reshape(1, -1, 2)
    return roi.contains(pts.reshape(-1, 2)).reshape(len(corners), -1).mean(1)


def test_include_minus_exclusions_in_qupaths_feature_collection(slides: Path, tmp_path: Path) -> None:
    ann = _write(tmp_path / "a.geojson", {"type": "FeatureCollection", "features": [
        _feature(_poly(_rect(0, 0, 512, 1024)), cls={"name": "Tumor", "color": [200, 0, 0]}),  # include: left half
        _feature(_poly(_rect(128, 128, 256, 256)), cls={"name": "Ignore*", "color": [180, 180, 180]}),  # exclusion
        _feature(_poly(_rect(600, 600, 50, 50)), object_type="detection"),  # a detection: skipped
    ]})
    kept, _, p = _tile(tmp_path / "job", slides / "a.tiff", ann)
    whole, _, _ = _tile(tmp_path / "whole", slides / "a.tiff", None)
    assert len(whole) == (W // 64) * (H // 64)  # everything is tissue without annotations
    centre = kept + p / 2
    assert (centre[:, 0] < 512).all() and not ((centre >= 128) & (centre < 384)).all(1).any()
    assert len(kept) == 8 * 16 - 4 * 4  # left half, minus the 4 x 4 patches of the exclusion
    with SlideStore(tmp_path / "job" / "stores" / "a.h5") as s:
        rec = json.loads(s.attr("annotations"))
        mask, _ = s.tissue_mask()
    assert rec["file"] == str(ann) and rec["include_polygons"] == 1 and rec["exclude_polygons"] == 1
    assert 0.35 < mask.mean() < 0.45  # the stored tissue mask is the annotated tissue (0.5 - 1/16)


def test_bare_feature_list_multipolygon_holes_and_derived_exclusion(slides: Path, tmp_path: Path) -> None:
    """QuPath's list-of-Features layout; a MultiPolygon with a hole; a derived class {names: [Ignore*, pen]}."""
    disc = [[512 + 400 * np.cos(t), 512 + 400 * np.sin(t)] for t in np.linspace(0, 2 * np.pi, 60)[:-1]]
    disc.append(disc[0])
    hole = _rect(448, 448, 128, 128)[::-1]
    feats = [
        _feature({"type": "MultiPolygon", "coordinates": [[disc, hole]]}, cls={"name": "Region*", "color": [0, 0, 180]}),
        _feature(_poly(_rect(0, 900, 1024, 124)), cls={"names": ["Ignore*", "pen"], "color": [180, 180, 180]}),
        _feature({"type": "Point", "coordinates": [10, 10]}),  # a point annotation: skipped
    ]
    ann = _write(tmp_path / "list.geojson", feats)
    kept, allp, p = _tile(tmp_path / "job", slides / "a.tiff", ann, "--min-patch-tissue", "0.5")
    include = {"type": "MultiPolygon", "coordinates": [[disc, hole]]}
    share = _inside_share(include, allp, p)
    share[allp[:, 1] + p > 900] *= 0  # the exclusion strip
    kept_set = {tuple(c) for c in kept.tolist()}
    got = np.array([tuple(c) in kept_set for c in allp.tolist()])
    assert got[share >= 0.65].all() and not got[share <= 0.35].any()  # the mask rasterises at 8 px here
    assert not got[(allp[:, 0] >= 448) & (allp[:, 0] < 576) & (allp[:, 1] >= 448) & (allp[:, 1] < 576)].any()


def test_only_exclusions_keep_the_rest_of_the_slide(slides: Path, tmp_path: Path) -> None:
    ann = _write(tmp_path / "x.geojson", {"type": "FeatureCollection", "features": [
        _feature(_poly(_rect(0, 0, 1024, 256)), cls={"name": "Exclude", "color": [0, 0, 0]})]})
    kept, _, p = _tile(tmp_path / "job", slides / "a.tiff", ann)
    assert len(kept) == 16 * 12 and (kept[:, 1] >= 256).all()
    assert is_exclusion({"classification": {"name": "ignore"}}) and not is_exclusion(
        {"classification": {"name": "Other", "color": [255, 200, 0]}})  # QuPath's Other is tissue, not an exclusion


def test_a_real_qupath_export_restricts_the_grid_to_its_annotations(shared_data: Path, slides: Path,
                                                                     tmp_path: Path) -> None:
    path = shared_data / "foreign/qupath/Single_cells.geojson"
    ann = read_tile_annotations(path)
    assert len(ann.include) == 7 and not ann.exclude  # 7 polygon annotations; 3 points and 121 cells skipped
    kept, allp, p = _tile(tmp_path / "job", slides / "a.tiff", path)
    share = _inside_share(json.loads(path.read_text(encoding="utf-8")), allp, p)
    kept_set = {tuple(c) for c in kept.tolist()}
    got = np.array([tuple(c) in kept_set for c in allp.tolist()])
    assert got[share >= 0.5].all() and not got[share <= 0.05].any() and 0 < got.sum() < 256 // 2
    assert len(allp) == 3 * 64  # the region x 0..512, y 512..1024 holds no annotation: dropped


def test_a_folder_of_annotations_maps_files_to_slides(slides: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "ann"
    folder.mkdir()
    _write(folder / "a.tiff.geojson", [_feature(_poly(_rect(0, 0, 256, 256)))])  # QuPath names it by image name
    job = tmp_path / "job"
    assert main(["tile", str(slides), "--out", str(job), *TILE, "--annotations", str(folder)]) == 0
    assert "no annotation file for 1 slide(s) (b); tiled whole" in capsys.readouterr().err
    with SlideStore(job / "stores" / "a.h5") as sa, SlideStore(job / "stores" / "b.h5") as sb:
        assert sa.patch_tissue().sum() == 16 and sb.patch_tissue().sum() == 256
        assert sb.attr("annotations") is None


BOWTIE = [[0, 0], [500, 500], [500, 0], [0, 500], [0, 0]]


@pytest.mark.parametrize("content, words", [
    ("{not json", "not valid JSON"),
    (json.dumps({"type": "FeatureCollection", "features": [_feature({"type": "Point", "coordinates": [1, 2]})]}),
     "no Polygon or MultiPolygon annotation"),
    (json.dumps([_feature(_poly(_rect(1, 1, 9, 9)), object_type="detection")]), "no Polygon or MultiPolygon"),
    (json.dumps({"type": "FeatureCollection", "features": [_feature(_poly(_rect(800, 800, 400, 100)))]}),
     "vertex (1200, 800) lies outside the slide (1024 x 1024 level-0 px)"),
    (json.dumps([_feature(_poly(_rect(0, 0, 100, 100)), cls={"name": "Ignore*"}),
                 _feature(_poly(_rect(-50, 0, 10, 10)), cls={"name": "Ignore*"})]), ": [1].geometry polygon 0: vertex (-50, 0)"),
    (json.dumps({"type": "FeatureCollection", "features": [_feature(_poly(BOWTIE))]}), "intersects itself"),
    (json.dumps({"type": "Topology"}), "not a GeoJSON geometry, Feature, FeatureCollection"),
])
def test_bad_annotation_files_are_one_line_exit_2(slides: Path, tmp_path: Path, content: str, words: str,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.geojson"
    bad.write_text(content, encoding="utf-8")
    job = tmp_path / "job"
    assert main(["tile", str(slides / "a.tiff"), "--out", str(job), *TILE, "--annotations", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(bad) in err and words in err, err
    assert not list_stores(job)  # nothing tiled


def test_one_file_for_many_slides_or_a_missing_path_is_refused(slides: Path, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    ann = _write(tmp_path / "a.geojson", [_feature(_poly(_rect(0, 0, 256, 256)))])
    assert main(["tile", str(slides), "--out", str(tmp_path / "j"), *TILE, "--annotations", str(ann)]) == 2
    assert "one file applies to one slide, but the source names 2" in capsys.readouterr().err
    assert main(["tile", str(slides), "--out", str(tmp_path / "j"), *TILE, "--annotations",
                 str(tmp_path / "nope")]) == 2
    assert "no such file or folder" in capsys.readouterr().err


def test_long_tissue_outlines_are_checked_edge_by_edge(tmp_path: Path) -> None:
    """A QuPath tissue outline of 50,000 vertices is read; one crossing anywhere in it is found (the sweep over
    x-sorted edges tests every pair whose boxes overlap)."""
    t = np.linspace(0, 2 * np.pi, 50_001)[:-1]
    r = 400 + 30 * np.sin(37 * t)
    ring = np.stack([512 + r * np.cos(t), 512 + r * np.sin(t)], 1)
    ok = _write(tmp_path / "ok.geojson", [_feature(_poly(np.vstack([ring, ring[:1]]).tolist()))])
    assert read_tile_annotations(ok).include[0][0].shape == (50_001, 2)
    crossed = ring.copy()
    crossed[[20_000, 20_001]] = crossed[[20_001, 20_000]]  # two neighbours swapped: their edges cross
    bad = _write(tmp_path / "bad.geojson", [_feature(_poly(np.vstack([crossed, crossed[:1]]).tolist()))])
    with pytest.raises(RoiError, match="intersects itself"):
        read_tile_annotations(bad)


def test_the_same_file_as_the_roi_of_a_question_leaves_the_exclusions_out(tmp_path: Path) -> None:
    """`hwsi ask --roi FILE` / the chat API read annotations by the same rule: includes minus Ignore*/Exclude."""
    from synthetic_store import make_synthetic_job

    ann = _write(tmp_path / "roi.geojson", {"type": "FeatureCollection", "features": [
        _feature(_poly(_rect(0, 0, 1024, 1024)), cls={"name": "Tumor", "color": [200, 0, 0]}),
        _feature(_poly(_rect(0, 0, 512, 1024)), cls={"name": "Ignore*", "color": [180, 180, 180]}),
        _feature(_poly(_rect(50, 50, 10, 10)), object_type="detection")]})
    roi = read_roi_geojson(ann)
    assert len(roi.polygons) == 1 and len(roi.exclude) == 1 and "minus 1 exclusion of" in roi.describe()
    assert roi.contains(np.array([[100, 100], [700, 100], [1100, 100]])).tolist() == [False, True, False]
    assert roi.to_geojson()["exclude"] and roi.n_vertices == 8
    job = make_synthetic_job(tmp_path / "job", "s", width=1024, height=1024)
    placed = place_roi(job.store, roi)
    with SlideStore(job.store) as s:
        pc, ps = s.patch_coords().astype(float), s.meta.patch_size_level0
    centres = pc[placed.inside] + ps / 2
    assert len(centres) and (centres[:, 0] >= 512).all()
    only = _write(tmp_path / "only.geojson", [_feature(_poly(_rect(0, 0, 512, 512)), cls={"name": "Exclude"})])
    with pytest.raises(RoiError, match="only Ignore\\*/Exclude annotations, nothing to use as the region"):
        read_roi_geojson(only)
