"""Batch inputs as peers write them (hwsi.slide.tile.collect_slides): TRIDENT's slide CSV (``wsi[,mpp]``, as
mahmoodlab/TRIDENT's ``--custom_list_of_wsis`` reads it) and nested slide folders (``--recursive``)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from hwsi.cli import main
from hwsi.errors import ConfigError, HwsiError
from hwsi.slide.tile import collect_slides
from hwsi.store import SlideStore, list_stores
from hwsi.synth.pyramid import write_pyramid_tiff

TILE = ["--region-size", "512", "--patch-size", "128", "-q"]


def _tissue(x0: int, y0: int, w: int, h: int) -> np.ndarray:
    yy, xx = np.mgrid[y0: y0 + h, x0: x0 + w]
    return np.stack([200 + 0 * xx, 110 + (xx % 40), 170 + (yy % 30)], -1).astype(np.uint8)


def _slide(path: Path, mpp: float | None = 0.5) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_pyramid_tiff(path, 512, 512, mpp if mpp is not None else 0.5, _tissue, tile_size=256, threads=1,
                       min_level_side=256)
    return path


def test_trident_wsi_column_with_mpp(tmp_path: Path) -> None:
    _slide(tmp_path / "wsis" / "case-1.tiff")
    _slide(tmp_path / "wsis" / "case-2.tiff")
    csv = tmp_path / "wsis" / "list.csv"
    csv.write_text("wsi,mpp\ncase-1.tiff,0.5\ncase-2.tiff,\n", encoding="utf-8")  # TRIDENT: names in wsi_dir
    specs = collect_slides(csv, mpp=0.51)
    assert [(s.slide_id, s.mpp) for s in specs] == [("case-1", 0.5), ("case-2", 0.51)]
    job = tmp_path / "job"
    assert main(["tile", str(csv), "--out", str(job), *TILE]) == 0
    assert [p.stem for p in list_stores(job)] == ["case-1", "case-2"]
    assert json.loads((job / "slides.json").read_text())["case-1"]["mpp_source"] == "user"


def test_slide_and_wsi_columns_together_or_neither_are_refused(tmp_path: Path) -> None:
    both = tmp_path / "both.csv"
    both.write_text("slide,wsi\na.tiff,a.tiff\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="both a 'slide' and a 'wsi' column"):
        collect_slides(both)
    neither = tmp_path / "neither.csv"
    neither.write_text("path\na.tiff\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"needs a 'slide' column \(or TRIDENT's 'wsi'"):
        collect_slides(neither)


def test_recursive_folders(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "cohort"
    for rel in ("p1/x.tiff", "p2/x.tiff", "p2/deep/er/y.tiff", ".hidden/z.tiff"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"1")
    (root / "p2" / "notes.txt").write_text("no", encoding="utf-8")
    os.symlink(root, root / "p1" / "loop")  # a symlinked folder is not followed
    with pytest.raises(HwsiError, match="its sub-folders hold some: use --recursive"):
        collect_slides(root)
    specs = collect_slides(root, recursive=True)
    assert sorted(str(s.path.relative_to(root)) for s in specs) == ["p1/x.tiff", "p2/deep/er/y.tiff", "p2/x.tiff"]
    ids = {str(s.path.relative_to(root)): s.slide_id for s in specs}
    assert ids["p2/deep/er/y.tiff"] == "y" and ids["p1/x.tiff"] != ids["p2/x.tiff"]
    assert all(ids[k].startswith("x.tiff-") for k in ("p1/x.tiff", "p2/x.tiff"))  # whole names clash: + path hash


def test_tile_recursive_cli(tmp_path: Path) -> None:
    _slide(tmp_path / "in" / "a" / "s1.tiff")
    _slide(tmp_path / "in" / "b" / "c" / "s2.tiff")
    job = tmp_path / "job"
    assert main(["tile", str(tmp_path / "in"), "--out", str(job), *TILE]) == 2  # not recursive: no slide here
    assert main(["tile", str(tmp_path / "in"), "--out", str(job), "--recursive", *TILE]) == 0
    assert [p.stem for p in list_stores(job)] == ["s1", "s2"]
    with SlideStore(job / "stores" / "s2.h5") as s:
        assert s.attr("slide_path") == str((tmp_path / "in" / "b" / "c" / "s2.tiff").resolve())
