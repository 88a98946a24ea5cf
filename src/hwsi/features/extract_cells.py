"""The cells step of `hwsi extract` (Eq. 3: cells of the SPF-selected patches only, ∀P_ij ∈ R̂_i).

:class:`CellWriter` segments each region's selected patches with the built-in nucleus segmentation and appends
their cells in (region, patch) order; :func:`load_cellvit_run` reads and checks a CellViT / QuPath output
(``--cells cellvit:DIR``, before any region is encoded) and :func:`ingest_cellvit` keeps its selected patches'
cells; :func:`write_empty_cells` writes the empty, well-formed group of ``--cells none``.
hwsi.cells (scipy, scikit-image: ~2 s to import) is imported where it is used, so `hwsi --help` stays fast.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from hwsi.features.extract_config import ExtractError
from hwsi.store import StoreMeta, StoreWriter, rows_to_columns

if TYPE_CHECKING:
    from hwsi.cells.cell_files import CellVitCells


class CellWriter:
    """Segments the selected patches of each region and appends their cells in (region, patch) order."""

    def __init__(self, f: StoreWriter, meta: StoreMeta, patch_coords: np.ndarray, kind: str) -> None:
        from hwsi.cells import SegmentConfig

        self.f = f
        self.meta = meta
        self.coords = patch_coords
        self.kind = kind
        self.cfg = SegmentConfig()
        self.n_regions, self.grid = patch_coords.shape[:2]
        self.scale = float(meta.patch_size_level0) / float(meta.patch_size)
        self.pending: dict[int, tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]] = {}
        self.next_region = 0
        self.written = 0
        f.delete_cells()

    def segment(self, r: int, patches: np.ndarray, selected: np.ndarray) -> int:
        from hwsi.cells import segment_nuclei
        from hwsi.cells.columns import cells_to_columns

        sel = selected[selected >= 0]
        sel = np.sort(sel)
        results = [segment_nuclei(np.ascontiguousarray(patches[g]), self.meta.effective_mpp, self.cfg) for g in sel]
        cols, emb, offs = cells_to_columns(
            results, np.full(len(sel), r), sel, self.coords[r, sel], self.scale,
            n_regions=self.n_regions, grid_size=self.grid,
        )
        self.pending[r] = (cols, emb, offs)
        self._flush()
        return len(emb)

    def skip(self, r: int) -> None:
        self.pending[r] = ({}, np.zeros((0, 0), np.float32), np.zeros(0, np.int64))
        self._flush()

    def _flush(self) -> None:
        while self.next_region in self.pending:
            cols, emb, offs = self.pending.pop(self.next_region)
            self.next_region += 1
            if len(emb):
                self.f.write_cells(cols, emb, offs, grid_size=self.grid, append=True)
                self.written += len(emb)

    def finish(self) -> None:
        from hwsi.cells import TYPE_NAMES
        from hwsi.cells.columns import cells_to_columns

        if self.pending:
            raise ExtractError(f"{self.f.path}: regions {sorted(self.pending)[:5]} never followed region "
                               f"{self.next_region - 1}; the reader skipped a region")
        if not self.f.has_cells:  # no cell anywhere: still write an empty, well-formed group
            cols, emb, offs = cells_to_columns([], np.zeros(0), np.zeros(0), np.zeros((0, 2)), self.scale,
                                               n_regions=self.n_regions, grid_size=self.grid)
            self.f.write_cells(cols, emb, offs, grid_size=self.grid)
        self.f.set_cells_attrs(backend=self.kind,
                               scope="spf_selected",  # Eq. 3: only patches of R̂_i are segmented
                               mpp=float(self.meta.effective_mpp),
                               type_names=json.dumps({str(k): v for k, v in TYPE_NAMES.items()}))


def write_empty_cells(f: StoreWriter, meta: StoreMeta, n_r: int, n_g: int) -> None:
    """``--cells none``: an empty, well-formed cells group of R regions x G patches."""
    from hwsi.cells.columns import cells_to_columns

    cols, emb, offs = cells_to_columns([], np.zeros(0), np.zeros(0), np.zeros((0, 2)), 1.0,
                                       n_regions=n_r, grid_size=n_g)
    f.write_cells(cols, emb, offs, grid_size=n_g, attrs={"backend": "none", "scope": "none"})


def find_cellvit_files(folder: Path, slide_id: str, slide_file: str | None = None) -> tuple[Path, Path | None]:
    """The CellViT / QuPath outputs of ``slide_id`` in ``folder``: (cells file, token embeddings file or None), in
    any layout of :mod:`hwsi.cells.cellvit_layouts`; :class:`ExtractError` listing the paths tried if none."""
    from hwsi.cells.cell_files import CellVitError
    from hwsi.cells.cellvit_layouts import find_cellvit_outputs

    try:
        found = find_cellvit_outputs(folder, slide_id, slide_file)
    except CellVitError as exc:
        raise ExtractError(str(exc)) from exc
    return found.cells, found.embeddings


@dataclass
class CellVitRun:
    """A slide's cells read from another tool (CellViT / QuPath), checked against the slide, before extraction."""

    cells: "CellVitCells"
    cells_path: Path
    embeddings_path: Path | None
    n_outside_slide: int


def load_cellvit_run(meta: StoreMeta, folder: Path) -> CellVitRun:
    """Find, read and check the slide's cell outputs in ``folder`` — before any region is encoded, so a missing or
    mismatched file fails the slide at once (docs/formats-cells.md)."""
    from hwsi.cells.cellvit import load_cellvit
    from hwsi.cells.cellvit_checks import check_cells_on_slide

    cells_path, emb_path = find_cellvit_files(folder, meta.slide_id, meta.slide_path)
    cv = load_cellvit(cells_path, emb_path)
    fit = check_cells_on_slide(cv, meta.level0_width, meta.level0_height, meta.mpp_level0)
    return CellVitRun(cv, cells_path, emb_path, fit.n_outside_slide)


def ingest_cellvit(f: StoreWriter, meta: StoreMeta, coords: np.ndarray, region_coords: np.ndarray,
                   selected: np.ndarray, run: CellVitRun) -> int:
    """CellViT backend: attach the run's cells (+ tokens) to the grid and keep those in SPF-selected patches only
    (Eq. 3: ∀P_ij ∈ R̂_i). Returns the number of cells written."""
    from hwsi.cells.cellvit import attach_cells_to_grid

    cv, cells_path, emb_path = run.cells, run.cells_path, run.embeddings_path
    mapping = cv.metadata.get("type_mapping")
    n_r, n_g = coords.shape[:2]
    side = int(round(n_g**0.5))
    att = attach_cells_to_grid(cv.centroids, region_coords, meta.region_size_level0, meta.patch_size_level0, side)
    sel_mask = np.zeros((n_r, n_g), bool)
    rr, cc = np.nonzero(selected >= 0)
    sel_mask[rr, selected[rr, cc]] = True
    hit = att.region_idx >= 0
    keep = np.zeros(len(cv), bool)
    keep[hit] = sel_mask[att.region_idx[hit], att.patch_idx[hit]]
    region_idx = np.where(keep, att.region_idx, -1)
    patch_idx = np.where(keep, att.patch_idx, -1)
    table = {"x": cv.centroids[:, 0], "y": cv.centroids[:, 1], "type": cv.types.astype(np.int16),
             "type_prob": cv.type_prob.astype(np.float32)}
    emb = cv.embeddings if cv.embeddings is not None else np.zeros((len(cv), 0), np.float32)
    # the source's nucleus outlines (CellViT "contour", QuPath nucleusGeometry) are kept as they are (level 0)
    cols, emb_s, offs = rows_to_columns(table, emb, region_idx, patch_idx, n_r, n_g, contours=cv.contours)
    f.delete_cells()
    f.write_cells(cols, emb_s, offs, grid_size=n_g, attrs={
        "backend": "cellvit", "scope": "spf_selected", "source": str(cells_path),
        "embeddings_source": str(emb_path or ""), "n_source_cells": len(cv),
        "n_outside_regions": att.n_unmatched, "n_outside_selected": int((hit & ~keep).sum()),
        "has_embeddings": cv.embeddings is not None, "n_outside_slide": run.n_outside_slide,
        "type_names": json.dumps({str(k): v for k, v in sorted({0: "unknown", **cv.type_map}.items())}),
        "type_source_names": json.dumps(mapping.codes if mapping else {}),
        "unknown_type_names": json.dumps(list(mapping.unknown) if mapping else []),
    })
    return int(keep.sum())
