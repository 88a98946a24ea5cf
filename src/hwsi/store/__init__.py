"""hwsi.store — the per-slide HDF5 feature store (docs/design.md §4), the only module that opens one.

* :mod:`hwsi.store.layout`: the layout (datasets, attributes, schema version), :class:`StoreMeta`, job paths;
* :mod:`hwsi.store.reader`: :class:`SlideStore`, read-only, typed accessors, schema version checked on open;
* :mod:`hwsi.store.writer`: :func:`new_store` / :func:`update_store` yielding a :class:`StoreWriter`;
* :mod:`hwsi.store.cells`: the columnar ``cells/*`` table with CSR offsets.

Lowest layer: imports nothing from hwsi but ``hwsi.errors``, ``hwsi.utils`` and ``hwsi.__version__``.
"""

from hwsi.store.cells import rows_to_columns
from hwsi.store.layout import (
    FEATURE_DTYPES,
    GRID_FIELDS,
    SCHEMA_VERSION,
    STORE_SUFFIX,
    FeatureDtype,
    RegionGridShape,
    StoreMeta,
    grid_fields,
    has_stage,
    list_stores,
    store_path,
)
from hwsi.store.reader import MASK_DATASETS, SlideStore, read_store_meta
from hwsi.store.writer import StoreWriter, new_store, update_store

__all__ = [
    "FEATURE_DTYPES",
    "FeatureDtype",
    "GRID_FIELDS",
    "MASK_DATASETS",
    "SCHEMA_VERSION",
    "STORE_SUFFIX",
    "RegionGridShape",
    "SlideStore",
    "StoreMeta",
    "StoreWriter",
    "grid_fields",
    "has_stage",
    "list_stores",
    "new_store",
    "read_store_meta",
    "rows_to_columns",
    "store_path",
    "update_store",
]
