"""Settings of `hwsi import-features` (docs/formats-features.md); kept apart from the importer so that the CLI reads
its defaults without loading h5py."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ImportConfig:
    """One import: the dataset name and how strictly the foreign patches must fit the store's grid."""

    name: str = ""
    tolerance: float = 0.25  # max centre offset, in store patch sides
    size_rtol: float = 0.05  # footprints within 5% are the same scale
    min_matched: float = 0.5  # below this fraction of foreign patches matched, the slide fails
    patch_size_level0: float | None = None  # stated footprint for files that state none (CLAM features)
    patches: str | None = None  # CLAM / TRIDENT patches .h5, or a folder of them
    overwrite: bool = False
