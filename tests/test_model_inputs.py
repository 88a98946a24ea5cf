"""hwsi.model.inputs: reading a store written by hwsi.store's writer (tests/store_builder.py), batching, cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from hwsi.errors import StoreError
from hwsi.model.inputs import (
    collate_slides,
    load_cached_inputs,
    load_slide_inputs,
    rank_regions,
    save_slide_inputs,
    subsample_rows,
)
from store_builder import write_extracted_store

DP, DIN, DC = 6, 5, 3


def write_tiny_store(
    path: Path, n_regions: int = 4, side: int = 2, k_store: int = 3, seed: int = 0, cells_per_patch: list | None = None
) -> dict:
    """A small extracted store; returns the arrays written (for expectations)."""
    rng = np.random.default_rng(seed)
    g = side * side
    feats = rng.normal(size=(n_regions, g, DP)).astype(np.float32)
    rin = rng.normal(size=(n_regions, g, DIN)).astype(np.float32)
    rel = rng.uniform(size=(n_regions, g)).astype(np.float32)
    sel = np.full((n_regions, k_store), -1, np.int32)
    for r in range(n_regions):
        n = min(k_store, g - (r % 2))  # some regions select fewer patches
        sel[r, :n] = rng.permutation(g)[:n]
    sel[-1] = -1  # last region: nothing selected
    counts = cells_per_patch or [int(c) for c in rng.integers(0, 5, size=n_regions * g)]
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    emb = rng.normal(size=(int(offsets[-1]), DC)).astype(np.float32)
    coords = np.stack([np.arange(n_regions) * 100, np.zeros(n_regions)], 1).astype(np.int64)
    pcoords = (coords[:, None, :] + np.stack(np.meshgrid(np.arange(side), np.arange(side)), -1).reshape(g, 2)[None] * 25)
    tissue = np.ones((n_regions, g), bool)
    tissue[0, 0] = False
    write_extracted_store(path, region_coords=coords, patch_coords=pcoords.astype(np.int64), patch_tissue=tissue,
                          features={"enc": feats, "rin": rin}, selected=sel, relevance=rel, cell_counts=counts,
                          cell_embeddings=emb, region_size_level0=100.0)
    return dict(feats=feats, rin=rin, rel=rel, sel=sel, offsets=offsets, emb=emb, coords=coords, pcoords=pcoords)


def test_load_reads_selected_patches_and_cells(tmp_path: Path) -> None:
    p = tmp_path / "s1.h5"
    a = write_tiny_store(p)
    x = load_slide_inputs(p, "enc", "rin", max_regions=10, k=3, max_cells=100)
    assert x.slide_id == "s1" and x.n_regions == 4
    g = 4
    for r in range(4):
        sel = a["sel"][r][a["sel"][r] >= 0]
        n = len(sel)
        assert x.patch_mask[r].sum() == n
        np.testing.assert_array_equal(x.selected[r, :n].numpy(), sel)
        np.testing.assert_allclose(x.patch_feats[r, :n].numpy(), a["feats"][r, sel])
        np.testing.assert_allclose(x.region_input[r].numpy(), a["rin"][r])
        np.testing.assert_array_equal(x.patch_coords[r, :n].numpy(), a["pcoords"][r, sel])
        for j, pj in enumerate(sel):
            lo, hi = a["offsets"][r * g + pj], a["offsets"][r * g + pj + 1]
            assert int(x.cell_mask[r, j].sum()) == hi - lo
            np.testing.assert_allclose(x.cell_feats[r, j, : hi - lo].numpy(), a["emb"][lo:hi])
    assert not bool(x.grid_mask[0, 0]) and bool(x.grid_mask[1].all())
    assert x.n_visual_tokens == 2 * int(x.patch_mask.sum()) + 4 + 1


def test_region_cap_ranks_by_mean_relevance(tmp_path: Path) -> None:
    p = tmp_path / "s.h5"
    a = write_tiny_store(p, n_regions=6)
    x = load_slide_inputs(p, "enc", "rin", max_regions=3, k=3)
    scores = []
    for r in range(6):
        s = a["sel"][r][a["sel"][r] >= 0]
        scores.append(a["rel"][r, s].mean() if len(s) else -np.inf)
    expected = np.sort(np.argsort(-np.array(scores), kind="stable")[:3])
    np.testing.assert_array_equal(x.region_index.numpy(), expected)
    np.testing.assert_array_equal(x.region_coords.numpy(), a["coords"][expected])
    again = load_slide_inputs(p, "enc", "rin", max_regions=3, k=3)
    assert torch.equal(again.patch_feats, x.patch_feats)


def test_rank_ties_prefer_lower_index() -> None:
    rel = np.ones((5, 4), np.float32)
    sel = np.zeros((5, 2), np.int64)
    np.testing.assert_array_equal(rank_regions(rel, sel, 2), [0, 1])


def test_k_smaller_than_stored_keeps_most_relevant(tmp_path: Path) -> None:
    p = tmp_path / "s.h5"
    a = write_tiny_store(p, side=3, k_store=5)
    x = load_slide_inputs(p, "enc", "rin", k=2)
    sel = a["sel"][0][a["sel"][0] >= 0]
    top = sel[np.sort(np.argsort(-a["rel"][0, sel], kind="stable")[:2])]
    np.testing.assert_array_equal(x.selected[0].numpy(), top)


def test_cell_cap_subsamples_evenly(tmp_path: Path) -> None:
    p = tmp_path / "s.h5"
    counts = [10] * 16
    a = write_tiny_store(p, cells_per_patch=counts)
    x = load_slide_inputs(p, "enc", "rin", k=3, max_cells=4)
    assert x.cell_feats.shape[2] == 4 and bool(x.cell_mask[0, 0].all())
    pj = int(x.selected[0, 0])
    lo = a["offsets"][pj]
    np.testing.assert_allclose(x.cell_feats[0, 0].numpy(), a["emb"][lo + np.array([0, 3, 6, 9])])
    np.testing.assert_array_equal(subsample_rows(3, 5), [0, 1, 2])


def test_missing_dataset_names_it(tmp_path: Path) -> None:
    p = tmp_path / "s.h5"
    write_tiny_store(p)
    with pytest.raises(StoreError, match="patches/conch"):
        load_slide_inputs(p, "conch", "rin")


def test_collate_pads_and_masks(tmp_path: Path) -> None:
    a = load_slide_inputs(write_and(tmp_path / "a.h5", n_regions=2), "enc", "rin", k=3)
    b = load_slide_inputs(write_and(tmp_path / "b.h5", n_regions=5, seed=1), "enc", "rin", k=3)
    batch = collate_slides([a, b])
    assert batch.patch_feats.shape[:3] == (2, 5, 3)
    assert batch.region_mask.tolist() == [[True, True, False, False, False], [True] * 5]
    assert not batch.patch_mask[0, 2:].any() and not batch.cell_mask[0, 2:].any()
    assert torch.equal(batch.patch_feats[1], b.patch_feats)
    n = a.cell_feats.shape[2]
    assert torch.equal(batch.cell_feats[0, :2, :, :n], a.cell_feats)


def write_and(path: Path, **kw: int) -> Path:
    write_tiny_store(path, **kw)
    return path


def test_cache_roundtrip(tmp_path: Path) -> None:
    x = load_slide_inputs(write_and(tmp_path / "s.h5"), "enc", "rin", k=3)
    save_slide_inputs(x, tmp_path / "s.pt")
    y = load_cached_inputs(tmp_path / "s.pt")
    assert y.slide_id == x.slide_id and torch.equal(y.selected, x.selected) and torch.equal(y.cell_mask, x.cell_mask)
    torch.testing.assert_close(y.patch_feats, x.patch_feats, atol=2e-3, rtol=2e-3)
    save_slide_inputs(x, tmp_path / "f.pt", half=False)
    assert torch.equal(load_cached_inputs(tmp_path / "f.pt").region_input, x.region_input)
