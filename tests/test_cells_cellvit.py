"""CellViT ingest: small synthetic files in CellViT's formats, consistency errors, grid attachment."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from hwsi.cells.cellvit import (
    CellVitError,
    attach_cells_to_grid,
    load_cellvit,
    read_cell_embeddings,
    read_cellvit_cells,
)
from hwsi.errors import HwsiError

CENTROIDS = [[100.5, 40.0], [300.0, 260.0], [5000.0, 10.0]]


def _cell(x: float, y: float, t: int, p: float, contour: bool = True) -> dict:
    c = {"bbox": [[y - 4, x - 4], [y + 4, x + 4]], "centroid": [x, y], "type": t, "type_prob": p,
         "patch_coordinates": [0, 0], "cell_status": 1, "offset_global": [0, 0]}
    if contour:
        c["contour"] = [[x - 4, y - 4], [x + 4, y - 4], [x + 4, y + 4], [x - 4, y + 4]]
    return c


@pytest.fixture()
def cells_json(tmp_path: Path) -> Path:
    data = {
        "wsi_metadata": {"base_mpp": 0.25},
        "type_map": {"0": "Background", "1": "Neoplastic", "2": "Inflammatory"},
        "cells": [_cell(x, y, t, p) for (x, y), t, p in zip(CENTROIDS, [1, 2, 1], [0.9, 0.6, 0.8])],
    }
    p = tmp_path / "cells.json"
    p.write_text(json.dumps(data))
    return p


def test_read_cells_json(cells_json: Path) -> None:
    c = read_cellvit_cells(cells_json)
    assert len(c) == 3
    np.testing.assert_allclose(c.centroids, CENTROIDS)
    assert c.types.tolist() == [1, 2, 1]
    np.testing.assert_allclose(c.type_prob, [0.9, 0.6, 0.8])
    assert c.type_map == {0: "Background", 1: "Neoplastic", 2: "Inflammatory"}
    assert c.contours is not None and c.contours[0].shape == (4, 2)
    assert c.bbox is not None and c.bbox.shape == (3, 2, 2)
    assert c.metadata["base_mpp"] == 0.25


def test_bare_list_and_detection_variant(tmp_path: Path) -> None:
    p = tmp_path / "cell_detection.json"
    cells = [_cell(x, y, 1, 0.5, contour=False) for x, y in CENTROIDS]
    del cells[1]["centroid"]  # falls back to the bbox centre (bbox is (row, col))
    p.write_text(json.dumps(cells))
    c = read_cellvit_cells(p)
    np.testing.assert_allclose(c.centroids, CENTROIDS)
    assert c.contours is None


def test_geojson_variant(tmp_path: Path) -> None:
    feats = [
        {"type": "Feature", "geometry": {"type": "MultiPoint", "coordinates": [[1, 2], [3, 4]]},
         "properties": {"objectType": "annotation", "classification": {"name": "Neoplastic", "color": [1, 2, 3]}}},
        {"type": "Feature",
         "geometry": {"type": "MultiPolygon", "coordinates": [[[[0, 0], [2, 0], [2, 2], [0, 2], [0, 0]]]]},
         "properties": {"classification": {"name": "Inflammatory"}}},
    ]
    p = tmp_path / "cells.geojson"
    p.write_text(json.dumps(feats))
    c = read_cellvit_cells(p)
    np.testing.assert_allclose(c.centroids, [[1, 2], [3, 4], [1, 1]])
    assert c.types.tolist() == [0, 0, 1]
    assert c.type_map == {0: "Neoplastic", 1: "Inflammatory"}
    np.save(tmp_path / "e.npy", np.zeros((3, 384), np.float32))
    with pytest.raises(CellVitError, match="groups cells by type"):
        load_cellvit(p, tmp_path / "e.npy")


@pytest.mark.parametrize("kind", ["tensor", "dict", "npy"])
def test_embeddings_formats(tmp_path: Path, cells_json: Path, kind: str) -> None:
    tok = torch.randn(3, 384)
    if kind == "tensor":
        path = tmp_path / "cells.pt"
        torch.save(tok, path)
    elif kind == "dict":
        path = tmp_path / "cells.pt"
        torch.save({"x": tok, "positions": torch.tensor(CENTROIDS), "metadata": {"nuclei_types": {}}}, path)
    else:
        path = tmp_path / "cells.npy"
        np.save(path, tok.numpy())
    c = load_cellvit(cells_json, path, expected_dim=384)
    assert c.embeddings is not None and c.embeddings.dtype == np.float32
    np.testing.assert_allclose(c.embeddings, tok.numpy(), rtol=1e-6)


def test_pickled_graph_object_without_its_library(tmp_path: Path, cells_json: Path) -> None:
    """CellViT saves a torch-geometric Data subclass; read it without that library installed."""
    mod = types.ModuleType("fake_pyg_for_test")

    class Storage(dict):
        pass

    class CellGraphDataWSI:
        def __init__(self, **kw):
            self._store = Storage(_mapping=dict(kw))

    Storage.__module__ = CellGraphDataWSI.__module__ = mod.__name__
    Storage.__qualname__, CellGraphDataWSI.__qualname__ = "Storage", "CellGraphDataWSI"
    mod.Storage, mod.CellGraphDataWSI = Storage, CellGraphDataWSI
    sys.modules[mod.__name__] = mod
    tok = torch.randn(3, 1280)
    try:
        obj = CellGraphDataWSI(x=tok, positions=torch.tensor(CENTROIDS), metadata={"wsi_metadata": {}})
        torch.save(obj, tmp_path / "cells.pt")
    finally:
        del sys.modules[mod.__name__]
    tokens, positions = read_cell_embeddings(tmp_path / "cells.pt")
    np.testing.assert_allclose(tokens, tok.numpy(), rtol=1e-6)
    np.testing.assert_allclose(positions, CENTROIDS)
    assert load_cellvit(cells_json, tmp_path / "cells.pt").embeddings.shape == (3, 1280)


def test_consistency_errors_name_the_file(tmp_path: Path, cells_json: Path) -> None:
    path = tmp_path / "cells.pt"
    torch.save(torch.randn(2, 384), path)
    with pytest.raises(CellVitError, match=r"cells\.pt: 2 token embeddings but 3 cells"):
        load_cellvit(cells_json, path)
    torch.save(torch.randn(3, 384), path)
    with pytest.raises(CellVitError, match="embedding dim 384, expected 1280"):
        load_cellvit(cells_json, path, expected_dim=1280)
    torch.save({"x": torch.randn(3, 384), "positions": torch.tensor(CENTROIDS[::-1])}, path)
    with pytest.raises(CellVitError, match="positions do not follow"):
        load_cellvit(cells_json, path)
    torch.save({"nothing": 1}, path)
    with pytest.raises(CellVitError, match="no \\(N, D\\) token tensor"):
        read_cell_embeddings(path)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(HwsiError, match="bad.json: not valid JSON"):
        read_cellvit_cells(bad)
    bad.write_text(json.dumps({"foo": []}))
    with pytest.raises(CellVitError, match="\"cells\" list"):
        read_cellvit_cells(bad)
    bad.write_text(json.dumps([{"type": 1}]))
    with pytest.raises(CellVitError, match="cell 0 has no centroid"):
        read_cellvit_cells(bad)
    with pytest.raises(CellVitError, match="missing.json: no such file"):
        read_cellvit_cells(tmp_path / "missing.json")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(CellVitError, match="junk.pt: not a readable torch file"):
        read_cell_embeddings(tmp_path / "junk.pt")


@pytest.mark.parametrize("lattice", [True, False])
def test_attach_cells_to_grid(lattice: bool) -> None:
    # two regions of 1024 level-0 px, 4x4 patches of 256
    regions = np.array([[0, 0], [1024, 0]]) if lattice else np.array([[0, 0], [1000, 0]])
    cents = np.array([[10, 10], [300, 10], [10, 300], [1023.9, 1023.9], [1100, 600], [5000, 5000], [-1, 5]])
    a = attach_cells_to_grid(cents, regions, 1024, 256, 4)
    if lattice:
        assert a.region_idx.tolist() == [0, 0, 0, 0, 1, -1, -1]
        assert a.patch_idx.tolist() == [0, 1, 4, 15, 2 * 4 + 0, -1, -1]
    else:  # overlapping regions: the first listed wins; (1100, 600) is in region 1 at dx=100
        assert a.region_idx.tolist() == [0, 0, 0, 0, 1, -1, -1]
        assert a.patch_idx.tolist() == [0, 1, 4, 15, 8, -1, -1]
    assert a.n_unmatched == 2
