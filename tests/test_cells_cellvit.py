"""CellViT ingest: cells.json and cells.pt stand-ins in CellViT's formats, consistency errors, grid attachment.

The stand-ins mirror what CellViT writes: cells.json from ``cell_segmentation/inference/cell_detection.py``
(TIO-IKIM/CellViT @05097e1, type_map name -> id) and ``cellvit/inference/inference_memory.py`` (TIO-IKIM/
CellViT-plus-plus @463c5c4, type_map id -> name); cells.pt is ``torch.save(graph, path)`` of the plain dataclass
``CellGraphDataWSI`` (CellViT v1: cell_segmentation/datasets/cell_graph_datamodel.py; CellViT++:
cellvit/data/dataclass/cell_graph.py; CellViT-Inference @8e05c7d: the same path with ``nuclei_types``).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import types
from pathlib import Path
from typing import Any

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
    assert c.types.tolist() == [4, 5, 4]  # CellViT ids 1, 2 mapped by name: neoplastic 4, inflammatory 5
    np.testing.assert_allclose(c.type_prob, [0.9, 0.6, 0.8])
    assert c.type_map == {4: "neoplastic", 5: "inflammatory"}
    assert c.contours is not None and c.contours[0].shape == (4, 2)
    assert c.bbox is not None and c.bbox.shape == (3, 2, 2)
    assert c.metadata["wsi_metadata"]["base_mpp"] == 0.25


def test_type_ids_map_by_name_whatever_the_taxonomy(tmp_path: Path) -> None:
    """CellViT v1 writes type_map name -> id; a CellViT++ classifier (here CoNSeP's label map) reuses ids 0-3 for
    other classes: the codes follow the NAMES, and a name outside the table is reported and coded 0."""
    p = tmp_path / "cells.json"
    p.write_text(json.dumps({"type_map": {"Background": 0, "Neoplastic": 1, "Inflammatory": 2},
                             "cells": [_cell(1, 1, 1, 0.5), _cell(2, 2, 2, 0.5)]}))
    assert read_cellvit_cells(p).types.tolist() == [4, 5]
    p.write_text(json.dumps({"type_map": {"0": "Other", "1": "Inflammatory", "2": "Epithelial", "3": "Spindle-Shaped",
                                          "4": "Goblet"},
                             "cells": [_cell(1, 1, t, 0.5) for t in (0, 1, 2, 3, 4)]}))
    c = read_cellvit_cells(p)
    assert c.types.tolist() == [0, 5, 8, 6, 0]
    assert c.metadata["type_mapping"].unknown == ("Goblet",)
    p.write_text(json.dumps({"type_map": {"1": "Neoplastic"}, "cells": [_cell(1, 1, 3, 0.5)]}))
    with pytest.raises(CellVitError, match=r"type id\(s\) \[3\] are not in the file's type_map"):
        read_cellvit_cells(p)


def test_bare_list_and_detection_variant(tmp_path: Path) -> None:
    p = tmp_path / "cell_detection.json"
    cells = [_cell(x, y, 1, 0.5, contour=False) for x, y in CENTROIDS]
    del cells[1]["centroid"]  # falls back to the bbox centre (bbox is (row, col))
    p.write_text(json.dumps(cells))
    c = read_cellvit_cells(p)
    np.testing.assert_allclose(c.centroids, CENTROIDS)
    assert c.contours is None
    assert c.types.tolist() == [4, 4, 4] and c.metadata["type_map_assumed"] == "PanNuke"


def test_geojson_refused_with_tokens(tmp_path: Path) -> None:
    feats = [
        {"type": "Feature", "geometry": {"type": "MultiPoint", "coordinates": [[1, 2], [3, 4]]},
         "properties": {"objectType": "annotation", "classification": {"name": "Neoplastic", "color": [1, 2, 3]}}},
        {"type": "Feature",
         "geometry": {"type": "MultiPolygon", "coordinates": [[[[0, 0], [2, 0], [2, 2], [0, 2], [0, 0]]]]},
         "properties": {"classification": {"name": "Inflammatory"}}},
    ]
    p = tmp_path / "cells.geojson"
    p.write_text(json.dumps(feats))
    np.save(tmp_path / "e.npy", np.zeros((3, 384), np.float32))
    with pytest.raises(CellVitError, match="no cell order that tokens could follow"):
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


CELL_GRAPHS = {  # upstream module path -> fields of its CellGraphDataWSI, in declaration order
    "cellvit_v1": ("cell_segmentation.datasets.cell_graph_datamodel", ("x", "positions", "metadata", "contours")),
    "cellvit_plus_plus": ("cellvit.data.dataclass.cell_graph", ("x", "positions", "metadata")),
    "cellvit_inference": ("cellvit.data.dataclass.cell_graph", ("x", "positions", "metadata", "nuclei_types")),
}


def _save_cell_graph(monkeypatch: pytest.MonkeyPatch, path: Path, module: str, fields: tuple[str, ...],
                     values: dict[str, Any], name: str = "CellGraphDataWSI") -> None:
    """``torch.save(graph, path)`` of a plain dataclass that pickles under CellViT's module path, as CellViT does."""
    cls = dataclasses.make_dataclass(name, [(f, Any) for f in fields])
    cls.__module__, cls.__qualname__ = module, name
    parts = module.split(".")
    for i in range(1, len(parts) + 1):  # the module and its parents, importable for pickle while saving
        monkeypatch.setitem(sys.modules, ".".join(parts[:i]), types.ModuleType(".".join(parts[:i])))
    setattr(sys.modules[module], name, cls)
    torch.save(cls(**values), path)
    for i in range(1, len(parts) + 1):
        monkeypatch.delitem(sys.modules, ".".join(parts[:i]))  # CellViT is not installed when hwsi reads it


@pytest.mark.parametrize("version", list(CELL_GRAPHS))
def test_cellvit_cell_graph_dataclass(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, cells_json: Path,
                                      version: str) -> None:
    module, fields = CELL_GRAPHS[version]
    tok = torch.randn(3, 1280)
    values = {"x": tok, "positions": torch.tensor(CENTROIDS),
              "metadata": {"wsi_metadata": {"base_mpp": 0.25}, "nuclei_types": {"Neoplastic": 1}},
              "contours": [torch.zeros(4, 2) for _ in CENTROIDS], "nuclei_types": torch.tensor([1, 2, 1])}
    _save_cell_graph(monkeypatch, tmp_path / "cells.pt", module, fields, {f: values[f] for f in fields})
    assert "cellvit" not in sys.modules and "cell_segmentation" not in sys.modules
    tokens, positions = read_cell_embeddings(tmp_path / "cells.pt")
    np.testing.assert_allclose(tokens, tok.numpy(), rtol=1e-6)
    np.testing.assert_allclose(positions, CENTROIDS)
    assert load_cellvit(cells_json, tmp_path / "cells.pt").embeddings.shape == (3, 1280)


def test_cell_graph_other_classes_refused(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Only CellViT's two class paths are built; another class, or an extra field under CellViT's path, is refused."""
    tok = {"x": torch.randn(3, 384), "positions": torch.tensor(CENTROIDS), "metadata": {}}
    _save_cell_graph(monkeypatch, tmp_path / "a.pt", "torch_geometric.data.data", ("x", "positions", "metadata"),
                     tok, name="Data")
    with pytest.raises(CellVitError, match=r"a\.pt: holds objects hwsi does not load: torch_geometric\.data\.data\.Data"):
        read_cell_embeddings(tmp_path / "a.pt")
    _save_cell_graph(monkeypatch, tmp_path / "b.pt", "cellvit.data.dataclass.cell_graph",
                     ("x", "positions", "metadata", "payload"), {**tok, "payload": 1})
    with pytest.raises(CellVitError, match=r"fields \['payload'\] that CellViT's class does not have"):
        read_cell_embeddings(tmp_path / "b.pt")


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
