"""Asking about a region (hwsi.model.roi, hwsi.slide.roi_geometry; docs/roi.md).

Selection on a small store written by hwsi.store's own writer (tests/synthetic_store.py), the ROI through the
server's chat (tiny untrained MLLM: plumbing, not answers), and, on the cached trained SynthPath pipeline, whether
the answer about a region follows that region's ground truth (the behaviour test at the end)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from hwsi.errors import HwsiError
from hwsi.model.roi import roi_slide_inputs, select_roi
from hwsi.slide.roi_geometry import MAX_ROI_VERTICES, RoiError, parse_rect, parse_roi_option, read_roi_geojson, \
    roi_from_geojson
from hwsi.store import SlideStore
from synthetic_store import FEATURE_NAME, make_synthetic_job, tiny_model_assistant

SID = "synth-a"


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    job = tmp_path_factory.mktemp("roijob")
    make_synthetic_job(job, SID)  # 3072 x 2304 px, 512 px regions of 4 x 4 patches of 128 px, k = 4
    return job / "stores" / f"{SID}.h5"


def _grid(store: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, float]:
    with SlideStore(store) as s:
        return (s.region_coords(), s.patch_coords(), s.patch_tissue(), s.spf_selected(),
                float(s.meta.patch_size_level0))


def _square(x: float, y: float, side: float) -> list[list[float]]:
    return [[x, y], [x + side, y], [x + side, y + side], [x, y + side], [x, y]]


# ---------------------------------------------------------------------------------------------- geometry
def test_rect_contains_half_open_and_describes_itself() -> None:
    roi = parse_rect("100,200,50,25")
    pts = np.array([[100, 200], [149.9, 224.9], [150, 210], [120, 225], [99.9, 210]])
    assert roi.contains(pts).tolist() == [True, True, False, False, False]
    assert roi.describe() == "x 100..150, y 200..225 (level-0 px, rectangle)"
    assert roi.to_geojson()["type"] == "MultiPolygon"


def test_qupath_layout_unites_annotations_skips_detections_and_keeps_holes(tmp_path: Path) -> None:
    """QuPath 0.4–0.6 `Export objects as GeoJSON` (FeatureCollection; objectType per Feature; the id/classification
    keys as QuPath writes them): two annotations, one with a hole, and a detection that is not an ROI."""
    outer = _square(0, 0, 100)
    hole = _square(40, 40, 20)
    doc = {"type": "FeatureCollection", "features": [
        {"type": "Feature", "id": "a1", "geometry": {"type": "Polygon", "coordinates": [outer, hole]},
         "properties": {"objectType": "annotation", "classification": {"name": "Tumor", "color": [200, 0, 0]}}},
        {"type": "Feature", "id": "a2", "geometry": {"type": "MultiPolygon", "coordinates": [[_square(300, 0, 50)]]},
         "properties": {"objectType": "annotation", "isLocked": False}},
        {"type": "Feature", "id": "d1", "geometry": {"type": "Polygon", "coordinates": [_square(500, 500, 10)]},
         "properties": {"objectType": "detection"}},
    ]}
    f = tmp_path / "qupath.geojson"
    f.write_text(json.dumps(doc))
    roi = parse_roi_option(str(f))
    assert len(roi.polygons) == 2 and roi.kind == "polygon"
    pts = np.array([[10, 10], [50, 50], [320, 20], [505, 505], [200, 50]])
    assert roi.contains(pts).tolist() == [True, False, True, False, False]
    # the same Features as a bare JSON list (QuPath without "Export as FeatureCollection") read the same way
    f2 = tmp_path / "list.geojson"
    f2.write_text(json.dumps(doc["features"]))
    assert read_roi_geojson(f2).contains(pts).tolist() == roi.contains(pts).tolist()
    assert "2 polygons of" in roi.describe() and "x 0..350, y 0..100" in roi.describe()


def test_a_real_qupath_export_gives_its_annotation_polygons(shared_data: Path) -> None:
    """QuPath 0.6.0's own export (../shared/data/foreign/qupath/Single_cells.geojson: 7 annotation polygons, 3
    annotation points, 121 cells): the 7 polygons are the ROI; the points and the cells are not."""
    roi = read_roi_geojson(shared_data / "foreign" / "qupath" / "Single_cells.geojson")
    assert len(roi.polygons) == 7 and roi.n_vertices == 604
    assert roi.describe().startswith("x 296..982, y 0..781 (level-0 px, 7 polygons of ")
    assert roi.contains(np.array([[300.0, 10.0], [981.0, 415.0], [100.0, 100.0]])).tolist() == [True, True, False]


def test_polygon_selection_matches_a_brute_force_point_test(store: Path) -> None:
    tri = [[200, 200], [2600, 400], [900, 2000], [200, 200]]
    roi = roi_from_geojson({"type": "Feature", "properties": {}, "geometry": {"type": "Polygon",
                                                                             "coordinates": [tri]}}, "roi")
    _, pcoords, tissue, sel, ps = _grid(store)
    sel_roi = select_roi(store, roi, max_regions=100, k=4)
    (ax, ay), (bx, by), (cx, cy) = tri[:3]

    def inside(x: float, y: float) -> bool:  # same side of the three edges
        d = [(bx - ax) * (y - ay) - (by - ay) * (x - ax), (cx - bx) * (y - by) - (cy - by) * (x - bx),
             (ax - cx) * (y - cy) - (ay - cy) * (x - cx)]
        return all(v > 0 for v in d) or all(v < 0 for v in d)

    want = {(r, j) for r in range(sel.shape[0]) for j in sel[r] if j >= 0 and tissue[r, j]
            and inside(*(pcoords[r, j] + ps / 2))}
    got = {(r, int(j)) for r in range(sel_roi.selection.shape[0]) for j in sel_roi.selection[r] if j >= 0}
    assert got == want and sel_roi.patch_source == "spf" and sel_roi.n_patches == len(want) > 0
    for x, y, w, h in sel_roi.patch_boxes_level0:
        assert inside(x + w / 2, y + h / 2)


def test_rect_selection_keeps_region_tokens_by_overlap_and_the_slide_context(store: Path) -> None:
    rcoords, pcoords, tissue, sel, ps = _grid(store)
    r = int(np.argmax(tissue.sum(1)))  # a region full of tissue
    x, y = rcoords[r]
    roi = parse_rect(f"{x},{y},512,512")
    s = select_roi(store, roi, max_regions=6, k=4)
    assert s.region_tokens.tolist() == [r] and s.overlap[r] == 1.0
    assert r in s.regions and len(s.regions) == 6  # the ROI's region plus 5 regions of context for z_WSI
    assert {int(j) for j in s.selection[r] if j >= 0} == {int(j) for j in sel[r] if j >= 0}
    assert (s.selection[np.setdiff1d(np.arange(len(rcoords)), [r])] == -1).all()
    assert s.summary().startswith(f"Answer restricted to the ROI x {x}..{x + 512}, y {y}..{y + 512} (level-0 px, "
                                  "rectangle): 4 of ")
    assert "1 of 6 regions" in s.summary() and "slide token (whole-slide context)" in s.summary()
    half = select_roi(store, parse_rect(f"{x},{y},256,512"), max_regions=6, k=4)  # half the region: 50 % inside
    assert half.region_tokens.tolist() == [r]
    assert select_roi(store, parse_rect(f"{x},{y},256,512"), 6, 4, min_region_overlap=0.75).region_tokens.size == 0


def test_roi_without_spf_patches_falls_back_to_its_most_relevant_tissue_patches(store: Path) -> None:
    rcoords, pcoords, tissue, sel, ps = _grid(store)
    spf = {(r, int(j)) for r in range(sel.shape[0]) for j in sel[r] if j >= 0}
    r, j = next((r, j) for r in range(tissue.shape[0]) for j in range(tissue.shape[1])
                if tissue[r, j] and (r, j) not in spf)
    x, y = pcoords[r, j]
    s = select_roi(store, parse_rect(f"{x + 10},{y + 10},100,100"), max_regions=6, k=4)
    assert s.patch_source == "relevance" and s.selection[r].tolist()[:1] == [j] and s.n_patches == 1
    assert "without nuclei" in s.summary()


def test_roi_inputs_keep_the_whole_slide_token_and_the_paper_order(store: Path, tmp_path: Path) -> None:
    """z_WSI over the same regions is the whole slide's; the prefix is [cells, patches, regions, slide]."""
    from hwsi.model.chat import ChatSession
    from hwsi.model.inputs import collate_slides, load_slide_inputs

    assistant = tiny_model_assistant(store.parent.parent, tmp_path)
    model = assistant.model
    rcoords, *_ = _grid(store)
    n = len(rcoords)
    roi = parse_rect(f"{rcoords[5][0]},{rcoords[5][1]},700,300")
    x = roi_slide_inputs(store, FEATURE_NAME, FEATURE_NAME, roi, max_regions=n, k=4, max_cells=32)
    whole = load_slide_inputs(store, FEATURE_NAME, FEATURE_NAME, max_regions=n, k=4, max_cells=32)
    with torch.no_grad():
        hw, hr = model.hierarchy(collate_slides([whole])), model.hierarchy(collate_slides([x.inputs]))
    torch.testing.assert_close(hr.slide_token, hw.slide_token)
    pc = x.inputs.patch_coords[x.inputs.patch_mask].numpy()
    assert len(pc) == x.selection.n_patches > 0 and roi.contains(pc + 64).all()
    chat = ChatSession(model, x.inputs, region_token_mask=x.region_token_mask, max_new_tokens=4)
    n_regions = int(x.region_token_mask.sum())
    assert chat.n_visual == 2 * x.selection.n_patches + n_regions + 1 + 8  # z_c, z_p, z_r, z_WSI + 4 marker pairs
    m = model.projectors.markers
    v = chat.visual
    c_end, p_end = 1 + x.selection.n_patches, 3 + 2 * x.selection.n_patches
    for pos, scale, which in ((0, "cells", 0), (c_end, "cells", 1), (c_end + 1, "patches", 0), (p_end, "patches", 1),
                              (p_end + 1, "regions", 0), (len(v) - 3, "slide", 0), (len(v) - 1, "slide", 1)):
        torch.testing.assert_close(v[pos], m[scale][which].to(v.dtype))


@pytest.mark.parametrize(("value", "words"), [
    ("1,2,3", "expected x,y,w,h (four numbers, level-0 px)"),
    ("1,2,0,5", "width and height > 0"),
    ("a,b,c,d", "expected x,y,w,h"),
])
def test_bad_rect_is_one_error_naming_the_option(value: str, words: str) -> None:
    with pytest.raises(RoiError) as e:
        parse_roi_option(value)
    assert str(e.value).startswith(f"--roi {value}: ") and words in str(e.value)


@pytest.mark.parametrize(("obj", "words"), [
    ({"type": "Polygon", "coordinates": [[[0, 0], [10, 10], [10, 0], [0, 10], [0, 0]]]}, "intersects itself"),
    ({"type": "Polygon", "coordinates": [[[0, 0], [10, 0], [20, 0], [0, 0]]]}, "zero area"),
    ({"type": "Polygon", "coordinates": [[[0, 0], [10, 0]]]}, "at least 3"),
    ({"type": "Polygon", "coordinates": [[[0, 0], [10, "x"], [3, 3]]]}, "not numbers"),
    ({"type": "Point", "coordinates": [1, 2]}, "no Polygon or MultiPolygon annotation"),
    ([{"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [9, 0], [9, 9], [0, 0]]]},
       "properties": {"objectType": "detection"}}], "no Polygon or MultiPolygon annotation"),
    ({"features": []}, "not a GeoJSON geometry, Feature"),
    ({"type": "Polygon", "coordinates": [[[float(np.cos(t)) * 900, float(np.sin(t)) * 900]
                                          for t in np.linspace(0, 6.28, MAX_ROI_VERTICES + 50)]]}, "at most"),
])
def test_bad_geojson_is_one_error(obj: object, words: str) -> None:
    with pytest.raises(RoiError) as e:
        roi_from_geojson(obj, "roi")
    assert str(e.value).startswith("roi: ") and words in str(e.value) and "\n" not in str(e.value)


def test_roi_outside_the_slide_or_without_tissue_is_refused(store: Path, tmp_path: Path) -> None:
    with pytest.raises(RoiError, match=r"--roi 5000,5000,10,10: lies outside the slide .* 3072 x 2304 px"):
        select_roi(store, parse_rect("5000,5000,10,10"), 6, 4)
    _, pcoords, tissue, _, _ = _grid(store)
    r, j = np.argwhere(~tissue)[0]
    x, y = pcoords[r, j]
    with pytest.raises(RoiError, match="contains no tissue patch"):
        select_roi(store, parse_rect(f"{x + 1},{y + 1},100,100"), 6, 4)
    bad = tmp_path / "bad.geojson"
    bad.write_text("{not json")
    with pytest.raises(HwsiError, match=f"{bad}.*not valid JSON"):
        parse_roi_option(str(bad))


# ---------------------------------------------------------------------------------------------- the server
def test_chat_endpoint_takes_an_roi_and_records_it(store: Path, tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from hwsi.serve.app import create_app

    job = store.parent.parent
    rcoords, pcoords, tissue, _, ps = _grid(store)
    r = int(np.argmax(tissue.sum(1)))
    x, y = (int(v) for v in rcoords[r])
    with TestClient(create_app(job, tiny_model_assistant(job, tmp_path))) as c:
        sid = c.post("/api/chat", json={"slide_id": SID}).json()["session_id"]
        body = {"question": "Is there a lesion here?", "max_new_tokens": 6, "roi": {"x": x, "y": y, "w": 512, "h": 512}}
        ev = [json.loads(s) for s in c.post(f"/api/chat/{sid}/ask", json=body).text.splitlines() if s]
        assert [e["type"] for e in ev][:2] == ["start", "roi"] and ev[-1]["type"] == "done"
        assert ev[1]["summary"].startswith(f"Answer restricted to the ROI x {x}..{x + 512}") and ev[1]["regions"] == [r]
        items = next(e for e in ev if e["type"] == "evidence")["items"]
        assert items and all(x <= i["x"] + i["w"] / 2 < x + 512 and y <= i["y"] + i["h"] / 2 < y + 512
                             for i in items)  # evidence stays inside the ROI
        poly = {"type": "Polygon", "coordinates": [_square(x, y, 300)]}
        c.post(f"/api/chat/{sid}/ask", json={"question": "And here?", "max_new_tokens": 4, "roi": poly})
        c.post(f"/api/chat/{sid}/ask", json={"question": "The whole slide?", "max_new_tokens": 4})
        turns = c.get(f"/api/chat/{sid}").json()["turns"]
        assert [t["roi"] is not None for t in turns] == [True, True, False]
        assert turns[1]["roi"]["geometry"]["coordinates"][0][0][2] == [x + 300, y + 300]
        for bad, words in (({"x": 9000, "y": 0, "w": 10, "h": 10}, "lies outside the slide"),
                           ({"x": 0, "y": 0, "w": 0, "h": 10}, "width and height > 0"),
                           ({"type": "Polygon", "coordinates": [[[0, 0], [900, 900], [900, 0], [0, 900], [0, 0]]]},
                            "intersects itself"),
                           ({"type": "Polygon", "coordinates": [_square(0, 0, 1)[:4] * 2000]},
                            "request body too large")):  # the server's 16 KiB body cap (hwsi.serve.app) comes first
            resp = c.post(f"/api/chat/{sid}/ask", json={"question": "q", "roi": bad})
            assert resp.status_code in (400, 413) and words in resp.json()["detail"], resp.text
        assert len(c.get(f"/api/chat/{sid}").json()["turns"]) == 3  # refused asks leave no turn
        fc = c.get(f"/api/slides/{SID}/export.geojson", params={"session": sid, "nuclei": 0, "spf": 0}).json()
    rois = [f for f in fc["features"] if f["properties"]["classification"]["name"] == "Question ROI"]
    assert [f["properties"]["name"] for f in rois] == ["Q1: Is there a lesion here?", "Q2: And here?"]
    assert rois[0]["properties"]["hwsi"]["answer"] == turns[0]["answer"] and rois[0]["geometry"]["type"] == "MultiPolygon"
    assert rois[0]["properties"]["hwsi"]["summary"] == turns[0]["roi"]["summary"]
    back = roi_from_geojson([rois[1]], "export")  # the export reads back as the ROI it was asked about
    assert back.bounds_level0 == (x, y, x + 300, y + 300)


# ---------------------------------------------------------------------------------------------- behaviour
_ARCH = {1: "regular", 2: "crowded", 3: "solid"}
Q_ARCH = "How are the glands arranged?\nA) regular\nB) crowded\nC) solid"  # closed forms of hwsi.synth.text
Q_ATYPIA = "Is there nuclear atypia in the epithelial cells?\nA) yes\nB) no"


@pytest.fixture(scope="module")
def roi_answers(test_pipeline) -> list[dict[str, object]]:
    """Per held-out (val + test) slide with a FOCAL lesion in one region (2048² slide, four 1024-px regions): the
    closed question on which the lesional region and a benign one differ (architecture if the lesion's is not
    regular, else atypia), answered for the whole slide, the lesional region's ROI and a benign region's ROI."""
    from hwsi.model.chat import ChatSession
    from hwsi.synth.truth import read_truth
    from hwsi.train.inference import load_trained_model, run_config, slide_inputs_for

    p = test_pipeline.paths
    cfg = run_config(p.runs)
    m = cfg.model
    model = load_trained_model(p.runs)
    cohort = json.loads((p.cohort / "cohort.json").read_text())
    out = []
    for rec in cohort["slides"]:
        if rec["split"] == "train" or rec["facts"]["extent"] != "focal":
            continue
        store = p.job / "stores" / f"{rec['slide_id']}.h5"
        truth = read_truth(p.cohort / rec["truth"]).data  # aligned to the store by region coords (as gates.py)
        rows = {tuple(c): i for i, c in enumerate(truth["regions/coords"].tolist())}
        with SlideStore(store) as s:
            coords, side = s.region_coords(), float(s.meta.region_size_level0)
        t = [rows[tuple(c)] for c in coords.tolist()]
        lesion = np.array([bool(truth["regions/lesion"][i]) for i in t])
        arch = np.array([int(truth["regions/architecture"][i]) for i in t])
        atypia = np.array([bool(truth["regions/atypia"][i]) for i in t])
        benign = [i for i in range(len(t)) if not lesion[i] and float(truth["regions/tissue"][t[i]]) > 0.3]
        if lesion.sum() != 1 or not benign:
            continue
        les, ben = int(np.flatnonzero(lesion)[0]), benign[0]
        if arch[les] != 1:
            q, truth_of = Q_ARCH, (lambda i: _ARCH[int(arch[i])])
        else:
            q, truth_of = Q_ATYPIA, (lambda i: "yes" if atypia[i] else "no")
        row: dict[str, object] = {"slide": rec["slide_id"], "question": q.split("\n")[0], "truth_slide": truth_of(les)}
        row["whole"] = ChatSession(model, slide_inputs_for(store, cfg=cfg), max_new_tokens=8).ask_each([q])[0]
        for name, i in (("lesion", les), ("benign", ben)):
            x = roi_slide_inputs(store, cfg.data.patch_encoder, cfg.data.region_input,
                                 parse_rect(f"{coords[i][0]},{coords[i][1]},{side},{side}"), m.max_regions, m.k,
                                 m.max_cells)
            chat = ChatSession(model, x.inputs, region_token_mask=x.region_token_mask, max_new_tokens=8)
            row[name], row[f"truth_{name}"] = chat.ask_each([q])[0], truth_of(i)
        out.append(row)
    return out


def _follows(row: dict[str, object], name: str) -> bool:
    return str(row[f"truth_{name}"]) in str(row[name]).lower()


def test_whole_slide_answers_are_right_on_the_focal_slides(roi_answers: list[dict[str, object]]) -> None:
    """Measured: 44 of 44 held-out focal slides (the baseline the ROI answers stand beside)."""
    assert len(roi_answers) >= 30
    right = sum(str(r["truth_slide"]) in str(r["whole"]).lower() for r in roi_answers)
    assert right >= 0.9 * len(roi_answers), right


def test_roi_on_a_benign_region_of_a_crowded_lesion_slide_says_regular(roi_answers: list[dict[str, object]]) -> None:
    """Where the lesion is architectural (crowded glands), the ROI answer follows the region: measured on 22
    held-out slides with the ROI records in stages 2-3 (docs/roi.md "Training records"): benign ROI 'regular' on 22
    (whole slide: 'crowded' on 22), both ROIs right on 22 (before them: 0 of 22 benign ROIs right)."""
    rows = [r for r in roi_answers if r["truth_lesion"] == "crowded"]
    assert len(rows) >= 15
    assert sum(_follows(r, "benign") for r in rows) >= 0.8 * len(rows)
    assert sum(_follows(r, "benign") and _follows(r, "lesion") for r in rows) >= 0.7 * len(rows)


def test_roi_answers_follow_the_regions_truth_on_most_focal_slides(roi_answers: list[dict[str, object]]) -> None:
    """The issue's claim: asked about the lesional region vs a benign one, the answers follow the two regions' truth
    on most slides. Measured with the ROI records in stages 2-3: both ROI answers right on 44 of 44 held-out focal
    slides (crowded 22/22, solid 12/12, atypia 10/10); a model trained on whole slides only: 12 of 44 (the slide
    token carried solid growth and atypia into every ROI)."""
    both = sum(_follows(r, "lesion") and _follows(r, "benign") for r in roi_answers)
    assert both >= 0.8 * len(roi_answers), f"{both} of {len(roi_answers)}"
    for kind in ("crowded", "solid", "yes"):  # each kind of focal lesion, not only the architectural one
        rows = [r for r in roi_answers if r["truth_lesion"] == kind]
        assert rows and sum(_follows(r, "lesion") and _follows(r, "benign") for r in rows) >= 0.7 * len(rows), kind


def test_hwsi_ask_roi_cli(test_pipeline, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from hwsi.cli import main

    p = test_pipeline.paths
    store = str(p.job / "stores" / "synth_0012.h5")  # focal crowded lesion in the lower right region
    run = ["--run", str(p.runs), "-q", Q_ARCH, "--max-new-tokens", "8", "--top", "2"]
    capsys.readouterr()
    assert main(["ask", store, "--roi", "1024,1024,1024,1024", *run]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("Answer restricted to the ROI x 1024..2048, y 1024..2048 (level-0 px, rectangle): "
                             "8 of 32 patch tokens") and "1 of 4 regions" in out[0]
    assert out[1] == "crowded"
    patches = [ln for ln in out if ln.strip().startswith("patch ")]
    assert patches and all(int(ln.split("(")[1].split(",")[0]) >= 1024 for ln in patches)
    gj = tmp_path / "roi.geojson"
    gj.write_text(json.dumps([{"type": "Feature", "properties": {"objectType": "annotation"},
                               "geometry": {"type": "Polygon", "coordinates": [_square(0, 0, 1024)]}}]))
    assert main(["ask", store, "--roi", str(gj), *run]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "1 polygon of" in out[0] and out[1] == "regular"  # the upper-left region of synth_0012 is benign
    for bad, words in (("1,2,3", "--roi 1,2,3: expected x,y,w,h"), ("9000,9000,5,5", "lies outside the slide"),
                       (str(tmp_path / "none.geojson"), "no such file")):
        assert main(["ask", store, "--roi", bad, *run]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and words in err, err


def test_held_out_questions_about_one_region_are_answered_from_its_tokens(test_pipeline) -> None:
    """hwsi.demo.roi_scores (the ROI column of `hwsi ablate`): every tissue region of every held-out slide whose
    regions differ, asked its architecture and atypia. Measured on the test pipeline: 0.998 of 664 (chance 0.417);
    the same stage 1 with regions left out of the LLM input (clean protocol, retrained stages 2-3): 0.947,
    architecture 0.895 (docs/ablations.md)."""
    from hwsi.demo.roi_scores import score_roi
    from hwsi.train.inference import load_trained_model

    p = test_pipeline.paths
    r = score_roi(load_trained_model(p.runs), p.runs, p.cohort, p.job)
    assert r["n_roi"] >= 400 and 0.35 < r["roi_chance"] < 0.5
    assert r["roi_acc"] >= 0.9 and min(r["roi_by_kind"].values()) >= 0.85, r["roi_by_kind"]
