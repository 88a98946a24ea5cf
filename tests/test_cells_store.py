"""The cells/* group of a store (hwsi.store.cells, columns from hwsi.cells.columns): columns, CSR offsets,
region-by-region appends through StoreWriter, reads through SlideStore."""

from __future__ import annotations

from contextlib import AbstractContextManager
from pathlib import Path

import numpy as np
import pytest

from hwsi.cells import FEATURE_DIM, segment_nuclei
from hwsi.cells.cellvit import CellVitCells, attach_cells_to_grid
from hwsi.cells.segment import Nuclei
from hwsi.cells.columns import cells_to_columns
from hwsi.errors import StoreError
from hwsi.store import SlideStore, StoreMeta, StoreWriter, new_store, rows_to_columns

G = 4  # 2x2 patches per region


def _tiled(path: Path, n_regions: int) -> AbstractContextManager[StoreWriter]:
    """A new store of ``n_regions`` regions of 2x2 patches of 256 px, at 0.5 µm/px (level 0 = target)."""
    meta = StoreMeta("/slides/s.tiff", path.stem, 0.5, 0.5, 0.5, 512, 256, 512.0, 256.0, 512 * n_regions, 512)
    return new_store(path, meta)


def _fake(n: int, x0: float = 0.0) -> Nuclei:
    table = {
        "x": np.arange(n, dtype=np.float64) + x0,
        "y": np.full(n, 2.0),
        "area_um2": np.full(n, 30.0, np.float32),
        "type": np.ones(n, np.int8),
        "type_prob": np.full(n, 0.7, np.float32),
    }
    return Nuclei(np.zeros((8, 8), np.int32), table, np.full((n, 3), n, np.float32), 0.5)


def test_cells_to_columns_sorts_offsets_and_converts_to_level0() -> None:
    # patches given out of order: (region 1, patch 3), (0, 2), (0, 0) empty, (1, 0)
    results = [_fake(2), _fake(3), None, _fake(1)]
    cols, emb, offs = cells_to_columns(
        results, region_idx=np.array([1, 0, 0, 1]), patch_idx=np.array([3, 2, 0, 0]),
        offset_xy_level0=np.array([[1000, 2000], [10, 20], [0, 0], [1000, 1000]]), scale_to_level0=2.0,
        n_regions=2, grid_size=G,
    )
    assert offs.tolist() == [0, 0, 0, 3, 3, 4, 4, 4, 6]
    assert cols["region"].tolist() == [0, 0, 0, 1, 1, 1]
    assert cols["patch"].tolist() == [2, 2, 2, 0, 3, 3]
    # level-0: offset + patch px * scale, rounded int64
    assert cols["x"].dtype == np.int64
    assert cols["x"].tolist() == [10, 12, 14, 1000, 1000, 1002]
    assert cols["y"].tolist() == [24, 24, 24, 1004, 2004, 2004]
    assert emb[:, 0].tolist() == [3, 3, 3, 1, 2, 2]
    assert set(cols) == {"region", "patch", "x", "y", "area_um2", "type", "type_prob"}


def test_all_empty_gives_empty_columns() -> None:
    cols, emb, offs = cells_to_columns([None, None], np.array([0, 0]), np.array([0, 1]), np.zeros((2, 2)), 1.0,
                                       n_regions=1, grid_size=G)
    assert offs.tolist() == [0] * (G + 1)
    assert emb.shape == (0, FEATURE_DIM)
    assert all(len(v) == 0 for v in cols.values())


def test_write_append_and_read_region_by_region(tmp_path: Path) -> None:
    path = tmp_path / "s.h5"
    rng = np.random.default_rng(0)
    R = 3
    expected: dict[tuple[int, int], int] = {}
    with _tiled(path, R) as w:
        for r in range(R):  # one region at a time, as the extract stage does
            counts = rng.integers(0, 4, size=G)
            results = [_fake(int(c), x0=100 * r) if c else None for c in counts]
            cols, emb, offs = cells_to_columns(results, np.full(G, r), np.arange(G), np.zeros((G, 2)), 1.0,
                                               n_regions=R, grid_size=G)
            w.write_cells(cols, emb, offs, grid_size=G, append=r > 0, attrs={"backend": "builtin"})
            for g, c in enumerate(counts):
                expected[(r, g)] = int(c)
    with SlideStore(path) as s:
        assert s.cell_embeddings().shape == (sum(expected.values()), 3) and s.cell_dim() == 3
        assert s.cells_attrs()["backend"] == "builtin"
        counts = s.cell_counts()
        offsets = s.cell_offsets()
        for (r, g), c in expected.items():
            assert counts[r, g] == c and offsets[r * G + g + 1] - offsets[r * G + g] == c
            cols, emb = s.cells_of(r, g)
            assert len(emb) == c and (cols["region"] == r).all() and (cols["patch"] == g).all()
            assert (emb[:, 0] == c).all()
            a, b = offsets[r * G + g], offsets[r * G + g + 1]
            np.testing.assert_array_equal(s.cell_column("x", a, b), cols["x"])
        cols, emb = s.cells_of(1)
        assert len(emb) == sum(c for (r, _), c in expected.items() if r == 1)
        with pytest.raises(StoreError, match="out of range"):
            s.cells_of(R, 0)


def test_append_out_of_order_is_refused(tmp_path: Path) -> None:
    with _tiled(tmp_path / "s.h5", 2) as w:
        a = cells_to_columns([_fake(2)], np.array([1]), np.array([0]), np.zeros((1, 2)), 1.0, n_regions=2, grid_size=G)
        b = cells_to_columns([_fake(1)], np.array([0]), np.array([3]), np.zeros((1, 2)), 1.0, n_regions=2, grid_size=G)
        w.write_cells(*a, grid_size=G)
        with pytest.raises(StoreError, match="must come after"):
            w.write_cells(*b, grid_size=G, append=True)
    with _tiled(tmp_path / "t.h5", 1):
        pass
    with SlideStore(tmp_path / "t.h5") as s:
        assert not s.has_cells
        with pytest.raises(StoreError, match="no cells"):
            s.cells_of(0, 0)


def test_cellvit_cells_through_grid_to_store(tmp_path: Path) -> None:
    cells = CellVitCells(
        centroids=np.array([[10.0, 10.0], [600.0, 10.0], [9999.0, 9999.0], [520.0, 700.0]]),
        types=np.array([1, 2, 1, 3], np.int16), type_prob=np.array([0.9, 0.8, 0.7, 0.6], np.float32),
        type_map={}, embeddings=np.arange(4 * 384, dtype=np.float32).reshape(4, 384),
    )
    att = attach_cells_to_grid(cells.centroids, np.array([[0, 0], [512, 0]]), 512, 256, 2)
    assert att.n_unmatched == 2  # (9999, 9999) and (520, 700) lie outside both regions
    cols, emb, offs = rows_to_columns(cells.table, cells.embeddings, att.region_idx, att.patch_idx, 2, G)
    assert cols["region"].tolist() == [0, 1] and cols["patch"].tolist() == [0, 0]
    assert emb.shape == (2, 384) and emb[1, 0] == 384
    with _tiled(tmp_path / "s.h5", 2) as w:
        w.write_cells(cols, emb, offs, grid_size=G)
    with SlideStore(tmp_path / "s.h5") as s:
        c, e = s.cells_of(1, 0)
        assert c["x"].tolist() == [600] and e.shape == (1, 384)


def test_real_segmentation_into_store(tmp_path: Path) -> None:
    import cv2

    img = np.empty((128, 128, 3), np.uint8)
    img[:] = (235, 170, 205)
    for cx in (20, 60, 100):
        cv2.circle(img, (cx, 40), 6, (80, 45, 135), -1)
    nuc = segment_nuclei(img, 0.5)
    cols, emb, offs = cells_to_columns([nuc], np.array([0]), np.array([1]), np.array([[4096, 0]]), 2.0,
                                       n_regions=1, grid_size=G)
    assert offs.tolist() == [0, 0, 3, 3, 3]
    assert emb.shape == (3, FEATURE_DIM)
    assert (cols["x"] >= 4096).all()
