"""Per-slide model inputs read from a feature store, their batching and a compact cache.

API::

    load_slide_inputs(store_path, patch_encoder, region_input, max_regions=64, k=16, max_cells=64) -> SlideInputs
    collate_slides(list[SlideInputs]) -> SlideBatch            # pads R, k, Nmax; adds region_mask
    save_slide_inputs(inputs, path); load_cached_inputs(path) -> SlideInputs   # torch .pt cache
    SlideInputs.n_visual_tokens  (n_r·k·2 + n_r + 1 with all scales; markers not counted)

Selection rules (deterministic; docs/design.md §5):

* Regions: each region's SPF relevance is the mean Eq. 2 relevance r_ij of its selected patches (NaN-ignoring);
  regions with no selected patch score -inf. When the slide has more than ``max_regions`` regions, the
  ``max_regions`` highest-scoring ones are kept (ties: lower region index first). Kept regions stay in store
  (raster) order, so the token order follows the slide's layout.
* Patches: the store's ``spf/selected`` row (-1 padded). If ``k`` is smaller than the stored width, the ``k``
  selected patches with the highest relevance are kept (ties: stored order); wider is padded.
* Cells: the CSR rows of each selected patch (``cells/offsets`` over R·G); more than ``max_cells`` nuclei are
  subsampled at evenly spaced row positions (``round(linspace(0, n-1, max_cells))``), which is deterministic and
  spatially spread because rows are sorted within a patch.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import torch

from hwsi.errors import StoreError
from hwsi.store import SlideStore


# Bumped when SlideInputs gains a field: on-disk caches (train/data.py) are keyed by it and rebuilt.
# 2: level0_size (slide-relative region positions, ProjectorConfig.region_position).
INPUTS_SCHEMA = 2


@dataclass
class SlideInputs:
    """Frozen inputs of the trainable hierarchy for one slide (R regions kept, k patches each)."""

    slide_id: str
    patch_feats: torch.Tensor  # (R, k, Dp) float32, f_ij of the SPF-selected patches (Eq. 5)
    patch_mask: torch.Tensor  # (R, k) bool
    region_input: torch.Tensor  # (R, G, Din) float32, ViT-4K input: every patch of the region
    grid_mask: torch.Tensor  # (R, G) bool, tissue patches of the grid
    cell_feats: torch.Tensor  # (R, k, Nmax, Dc) float32, c_ijk (Eq. 3)
    cell_mask: torch.Tensor  # (R, k, Nmax) bool
    region_coords: torch.Tensor  # (R, 2) int64 level-0 x, y
    selected: torch.Tensor  # (R, k) int64 patch index in the region grid, -1 = padding
    relevance: torch.Tensor  # (R, k) float32 SPF relevance r_ij of the selected patches (NaN = padding)
    patch_coords: torch.Tensor  # (R, k, 2) int64 level-0 x, y of the selected patches (-1 = padding)
    region_index: torch.Tensor  # (R,) int64 row of each kept region in the store
    region_size_level0: float = 1.0  # level-0 px per region side (for 2-D slide positions)
    level0_size: torch.Tensor = field(default_factory=lambda: torch.zeros(2, dtype=torch.int64))  # (2,) W, H; 0 = unknown

    @property
    def n_regions(self) -> int:
        return int(self.patch_feats.shape[0])

    @property
    def n_visual_tokens(self) -> int:
        """Visual tokens with every scale on: cells + patches (one each per valid patch) + regions + slide."""
        return 2 * int(self.patch_mask.sum()) + self.n_regions + 1

    def to_dict(self) -> dict[str, object]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass
class SlideBatch:
    """B slides padded to common R, k, G and Nmax. Same fields as :class:`SlideInputs` with a leading B axis."""

    slide_ids: list[str]
    patch_feats: torch.Tensor  # (B, R, k, Dp)
    patch_mask: torch.Tensor  # (B, R, k)
    region_input: torch.Tensor  # (B, R, G, Din)
    grid_mask: torch.Tensor  # (B, R, G)
    cell_feats: torch.Tensor  # (B, R, k, Nmax, Dc)
    cell_mask: torch.Tensor  # (B, R, k, Nmax)
    region_coords: torch.Tensor  # (B, R, 2)
    region_mask: torch.Tensor  # (B, R) bool, real regions
    selected: torch.Tensor  # (B, R, k)
    relevance: torch.Tensor  # (B, R, k)
    patch_coords: torch.Tensor  # (B, R, k, 2)
    region_size_level0: torch.Tensor  # (B,) float32
    level0_size: torch.Tensor | None = None  # (B, 2) int64 slide W, H in level-0 px (0 = unknown)

    @property
    def batch_size(self) -> int:
        return len(self.slide_ids)

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "SlideBatch":
        """Move tensors to ``device``; float features (not coords) are cast to ``dtype`` if given."""
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, torch.Tensor):
                cast = dtype if (dtype is not None and f.name in _FEATURE_FIELDS) else None
                v = v.to(device=device, dtype=cast) if cast else v.to(device)
            out[f.name] = v
        return SlideBatch(**out)

    def pin_memory(self) -> "SlideBatch":
        """Page-locked copies of the tensors (what a DataLoader with ``pin_memory`` calls on CUDA runs)."""
        return SlideBatch(**{f.name: v.pin_memory() if isinstance(v, torch.Tensor) else v
                             for f in fields(self) for v in (getattr(self, f.name),)})


_FEATURE_FIELDS = ("patch_feats", "region_input", "cell_feats")


def _region_scores(relevance: np.ndarray, selected: np.ndarray) -> np.ndarray:
    """Mean relevance of each region's selected patches; -inf where none is selected or all are NaN."""
    r = relevance.shape[0]
    scores = np.full(r, -np.inf, dtype=np.float64)
    for i in range(r):
        sel = selected[i][selected[i] >= 0]
        vals = relevance[i, sel].astype(np.float64) if sel.size else np.empty(0)
        vals = vals[np.isfinite(vals)]
        if vals.size:
            scores[i] = vals.mean()
    return scores


def rank_regions(relevance: np.ndarray, selected: np.ndarray, max_regions: int) -> np.ndarray:
    """Indices (ascending) of the ``max_regions`` regions with the highest SPF relevance; all if fewer."""
    r = relevance.shape[0]
    if r <= max_regions:
        return np.arange(r)
    scores = _region_scores(relevance, selected)
    order = np.lexsort((np.arange(r), -scores))  # primary: score desc, secondary: index asc
    return np.sort(order[:max_regions])


def subsample_rows(n: int, max_rows: int) -> np.ndarray:
    """Evenly spaced, deterministic row positions: all of ``range(n)`` if n <= max_rows."""
    if n <= max_rows:
        return np.arange(n)
    return np.round(np.linspace(0, n - 1, max_rows)).astype(np.int64)


def load_slide_inputs(
    store_path: str | Path,
    patch_encoder: str,
    region_input: str,
    max_regions: int = 64,
    k: int = 16,
    max_cells: int = 64,
    regions: np.ndarray | None = None,
    selection: np.ndarray | None = None,
) -> SlideInputs:
    """Read one store (schema in :mod:`hwsi.store`) into :class:`SlideInputs` (selection rules: module docstring).

    ``regions`` (store rows, ascending) and ``selection`` ((R_store, w) patch indices, -1 padded) replace the
    relevance-ranked regions and ``spf/selected`` (an ROI's tokens: :mod:`hwsi.model.roi`); the k rule still applies."""
    path = Path(store_path)
    with SlideStore(path) as s:
        for name in (f"patches/{patch_encoder}", f"patches/{region_input}", "spf/selected", "spf/relevance",
                     "cells/offsets", "cells/embeddings", "regions/coords", "patches/coords"):
            if not s.has(name):
                raise StoreError(path, f"missing dataset {name!r} (run `hwsi extract` with these encoders)")
        slide_id = str(s.meta.slide_id or path.stem)
        region_size_level0 = float(s.meta.region_size_level0)
        level0_size = (int(s.meta.level0_width or 0), int(s.meta.level0_height or 0))
        sel_all = s.spf_selected()
        rel_all = s.spf_relevance()
        n_regions, g = rel_all.shape
        keep = rank_regions(rel_all, sel_all, max_regions) if regions is None else np.asarray(regions, np.int64)
        if selection is not None:
            sel_all = np.asarray(selection, np.int64)
        offsets = s.cell_offsets()
        if offsets.shape[0] != n_regions * g + 1:
            raise StoreError(path, f"cells/offsets has {offsets.shape[0]} rows, expected R*G+1 = {n_regions * g + 1}")
        tissue = s.patch_tissue() if s.has("patches/tissue") else np.ones((n_regions, g), bool)
        pcoords = s.patch_coords()
        dp, din, dc = s.feature_dim(patch_encoder), s.feature_dim(region_input), s.cell_dim()
        r = len(keep)

        patch_feats = np.zeros((r, k, dp), np.float32)
        patch_mask = np.zeros((r, k), bool)
        selected = np.full((r, k), -1, np.int64)
        relevance = np.full((r, k), np.nan, np.float32)
        patch_coords = np.full((r, k, 2), -1, np.int64)
        region_in = np.zeros((r, g, din), np.float32)
        cells: list[list[np.ndarray]] = []
        for out_i, ri in enumerate(keep):
            sel = sel_all[ri][sel_all[ri] >= 0]
            if sel.size > k:  # keep the k most relevant, ties in stored order
                rel = np.nan_to_num(rel_all[ri, sel], nan=-np.inf)
                sel = sel[np.sort(np.argsort(-rel, kind="stable")[:k])]
            region_feats = s.patch_features(patch_encoder, ri)  # one chunk per region
            n = sel.size
            patch_feats[out_i, :n] = region_feats[sel]
            patch_mask[out_i, :n] = True
            selected[out_i, :n] = sel
            relevance[out_i, :n] = rel_all[ri, sel]
            patch_coords[out_i, :n] = pcoords[ri, sel]
            region_in[out_i] = s.patch_features(region_input, ri)
            lo, hi = offsets[ri * g], offsets[(ri + 1) * g]
            block = s.cell_embeddings(lo, hi) if hi > lo else np.zeros((0, dc), np.float32)
            per_patch = []
            for j in sel:
                a, b = offsets[ri * g + j] - lo, offsets[ri * g + j + 1] - lo
                per_patch.append(block[a:b][subsample_rows(int(b - a), max_cells)])
            cells.append(per_patch)
        region_coords = s.region_coords()[keep]
        grid_mask = tissue[keep]

    n_max = max([len(c) for per in cells for c in per] + [1])
    cell_feats = np.zeros((r, k, n_max, dc), np.float32)
    cell_mask = np.zeros((r, k, n_max), bool)
    for i, per in enumerate(cells):
        for j, c in enumerate(per):
            cell_feats[i, j, : len(c)] = c
            cell_mask[i, j, : len(c)] = True
    t = torch.from_numpy
    return SlideInputs(
        slide_id=slide_id, patch_feats=t(patch_feats), patch_mask=t(patch_mask), region_input=t(region_in),
        grid_mask=t(grid_mask), cell_feats=t(cell_feats), cell_mask=t(cell_mask), region_coords=t(region_coords),
        selected=t(selected), relevance=t(relevance), patch_coords=t(patch_coords), region_index=t(keep.astype(np.int64)),
        region_size_level0=region_size_level0, level0_size=torch.tensor(level0_size, dtype=torch.int64),
    )


def _pad_to(x: torch.Tensor, shape: tuple[int, ...], value: float | int | bool = 0) -> torch.Tensor:
    out = torch.full(shape, value, dtype=x.dtype)
    out[tuple(slice(0, s) for s in x.shape)] = x
    return out


def collate_slides(items: list[SlideInputs]) -> SlideBatch:
    """Pad a list of slides to common (R, k, G, Nmax); padding is False in every mask, -1 in indices/coords."""
    if not items:
        raise ValueError("collate_slides needs at least one slide")
    r = max(x.n_regions for x in items)
    k = max(x.patch_feats.shape[1] for x in items)
    g = max(x.region_input.shape[1] for x in items)
    n = max(x.cell_feats.shape[2] for x in items)
    dp, din, dc = items[0].patch_feats.shape[-1], items[0].region_input.shape[-1], items[0].cell_feats.shape[-1]

    def stack(name: str, shape: tuple[int, ...], value: float | int | bool = 0) -> torch.Tensor:
        return torch.stack([_pad_to(getattr(x, name), shape, value) for x in items])

    return SlideBatch(
        slide_ids=[x.slide_id for x in items],
        patch_feats=stack("patch_feats", (r, k, dp)),
        patch_mask=stack("patch_mask", (r, k), False),
        region_input=stack("region_input", (r, g, din)),
        grid_mask=stack("grid_mask", (r, g), False),
        cell_feats=stack("cell_feats", (r, k, n, dc)),
        cell_mask=stack("cell_mask", (r, k, n), False),
        region_coords=stack("region_coords", (r, 2), 0),
        region_mask=torch.stack([_pad_to(torch.ones(x.n_regions, dtype=torch.bool), (r,), False) for x in items]),
        selected=stack("selected", (r, k), -1),
        relevance=stack("relevance", (r, k), float("nan")),
        patch_coords=stack("patch_coords", (r, k, 2), -1),
        region_size_level0=torch.tensor([x.region_size_level0 for x in items], dtype=torch.float32),
        level0_size=torch.stack([x.level0_size.to(torch.int64) for x in items]),
    )


def save_slide_inputs(inputs: SlideInputs, path: str | Path, half: bool = True) -> None:
    """Write a compact cache: torch .pt of the dataclass fields, features as float16 unless ``half=False``."""
    data = inputs.to_dict()
    if half:
        for name in _FEATURE_FIELDS:
            data[name] = data[name].to(torch.float16)  # type: ignore[union-attr]
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(data, tmp)
    tmp.replace(path)


def half_rounded(inputs: SlideInputs) -> SlideInputs:
    """``inputs`` with its features rounded through float16 and back: what a cache file of
    :func:`save_slide_inputs` gives back (inputs built in RAM then match inputs read from the cache)."""
    data = inputs.to_dict()
    for name in _FEATURE_FIELDS:
        data[name] = data[name].to(torch.float16).to(torch.float32)  # type: ignore[union-attr]
    return SlideInputs(**data)


def load_cached_inputs(path: str | Path) -> SlideInputs:
    """Read a cache written by :func:`save_slide_inputs` (features back to float32)."""
    data = torch.load(Path(path), map_location="cpu", weights_only=True)
    for name in _FEATURE_FIELDS:
        data[name] = data[name].to(torch.float32)
    return SlideInputs(**data)
