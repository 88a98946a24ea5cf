"""Where CellViT outputs lie (CellViT v1, CellViT-Inference, CellViT++ layouts, the TCGA first-dot name), the
message listing the paths tried, snappy-compressed outputs, and the check of a file's cells against the slide.

Layouts mirror: CellViT v1 ``cell_segmentation/inference/cell_detection.py`` (TIO-IKIM/CellViT @05097e1:
``<patched slide>/cell_detection[/<subdir>]/cells.json``); CellViT-Inference ``cellvit/inference/inference.py``
(@8e05c7d: ``<outdir>/<wsi_path.stem>/cells.json``); CellViT++ ``cellvit/inference/inference_memory.py``
(TIO-IKIM/CellViT-plus-plus @463c5c4: ``<outdir>/<wsi_path.name.split(".")[0]>_cells.json``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from hwsi.cells.cellvit import CellVitError, read_cellvit_cells
from hwsi.cells.cellvit_checks import check_cells_on_slide
from hwsi.cells.cellvit_layouts import find_cellvit_outputs, slide_names

TCGA_FILE = "TCGA-2V-A95S-01Z-00-DX1.9DFA6FC7-87A6-4C14-9A39-E3F12B01C4D4.svs"
TCGA_ID = TCGA_FILE[: -len(".svs")]  # hwsi's slide id: the file name without its slide suffix
TCGA_CUT = "TCGA-2V-A95S-01Z-00-DX1"  # CellViT++: the file name up to its first dot


def _cells_json(path: Path, n: int = 3, x0: float = 10.0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"wsi_metadata": {"base_mpp": 0.25}, "type_map": {"0": "Background", "1": "Neoplastic"},
                                "cells": [{"centroid": [x0 + i, 20.0], "type": 1, "type_prob": 0.9,
                                           "bbox": [[19, x0 + i - 1], [21, x0 + i + 1]]} for i in range(n)]}))
    return path


def test_slide_names_include_cellvit_plus_plus_first_dot_cut() -> None:
    assert slide_names(TCGA_ID, f"/slides/{TCGA_FILE}") == [TCGA_ID, TCGA_CUT]
    assert slide_names("s1", "/x/s1.ome.tiff") == ["s1", "s1.ome"]


@pytest.mark.parametrize("layout", ["v1", "v1_subdir", "inference", "plus_plus", "flat"])
def test_each_layout_is_found(tmp_path: Path, layout: str) -> None:
    d = tmp_path / "out"
    cells, tokens = {
        "v1": (d / TCGA_ID / "cell_detection" / "cells.json", d / TCGA_ID / "cell_detection" / "cells.pt"),
        "v1_subdir": (d / TCGA_ID / "cell_detection" / "sam_h" / "cells.json",
                      d / TCGA_ID / "cell_detection" / "sam_h" / "cells.pt"),
        "inference": (d / TCGA_ID / "cells.json", d / TCGA_ID / "cells.pt"),
        "plus_plus": (d / f"{TCGA_CUT}_cells.json", d / f"{TCGA_CUT}_cells.pt"),
        "flat": (d / f"{TCGA_ID}.json", d / f"{TCGA_ID}.pt"),
    }[layout]
    _cells_json(cells)
    tokens.write_bytes(b"")
    found = find_cellvit_outputs(d, TCGA_ID, f"/slides/{TCGA_FILE}")
    assert (found.cells, found.embeddings) == (cells, tokens)


def test_cells_json_preferred_and_detection_geojson_alone(tmp_path: Path) -> None:
    d = tmp_path / "out"
    _cells_json(d / f"{TCGA_CUT}_cell_detection.json")
    (d / f"{TCGA_CUT}_cell_detection.geojson").write_text("[]")
    assert find_cellvit_outputs(d, TCGA_ID, TCGA_FILE).cells.name == f"{TCGA_CUT}_cell_detection.json"
    _cells_json(d / f"{TCGA_CUT}_cells.json")
    assert find_cellvit_outputs(d, TCGA_ID, TCGA_FILE).cells.name == f"{TCGA_CUT}_cells.json"


def test_real_cellvit_plus_plus_file_found_in_its_folder(shared_data: Path) -> None:
    d = shared_data / "foreign/cellvit-plus-plus"
    found = find_cellvit_outputs(d, "JP2K-33003-2", "/slides/JP2K-33003-2.svs")
    assert found.cells == d / "JP2K-33003-2_cell_detection.geojson" and found.embeddings is None


def test_nothing_found_lists_the_paths_tried(tmp_path: Path) -> None:
    with pytest.raises(CellVitError) as e:
        find_cellvit_outputs(tmp_path, TCGA_ID, TCGA_FILE)
    msg = str(e.value)
    assert "{slide_id}" not in msg and f"no CellViT output for slide {TCGA_ID!r}; tried " in msg
    for tried in (f"{TCGA_ID}/cell_detection/[<subdir>/]{{cells,cell_detection}}.{{json,geojson}}[.snappy]",
                  f"{TCGA_ID}/{{cells,cell_detection}}.{{json,geojson}}[.snappy]",
                  f"{TCGA_CUT}_{{cells,cell_detection}}.{{json,geojson}}[.snappy]", f"{TCGA_ID}.{{json,geojson}}"):
        assert tried in msg


def test_two_subdir_runs_are_ambiguous(tmp_path: Path) -> None:
    for sub in ("a", "b"):
        _cells_json(tmp_path / "s1" / "cell_detection" / sub / "cells.json")
    with pytest.raises(CellVitError, match=r"cell_detection: 2 CellViT runs \(a, b\) for slide 's1'"):
        find_cellvit_outputs(tmp_path, "s1")


def test_snappy_output(tmp_path: Path) -> None:
    """CellViT --compression writes snappy.compress(json) as <name>_cells.json.snappy: read with python-snappy
    (the ``cellvit`` extra; the test extra installs it)."""
    snappy = pytest.importorskip("snappy", reason="python-snappy is not installed (pip install '.[cellvit]')")
    plain = _cells_json(tmp_path / "plain.json")
    path = tmp_path / "out" / f"{TCGA_CUT}_cells.json.snappy"
    path.parent.mkdir()
    path.write_bytes(snappy.compress(plain.read_bytes()))
    assert find_cellvit_outputs(tmp_path / "out", TCGA_ID, TCGA_FILE).cells == path
    assert len(read_cellvit_cells(path)) == 3
    path.write_bytes(b"\x00not really snappy")
    with pytest.raises(CellVitError, match=r"cells\.json\.snappy: not a snappy-compressed file"):
        read_cellvit_cells(path)


def test_snappy_without_python_snappy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without python-snappy: one line naming the file and what to install."""
    monkeypatch.setitem(sys.modules, "snappy", None)  # ``import snappy`` raises ImportError
    path = tmp_path / "out" / f"{TCGA_CUT}_cells.json.snappy"
    path.parent.mkdir()
    path.write_bytes(b"\x00not really snappy")
    assert find_cellvit_outputs(tmp_path / "out", TCGA_ID, TCGA_FILE).cells == path
    with pytest.raises(CellVitError, match=r"cells\.json\.snappy: snappy-compressed .*pip install python-snappy"):
        read_cellvit_cells(path)


def test_outside_slide_message_names_counts_and_metadata(tmp_path: Path) -> None:
    meta = {"base_mpp": 0.25, "target_patch_mpp": 0.25, "orig_n_tiles_cols": 40, "orig_n_tiles_rows": 30,
            "patch_size": 1024, "downsampling": 1}
    p = tmp_path / "cells.json"
    p.write_text(json.dumps({"wsi_metadata": meta, "type_map": {"1": "Neoplastic"},
                             "cells": [{"centroid": [5000 + i, 3000], "type": 1} for i in range(9)]
                             + [{"centroid": [10, 10], "type": 1}]}))
    c = read_cellvit_cells(p)
    with pytest.raises(CellVitError) as e:
        check_cells_on_slide(c, 2220, 2967, 0.499)
    assert str(e.value) == (
        f"{p}: 9 of 10 cells (90 %) lie outside the slide (2220×2967 level-0 px; hwsi refuses above 50 %): they span "
        "x 10–5008, y 10–3000; the file says 0.25 µm/px, the slide 0.499 µm/px; the file's tile grid covers about "
        "40960×30720 px; the cells reach 2.3× the slide's size; likely the output of another slide, or coordinates "
        "at another level / µm/px")
    fit = check_cells_on_slide(c, 6000, 4000, 0.25)
    assert (fit.n_cells, fit.n_outside_slide, fit.file_mpp) == (10, 0, 0.25)


def test_real_cellvit_file_rejected_on_a_small_slide(shared_data: Path, tmp_path: Path) -> None:
    """`hwsi extract --cells cellvit:DIR` on a (synthetic) slide of that name: the real CellViT++ file's 37,927 cells
    all lie outside it, so the slide fails naming the file instead of finishing with cells=0."""
    from hwsi.features.extract import ExtractConfig, load_models, run_extract
    from hwsi.slide import GridConfig, TileConfig, tile_batch
    from hwsi.synth.pyramid import write_pyramid_tiff

    def tile_fn(x0: int, y0: int, w: int, h: int) -> np.ndarray:
        yy, xx = np.mgrid[y0 : y0 + h, x0 : x0 + w]
        img = np.full((h, w, 3), 245, np.uint8)
        img[((xx // 24 + yy // 24) % 2 == 0)] = (200, 120, 170)
        return img

    slide = tmp_path / "slides" / "JP2K-33003-2.tiff"
    slide.parent.mkdir()
    write_pyramid_tiff(slide, 1024, 1024, 0.5, tile_fn, min_level_side=256)
    job = tmp_path / "job"
    assert tile_batch(slide, job, TileConfig(grid=GridConfig(region_size=512, patch_size=128)),
                      show_progress=False).exit_code == 0
    cfg = ExtractConfig(k=4, n_div=8, cells=f"cellvit:{shared_data / 'foreign/cellvit-plus-plus'}")
    res = run_extract(job, cfg, show_progress=False, models=load_models(cfg, log=lambda m: None))
    assert res.exit_code == 1
    err = json.loads((job / "errors" / "JP2K-33003-2.extract.json").read_text())
    text = json.dumps(err, ensure_ascii=False)
    assert "JP2K-33003-2_cell_detection.geojson: 37927 of 37927 cells (100 %) lie outside the slide (1024×1024" in text
    # the same slide with a CellViT-Inference folder whose cells lie on it: ingested, types coded by the table
    ok = tmp_path / "cellvit_ok"
    _cells_json(ok / "JP2K-33003-2" / "cells.json", n=5, x0=100.0)
    cfg = ExtractConfig(k=4, n_div=8, cells=f"cellvit:{ok}")
    assert run_extract(job, cfg, show_progress=False, models=load_models(cfg, log=lambda m: None)).exit_code == 0
    import h5py

    with h5py.File(job / "stores" / "JP2K-33003-2.h5") as f:
        attrs = dict(f["cells"].attrs)
        assert set(f["cells/type"][:].tolist()) <= {4}
    assert json.loads(attrs["type_names"]) == {"0": "unknown", "4": "neoplastic"}
    assert json.loads(attrs["type_source_names"]) == {"Background": 0, "Neoplastic": 4}
    assert attrs["n_source_cells"] == 5 and attrs["n_outside_slide"] == 0
