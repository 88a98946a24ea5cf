"""`hwsi cells`: image tiles and slide regions to a per-nucleus table; bad input exits 2 naming the file."""

from __future__ import annotations

import csv
from pathlib import Path

import cv2
import h5py
import numpy as np
import pytest
from PIL import Image

from hwsi.cells import FEATURE_DIM
from hwsi.cli import main


@pytest.fixture()
def tile_png(tmp_path: Path) -> Path:
    img = np.empty((128, 128, 3), np.uint8)
    img[:] = (235, 170, 205)
    for cx, cy in ((20, 20), (60, 70), (100, 30), (90, 100)):
        cv2.circle(img, (cx, cy), 7, (80, 45, 135), -1)
    p = tmp_path / "tile.png"
    Image.fromarray(img).save(p)
    return p


def test_image_to_csv_and_overlay(tmp_path: Path, tile_png: Path) -> None:
    out = tmp_path / "o" / "nuclei.csv"
    ov = tmp_path / "o" / "overlay.png"
    assert main(["cells", str(tile_png), "--mpp", "0.5", "--out", str(out), "--overlay", str(ov)]) == 0
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 4
    assert {"x", "y", "area_um2", "type", "type_prob", "type_name"} <= set(rows[0])
    xs = sorted(round(float(r["x"])) for r in rows)
    assert xs == [20, 60, 90, 100]
    feats = np.load(out.with_name("nuclei.features.npy"))
    assert feats.shape == (4, FEATURE_DIM)
    o = np.asarray(Image.open(ov))
    assert o.shape == (128, 128, 3) and (o != np.asarray(Image.open(tile_png))).any()


def test_image_to_h5_with_config(tmp_path: Path, tile_png: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("segment:\n  min_area_um2: 60.0\n")  # discs are ~38 µm² at 0.5 µm/px -> all filtered out
    out = tmp_path / "n.h5"
    assert main(["cells", str(tile_png), "--mpp", "0.5", "--out", str(out), "--config", str(cfg)]) == 0
    with h5py.File(out) as f:
        assert f["features"].shape == (0, FEATURE_DIM)
    assert main(["cells", str(tile_png), "--mpp", "0.5", "--out", str(out)]) == 0
    with h5py.File(out) as f:
        assert f["features"].shape == (4, FEATURE_DIM)
        assert len(f["table/area_um2"]) == 4
        assert f.attrs["mpp"] == 0.5


def test_slide_region_level0_coordinates(tmp_path: Path, shared_data: Path) -> None:
    slide = shared_data / "slides" / "cmu-1-small-region.svs"
    out = tmp_path / "s.h5"
    assert main(["cells", str(slide), "--region", "1000,1200,256,256", "--out", str(out)]) == 0
    with h5py.File(out) as f:
        x, y = f["table/x"][:], f["table/y"][:]
        assert len(x) > 5
        assert (x >= 1000).all() and (x < 1256).all() and (y >= 1200).all() and (y < 1456).all()
        assert abs(f.attrs["mpp"] - 0.499) < 0.01


def test_bad_inputs_exit_2_naming_the_file(tmp_path: Path, tile_png: Path, capsys: pytest.CaptureFixture) -> None:
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    assert main(["cells", str(bad), "--mpp", "0.5", "--out", str(tmp_path / "x.csv")]) == 2
    assert "bad.png: not a readable image" in capsys.readouterr().err
    assert main(["cells", str(tile_png), "--out", str(tmp_path / "x.csv")]) == 2
    assert "pass --mpp" in capsys.readouterr().err
    assert main(["cells", str(tile_png), "--mpp", "0.5", "--out", str(tmp_path / "x.txt")]) == 2
    assert "x.txt: output must end in" in capsys.readouterr().err
    assert main(["cells", str(tmp_path / "missing.svs"), "--region", "0,0,10,10", "--out", str(tmp_path / "x.csv")]) == 2
    assert "missing.svs" in capsys.readouterr().err
    assert main(["cells", str(tmp_path / "s.svs"), "--region", "0,0,10", "--out", str(tmp_path / "x.csv")]) == 2
    assert "--region must be x,y,w,h" in capsys.readouterr().err
    assert not (tmp_path / "x.csv").exists()
