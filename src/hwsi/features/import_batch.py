"""`hwsi import-features JOB FOLDER`: every features file of a folder into the store of its slide
(docs/formats-features.md, "A folder of files"). FOLDER is a folder of features files, CLAM's features folder
(``h5_files/``, ``pt_files/``) or a whole TRIDENT job (``[<mag>x_<ps>px_<ov>px_overlap/]features_<encoder>/``; with
several encoders, ``encoder`` picks one). Files are mapped to slides by name (:func:`match_files`); a file that
matches no slide, or a slide that cannot be imported, is recorded in ``JOB/errors/<id>.import-features.json`` and the
batch goes on (exit 1 at the end); the job's slides without a file are listed. A slide whose store already holds
``patches/<name>`` is skipped unless ``overwrite``."""

from __future__ import annotations

import sys
from pathlib import Path

from hwsi.batch import BatchItem, BatchResult, run_batch
from hwsi.features.import_config import ImportConfig
from hwsi.features.import_features import FeatureImportError, import_features
from hwsi.slide.tile import read_registry
from hwsi.store import SlideStore, list_stores, store_path

STAGE = "import-features"
SUFFIXES = (".h5", ".pt")


def _files_in(folder: Path) -> list[Path]:
    """One features file per slide of a folder or its CLAM ``h5_files/`` / ``pt_files/`` (``<slide>.h5`` preferred to
    ``<slide>.pt``); [] when there is none."""
    for sub in (folder, folder / "h5_files", folder / "pt_files"):
        found = sorted(p for p in sub.iterdir() if p.is_file() and p.suffix in SUFFIXES) if sub.is_dir() else []
        if found:
            by_stem: dict[str, Path] = {}
            for p in found:
                if p.stem not in by_stem or p.suffix == ".h5":
                    by_stem[p.stem] = p
            return [by_stem[k] for k in sorted(by_stem)]
    return []


def trident_feature_folders(job: Path) -> list[Path]:
    """A TRIDENT job's ``features_<encoder>/`` folders: at its top or one level down (TRIDENT writes them under
    ``<mag>x_<patch>px_<overlap>px_overlap/``); ``slide_features_<encoder>/`` (slide embeddings) are not these."""
    found = [*job.glob("features_*"), *job.glob("*/features_*")]
    return sorted(d for d in found if d.is_dir())


def features_files(folder: Path, encoder: str | None = None) -> list[Path]:
    """The features files FOLDER names, one per slide: its own / its CLAM ``h5_files/``, ``pt_files/``; else those of
    the TRIDENT job's one ``features_<encoder>/`` folder (``encoder`` picks it where there are several)."""
    if encoder is None:
        files = _files_in(folder)
        if files:
            return files
    subs = [d for d in trident_feature_folders(folder) if encoder is None or d.name == f"features_{encoder}"]
    if len(subs) > 1:
        names = ", ".join(str(d.relative_to(folder)) for d in subs)
        how = "give one of them as FOLDER" if encoder else "choose one with --encoder NAME (or give it as FOLDER)"
        raise FeatureImportError(folder, f"{len(subs)} TRIDENT features folders ({names}); {how}")
    files = _files_in(subs[0]) if subs else []
    if not files:
        if encoder is not None:
            there = ", ".join(d.name for d in trident_feature_folders(folder)) or "none"
            raise FeatureImportError(folder, f"no TRIDENT features_{encoder}/ folder with features files "
                                             f"(--encoder {encoder}); features folders here: {there}")
        raise FeatureImportError(folder, "no features files (*.h5, *.pt) in this folder, its h5_files/ or "
                                         "pt_files/, or a TRIDENT job's [<mag>x_..._overlap/]features_<encoder>/")
    return files


def match_files(job: Path, files: list[Path]) -> tuple[list[tuple[str, Path]], list[tuple[Path, str]], list[str]]:
    """Features files -> slides of ``job`` by name: ``(matched (slide id, file), unmatched (file, why), the job's
    slides without a file)``. A file ``S.h5`` is the slide whose id is S; else the one slide whose source file
    (``JOB/slides.json``) is named ``S.<ext>`` (TRIDENT and CLAM name files by the slide file without its
    extension; hwsi gives a slide its whole file name as id where stems clash). Two files for one slide: the one
    named by its id wins, the other is unmatched."""
    ids = {p.stem for p in list_stores(job)}
    by_source: dict[str, set[str]] = {}
    for sid, entry in read_registry(job).items():
        path = entry.get("path") if isinstance(entry, dict) else None
        if sid in ids and isinstance(path, str) and path:
            by_source.setdefault(Path(path).stem, set()).add(sid)
    matched = {f.stem: f for f in files if f.stem in ids}  # named by the slide id (one file per stem)
    unmatched: list[tuple[Path, str]] = []
    for f in files:
        if f.stem in ids:
            continue
        cands = sorted(by_source.get(f.stem, set()))
        if not cands:
            unmatched.append((f, f"matches no slide of {job}: no store {store_path(job, f.stem)}, and no slide file "
                                 f"in {job / 'slides.json'} is named {f.stem}.<ext> (name files by slide id)"))
        elif len(cands) > 1:
            unmatched.append((f, f"its name fits {len(cands)} slides of {job} ({', '.join(cands)}); rename it to "
                                 "the slide id"))
        elif cands[0] in matched:
            unmatched.append((f, f"slide {cands[0]!r} already has a features file ({matched[cands[0]].name})"))
        else:
            matched[cands[0]] = f
    missing = sorted(ids - set(matched))
    return sorted(matched.items()), unmatched, missing


def _shown(names: list[str], n: int = 8) -> str:
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def import_features_batch(job: Path, folder: Path, cfg: ImportConfig, *, show_progress: bool = True,
                          encoder: str | None = None) -> BatchResult:
    """Import every features file of ``folder`` (a folder of files, CLAM's features folder or a TRIDENT job) into
    the store of the slide it is named after (:func:`match_files`)."""
    if not (job / "stores").is_dir():
        raise FeatureImportError(job, "not a job folder (no stores/; run `hwsi tile` first)")
    if cfg.patches is not None and not Path(cfg.patches).is_dir():
        raise FeatureImportError(cfg.patches, "with a folder of features files, --patches must be a folder")
    matched, unmatched, missing = match_files(job, features_files(folder, encoder))
    why = {str(f): reason for f, reason in unmatched}
    items = [BatchItem(sid, p, str(p)) for sid, p in matched]
    taken = {sid for sid, _ in matched}
    for f, _ in unmatched:  # recorded as failed under a name of their own
        key, n = f.stem, 1
        while key in taken:
            n += 1
            key = f"{f.stem}~{n}"
        taken.add(key)
        items.append(BatchItem(key, f, str(f)))
    if unmatched:
        print(f"{folder}: {len(unmatched)} file(s) match no slide of {job}: "
              f"{_shown([f.name for f, _ in unmatched])} (recorded as failed)", file=sys.stderr)
    if missing:
        print(f"{folder}: no features file for {len(missing)} slide(s) of {job}: {_shown(missing)} (not imported)",
              file=sys.stderr)

    def process(item: BatchItem[Path]) -> dict[str, object]:
        if str(item.payload) in why:
            raise FeatureImportError(item.payload, why[str(item.payload)])
        store = store_path(job, item.slide_id)
        rep = import_features(store, item.payload, cfg)
        return {"matched": f"{rep.n_matched}/{rep.n_foreign}", "format": rep.source_format, "rule": rep.scale_rule}

    def is_done(item: BatchItem[Path]) -> bool:
        store = store_path(job, item.slide_id)
        if str(item.payload) in why or not store.is_file():
            return False
        with SlideStore(store) as s:
            return s.has_features(cfg.name)

    return run_batch(items, job, STAGE, process, is_done, overwrite=cfg.overwrite, show_progress=show_progress)
