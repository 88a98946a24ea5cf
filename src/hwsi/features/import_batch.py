"""`hwsi import-features JOB FOLDER`: every features file of a folder into the store of its slide
(docs/formats-features.md, "A folder of files"). A slide that cannot be imported is recorded in
``JOB/errors/<slide_id>.import-features.json`` and the batch goes on (exit 1 at the end); a slide whose store
already holds ``patches/<name>`` is skipped unless ``overwrite``."""

from __future__ import annotations

from pathlib import Path

from hwsi.batch import BatchItem, BatchResult, run_batch
from hwsi.features.import_config import ImportConfig
from hwsi.features.import_features import FeatureImportError, import_features
from hwsi.store import SlideStore, store_path

STAGE = "import-features"
SUFFIXES = (".h5", ".pt")


def features_files(folder: Path) -> list[Path]:
    """The features files of ``folder``, one per slide (``<slide>.h5`` preferred to ``<slide>.pt``): TRIDENT's
    ``features_<encoder>/``, or CLAM's feature folder (its ``h5_files/``, else its ``pt_files/``)."""
    for sub in (folder, folder / "h5_files", folder / "pt_files"):
        found = sorted(p for p in sub.iterdir() if p.is_file() and p.suffix in SUFFIXES) if sub.is_dir() else []
        if found:
            by_stem: dict[str, Path] = {}
            for p in found:
                if p.stem not in by_stem or p.suffix == ".h5":
                    by_stem[p.stem] = p
            return [by_stem[k] for k in sorted(by_stem)]
    raise FeatureImportError(folder, "no features files (*.h5, *.pt) in this folder, its h5_files/ or pt_files/")


def import_features_batch(job: Path, folder: Path, cfg: ImportConfig, *, show_progress: bool = True) -> BatchResult:
    """Import every features file of ``folder``; slide id = file stem (TRIDENT and CLAM name files by slide)."""
    if not (job / "stores").is_dir():
        raise FeatureImportError(job, "not a job folder (no stores/; run `hwsi tile` first)")
    if cfg.patches is not None and not Path(cfg.patches).is_dir():
        raise FeatureImportError(cfg.patches, "with a folder of features files, --patches must be a folder")
    items = [BatchItem(p.stem, p, str(p)) for p in features_files(folder)]

    def process(item: BatchItem[Path]) -> dict[str, object]:
        store = store_path(job, item.slide_id)
        if not store.is_file():
            raise FeatureImportError(item.payload, f"no store {store} for slide {item.slide_id!r} (the file's name "
                                                   "must be the slide id `hwsi tile` gave it)")
        rep = import_features(store, item.payload, cfg)
        return {"matched": f"{rep.n_matched}/{rep.n_foreign}", "format": rep.source_format, "rule": rep.scale_rule}

    def is_done(item: BatchItem[Path]) -> bool:
        store = store_path(job, item.slide_id)
        if not store.is_file():
            return False
        with SlideStore(store) as s:
            return s.has_features(cfg.name)

    return run_batch(items, job, STAGE, process, is_done, overwrite=cfg.overwrite, show_progress=show_progress)
