"""hwsi.cells — nuclei and cells (docs/design.md §5 "Cells", paper §3.3 Eq. 3).

Two backends behind one result shape (a columnar per-nucleus table + (N, D) cell vectors c_ijk):

* built-in CPU segmentation: :func:`segment_nuclei` (colour deconvolution, threshold, watershed) with
  morphology/intensity/texture features (:mod:`hwsi.cells.morphology`) and rule-based types
  (:mod:`hwsi.cells.nucleus_types`);
* ingest of a CellViT run or a QuPath export: :func:`hwsi.cells.cellvit.load_cellvit` (``cells.json`` / GeoJSON +
  token embeddings; formats and layouts: docs/formats-cells.md).

Every backend codes nucleus types with the one table of :mod:`hwsi.cells.nucleus_types`.

:func:`cells_to_columns` (:mod:`hwsi.cells.columns`) turns results into the columns of a slide store's ``cells/*``
group, which :mod:`hwsi.store.cells` writes and reads (CSR by region and patch);
:mod:`hwsi.cells.segmentation_metrics` scores an instance segmentation (F1 at IoU ≥ 0.5, AJI).
"""

from hwsi.cells.cellvit import CellVitCells, CellVitError, attach_cells_to_grid, load_cellvit
from hwsi.cells.morphology import FEATURE_DIM, FEATURE_NAMES, TABLE_COLUMNS
from hwsi.cells.nucleus_types import NUCLEUS_TYPES, TYPE_NAMES, TypeRules, map_type_names
from hwsi.cells.segment import Nuclei, SegmentConfig, segment_nuclei
from hwsi.cells.columns import cells_to_columns

__all__ = [
    "CellVitCells",
    "CellVitError",
    "attach_cells_to_grid",
    "cells_to_columns",
    "load_cellvit",
    "FEATURE_DIM",
    "FEATURE_NAMES",
    "TABLE_COLUMNS",
    "NUCLEUS_TYPES",
    "TYPE_NAMES",
    "map_type_names",
    "Nuclei",
    "SegmentConfig",
    "TypeRules",
    "segment_nuclei",
]
