"""Nucleus contours kept through the store (hwsi.store.cells contour_n / contour_xy) and the segmenter's outlines."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from hwsi.cells.segment import instance_contours
from hwsi.store.cells import read_cells, read_contours, rows_to_columns, write_cells


def test_contours_round_trip_in_row_order_and_append(tmp_path: Path) -> None:
    t = {"x": np.array([5.0, 1.0]), "y": np.array([5.0, 1.0])}
    tri, sq = np.array([[0, 0], [4, 0], [4, 4]]), np.array([[1, 1], [2, 1], [2, 2], [1, 2]])
    cols, emb, off = rows_to_columns(t, np.zeros((2, 3)), np.array([0, 0]), np.array([1, 0]), 2, 4,
                                     contours=[tri, sq])
    with h5py.File(tmp_path / "a.h5", "w") as f:
        write_cells(f, cols, emb, off, grid_size=4, append=True)
        more, emb2, off2 = rows_to_columns(t, np.zeros((2, 3)), np.array([1, 1]), np.array([0, 0]), 2, 4,
                                           contours=[sq, np.zeros((0, 2))])
        write_cells(f, more, emb2, off2, grid_size=4, append=True)
        got = read_contours(f)
        assert [len(c) for c in got] == [4, 3, 4, 0]  # sorted by (region, patch): square (patch 0) first
        np.testing.assert_array_equal(got[1], tri)
        assert "contour_xy" not in read_cells(f, 0)[0]


def test_store_without_contours_still_reads(tmp_path: Path) -> None:
    t = {"x": np.array([5.0]), "y": np.array([5.0])}
    cols, emb, off = rows_to_columns(t, np.zeros((1, 3)), np.array([0]), np.array([0]), 1, 4)
    with h5py.File(tmp_path / "old.h5", "w") as f:
        write_cells(f, cols, emb, off, grid_size=4)
        assert read_contours(f) is None and len(read_cells(f, 0)[0]["x"]) == 1


def test_segmenter_outline_follows_the_instance() -> None:
    labels = np.zeros((40, 40), np.int32)
    yy, xx = np.mgrid[:40, :40]
    labels[(xx - 20) ** 2 + (yy - 15) ** 2 <= 64] = 1
    (c,) = instance_contours(labels, 0.5)
    x, y = c[:, 0], c[:, 1]
    area = 0.5 * abs(np.sum(x * np.roll(y, -1) - np.roll(x, -1) * y))
    assert 8 <= len(c) < 60 and abs(area - np.pi * 64) / (np.pi * 64) < 0.2  # traced through boundary-pixel centres
    assert np.abs(np.hypot(x - 20, y - 15) - 8).max() < 1.0
