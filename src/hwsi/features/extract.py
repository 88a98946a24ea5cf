"""`hwsi extract`: fill the stores written by `hwsi tile` with frozen features, SPF and cells (paper §3.3).

Per slide (one store ``JOB/stores/<id>.h5``), every region is read ONCE (hwsi.slide reader) and

1. all TISSUE patches are encoded with the patch encoder → ``patches/<patch_enc>`` (R, G, D) float32, the f_ij of
   the paper; non-tissue rows are zeros (``patches/tissue`` says which rows are real). One region per chunk.
2. the region input (the ViT-4K input) → ``patches/<region_in>`` (R, G, D'). With ``--region-input same`` (the CPU
   default: the small patch encoder's embeddings feed ViT-4K, docs/design.md §5) nothing is duplicated: the store attribute
   ``region_input`` names the dataset to read (``patches/<region_input>``), here the patch encoder's.
3. SPF (Eq. 1–2, :mod:`hwsi.features.spf`) on the patch features against the text embeddings of ONE fixed vocabulary
   (candidates: tissue patches whose tissue fraction is at least ``min_tissue``, 0.5, so that edge patches of
   mostly glass never stand for a region — measured on SynthPath with the built-in vocabulary, 42 % of the
   selected patches were such edge patches without it; a region none of whose patches reaches it falls back to
   all its tissue patches)
   (:mod:`hwsi.features.vocab`, embedded once per run) → ``spf/selected`` (R, k) int32 −1 padded,
   ``spf/relevance`` (R, G), ``spf/kept_eq1`` (R, G), ``spf/diverse`` (R, G), ``spf/tau`` (R,), and the vocabulary
   with its embeddings (``spf/terms``, ``spf/text_embeddings``) for reproducibility.
4. cells (Eq. 3): the built-in nucleus segmentation runs ONLY on the SPF-selected patches (∀P_ij ∈ R̂_i) and writes
   the columnar ``cells/*`` table (level-0 centroids), ``cells/embeddings`` (c_ijk) and ``cells/offsets`` (CSR by
   region and patch) one region at a time; or ``--cells none``; or ``--cells cellvit:DIR`` to ingest a CellViT run.

Corrupt reads: the reader fills corrupt tiles black and flags the patches they touch; those patches are taken out
of ``patches/tissue`` (never encoded, never selected) and listed in ``patches/corrupt`` (R, G); past the reader's
threshold the slide fails (SlideError) and the store stays as it was.

Memory is bounded by one region (its pixels, G feature rows and its cells). The store is updated atomically: a copy
is written and renamed over the original (:func:`hwsi.store.update_store`), so a killed run leaves the
tiled store intact. A finished slide records ``stages`` += features, spf, cells, extract and the run's settings in the
``extract`` attribute (JSON); a rerun skips slides whose settings match (encoders + checkpoint identity, text
encoder, vocabulary fingerprint, k, n_div, min_tissue, cells backend) and redoes the others. Per-slide failures are recorded
by :func:`hwsi.batch.run_batch` in ``JOB/errors/<id>.extract.json`` and do not stop the batch.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hwsi.errors import ConfigError, HwsiError, StoreError
from hwsi.features.spf import SPFBatch, SPFConfig, fill_row, spf_select
from hwsi.features.vocab import load_vocabulary, vocabulary_fingerprint
from hwsi.store import (
    SlideStore,
    StoreMeta,
    StoreWriter,
    grid_fields,
    list_stores,
    rows_to_columns,
    update_store,
)

STAGE = "extract"


class ExtractError(HwsiError):
    """Extraction cannot run for a slide or with these settings; names the file where there is one."""


@dataclass
class ExtractConfig:
    """Settings of `hwsi extract` (CLI flags of the same names)."""

    patch_encoder: str = "hwsi_small_patch"  # NAME or NAME:CKPT
    region_input: str = "same"  # NAME[:CKPT] or "same"
    text_encoder: str = "minilm"
    cells: str = "builtin"  # builtin | none | cellvit:DIR
    batch_size: int = 64
    threads: int = 2  # reader threads (overlap reading with encoding)
    k: int = 16
    n_div: int = 32
    min_tissue: float = 0.5  # SPF candidates: tissue patches with at least this tissue fraction
    vocab: str | None = None  # vocabulary file; None = the built-in DEFAULT_VOCABULARY
    overwrite: bool = False
    slide_ids: list[str] = field(default_factory=list)  # subset of the job's slides (empty = all)

    def validate(self) -> None:
        SPFConfig(k=self.k, n_div=self.n_div)
        if not 0.0 <= self.min_tissue <= 1.0:
            raise ConfigError(f"--min-tissue must be in [0, 1], got {self.min_tissue}")
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.threads < 1:
            raise ConfigError(f"--threads must be >= 1, got {self.threads}")
        kind = self.cells.split(":", 1)[0]
        if kind not in ("builtin", "none", "cellvit"):
            raise ConfigError(f"--cells must be builtin, none or cellvit:DIR, got {self.cells!r}")
        if kind == "cellvit" and not self.cells.partition(":")[2]:
            raise ConfigError("--cells cellvit:DIR needs the folder of the CellViT outputs")


@dataclass
class SlideTimings:
    """Seconds spent per step for one slide (read = waiting for pixels from the reader)."""

    read: float = 0.0
    encode: float = 0.0
    region_input: float = 0.0
    spf: float = 0.0
    cells: float = 0.0
    write: float = 0.0
    total: float = 0.0
    n_regions: int = 0
    n_patches: int = 0
    n_selected: int = 0
    n_cells: int = 0

    def add(self, other: SlideTimings) -> None:
        for k, v in asdict(other).items():
            setattr(self, k, getattr(self, k) + v)


# ------------------------------------------------------------------------------------------------ models


def checkpoint_identity(ckpt: Path | None) -> str:
    """Cheap identity of a checkpoint (resolved path, size, mtime of each file) so a replaced file re-runs."""
    if ckpt is None:
        return ""
    p = Path(ckpt).expanduser().resolve()
    files = sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else [p]
    parts = [str(p)]
    for q in files:
        st = q.stat()
        parts.append(f"{q.name}:{st.st_size}:{st.st_mtime_ns}")
    return "|".join(parts)


@dataclass
class Models:
    """The frozen encoders and the text embeddings of one run (built once, used for every slide)."""

    patch_encoder: Any
    patch_name: str
    region_encoder: Any | None  # None = same as the patch encoder
    region_name: str
    terms: tuple[str, ...]
    text_emb: np.ndarray
    settings: dict[str, Any]


def load_models(cfg: ExtractConfig, log: Callable[[str], None] = print) -> Models:
    """Build the encoders named in ``cfg`` and embed the SPF vocabulary once (Eq. 2's t_m)."""
    from hwsi.features.encoders import create_encoder, create_text_encoder, parse_encoder_spec

    cfg.validate()
    terms = load_vocabulary(cfg.vocab)  # a bad vocabulary file fails before any model is loaded
    p_name, p_ckpt = parse_encoder_spec(cfg.patch_encoder)
    enc = create_encoder(p_name, p_ckpt)
    t_name, t_ckpt = parse_encoder_spec(cfg.text_encoder)
    space = getattr(getattr(enc, "config", None), "text_encoder", None)
    if space and space != t_name:
        raise ExtractError(
            f"patch encoder {p_name!r} embeds into the space of text encoder {space!r}, not {t_name!r}: SPF (Eq. 2) "
            f"compares them directly; use --text-encoder {space}"
        )
    if p_name == "hwsi_small_patch" and p_ckpt is None:
        log("warning: hwsi_small_patch without a checkpoint has random weights; SPF relevance (Eq. 2) is "
            "meaningless until it is trained (`hwsi train-encoder`, then --patch-encoder hwsi_small_patch:DIR)")
    text = create_text_encoder(t_name, t_ckpt)
    text_emb = text.encode(list(terms)).astype(np.float32)
    if text_emb.shape[1] != enc.embed_dim:
        raise ExtractError(
            f"patch encoder {p_name!r} is {enc.embed_dim}-d but text encoder {t_name!r} is {text_emb.shape[1]}-d: "
            "SPF (Eq. 2) needs them in one space (hwsi_small_patch + minilm, conch_vit_b16 + conch_text)"
        )
    del text
    region_enc = None
    if cfg.region_input in ("same", ""):
        r_name, r_ckpt = p_name, p_ckpt
    else:
        r_name, r_ckpt = parse_encoder_spec(cfg.region_input)
        if r_name == p_name and r_ckpt != p_ckpt:
            raise ExtractError(f"--region-input {cfg.region_input!r} and --patch-encoder {cfg.patch_encoder!r} "
                               "share a name but not a checkpoint; both would be written to patches/" + p_name)
        if r_name != p_name:
            region_enc = create_encoder(r_name, r_ckpt)
    if r_name in ("coords", "tissue"):
        raise ExtractError(f"encoder name {r_name!r} collides with a store dataset")
    settings = {
        "patch_encoder": p_name,
        "patch_checkpoint": checkpoint_identity(p_ckpt),
        "region_input": r_name,
        "region_checkpoint": checkpoint_identity(r_ckpt),
        "text_encoder": t_name,
        "text_checkpoint": checkpoint_identity(t_ckpt),
        "vocab_fingerprint": vocabulary_fingerprint(terms),
        "k": cfg.k,
        "n_div": cfg.n_div,
        "min_tissue": cfg.min_tissue,
        "cells": _cells_setting(cfg.cells),
    }
    return Models(enc, p_name, region_enc, r_name, terms, text_emb, settings)


def _cells_setting(spec: str) -> str:
    kind, _, d = spec.partition(":")
    return f"cellvit:{Path(d).expanduser().resolve()}" if kind == "cellvit" else kind


# ------------------------------------------------------------------------------------------------ reading


def _slide_path_for(job: Path, meta: StoreMeta, store: Path) -> Path:
    """The slide file of a store: its ``slide_path`` attribute, else the entry in ``JOB/slides.json``."""
    p = Path(meta.slide_path)
    if p.exists():
        return p
    reg = job / "slides.json"
    if reg.is_file():
        try:
            entry = json.loads(reg.read_text()).get(meta.slide_id)
        except ValueError as exc:
            raise ExtractError(f"{reg}: not valid JSON ({exc})") from exc
        cand = entry.get("path") if isinstance(entry, dict) else entry
        if cand and Path(cand).exists():
            return Path(cand)
    raise ExtractError(f"{store}: slide file {meta.slide_path} not found (moved? update JOB/slides.json)")


# (store, meta, slide path, threads) -> (region index, patches (G,P,P,3) uint8, corrupt patches (G,) bool | None)
RegionStream = Callable[[Path, StoreMeta, Path, int], Iterator[tuple[int, np.ndarray, np.ndarray | None]]]


def grid_from_store(s: SlideStore) -> Any:
    """Rebuild the :class:`hwsi.slide.Grid` that `hwsi tile` laid out from an open store (no re-tiling)."""
    from hwsi.slide import Grid

    meta = s.meta
    tissue, frac = s.patch_tissue(), s.patch_tissue_fraction()
    return Grid(
        region_coords=s.region_coords(),
        region_tissue=s.region_tissue(),
        patch_coords=s.patch_coords(),
        patch_fraction=frac,
        patch_tissue=tissue,
        **grid_fields(meta),
        scale=float(meta.region_size_level0) / float(meta.region_size),
        n_candidates=int(s.attr("n_candidate_regions", tissue.shape[0])),
    )


def slide_region_stream(store: Path, meta: StoreMeta, slide_path: Path, threads: int
                        ) -> Iterator[tuple[int, np.ndarray, np.ndarray | None]]:
    """Yield (region index, patches (G, P, P, 3) uint8, corrupt-patch mask (G,) or None) for every region of the
    store, each read once by :func:`hwsi.slide.iter_regions` on the grid recorded in the store."""
    from hwsi.slide import iter_regions, open_slide

    with SlideStore(store) as s:
        grid = grid_from_store(s)
    with open_slide(slide_path, mpp=meta.mpp_level0, slide_id=meta.slide_id) as slide:
        if tuple(slide.dimensions) != (meta.level0_width, meta.level0_height):
            raise ExtractError(f"{slide_path}: level-0 size {slide.dimensions} differs from the tiled "
                               f"{(meta.level0_width, meta.level0_height)} in {store} (another file? re-tile it)")
        for rp in iter_regions(slide, grid, threads=threads):
            yield int(rp.index), rp.patches, rp.corrupt_patches


# ------------------------------------------------------------------------------------------------ cells


class _CellWriter:
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
        from hwsi.cells.columns import cells_to_columns

        if self.pending:
            raise ExtractError(f"{self.f.path}: regions {sorted(self.pending)[:5]} never followed region "
                               f"{self.next_region - 1}; the reader skipped a region")
        if not self.f.has_cells:  # no cell anywhere: still write an empty, well-formed group
            cols, emb, offs = cells_to_columns([], np.zeros(0), np.zeros(0), np.zeros((0, 2)), self.scale,
                                               n_regions=self.n_regions, grid_size=self.grid)
            self.f.write_cells(cols, emb, offs, grid_size=self.grid)
        from hwsi.cells import TYPE_NAMES

        self.f.set_cells_attrs(backend=self.kind,
                               scope="spf_selected",  # Eq. 3: only patches of R̂_i are segmented
                               mpp=float(self.meta.effective_mpp),
                               type_names=json.dumps({str(k): v for k, v in TYPE_NAMES.items()}))


# ------------------------------------------------------------------------------------------------ one slide


def read_extract_settings(path: Path) -> dict[str, Any] | None:
    """The ``extract`` settings recorded in a finished store, or None."""
    try:
        with SlideStore(path) as s:
            if STAGE not in s.stages:
                return None
            return s.json_attr("extract")
    except (OSError, ValueError, HwsiError):
        return None


def extract_slide(
    store: Path,
    models: Models,
    cfg: ExtractConfig,
    *,
    job: Path | None = None,
    region_stream: RegionStream | None = None,
    cellvit_dir: Path | None = None,
) -> SlideTimings:
    """Extract one slide's features, SPF and cells into ``store`` (atomic update; see the module docstring)."""
    t_start = time.perf_counter()
    tm = SlideTimings()
    store = Path(store)
    with SlideStore(store) as s:
        meta = s.meta
        if "tile" not in meta.stages:
            raise StoreError(store, "the store is not tiled yet (run `hwsi tile`)")
        coords = s.patch_coords()
        tissue, frac = s.patch_tissue(), s.patch_tissue_fraction()
    n_r, n_g = tissue.shape
    if models.region_encoder is None and models.region_name != models.patch_name:  # pragma: no cover - guarded
        raise ExtractError("region encoder missing")
    stream = region_stream or slide_region_stream
    slide_path = _slide_path_for(job or store.parent.parent, meta, store) if region_stream is None else Path(meta.slide_path)
    corrupt = np.zeros((n_r, n_g), bool)
    cells_kind = cfg.cells.partition(":")[0]
    spf_cfg = SPFConfig(k=cfg.k, n_div=cfg.n_div)
    spf = SPFBatch(
        selected=np.full((n_r, cfg.k), -1, np.int32),
        relevance=np.full((n_r, n_g), np.nan, np.float32),
        kept_eq1=np.zeros((n_r, n_g), bool),
        diverse=np.zeros((n_r, n_g), bool),
        tau=np.full(n_r, np.nan, np.float32),
    )
    d_p = int(models.patch_encoder.embed_dim)
    with update_store(store) as f:
        ds_p = f.create_features(models.patch_name, (n_r, n_g, d_p))
        ds_r = None
        if models.region_encoder is not None:
            d_r = int(models.region_encoder.embed_dim)
            ds_r = f.create_features(models.region_name, (n_r, n_g, d_r))
        cells = _CellWriter(f, meta, coords, cells_kind) if cells_kind == "builtin" else None
        seen = np.zeros(n_r, bool)
        t_read0 = time.perf_counter()
        for r, patches, bad in stream(store, meta, slide_path, cfg.threads):
            tm.read += time.perf_counter() - t_read0
            if not 0 <= r < n_r or seen[r]:
                raise ExtractError(f"{store}: reader yielded region {r} (R={n_r}) twice or out of range")
            seen[r] = True
            if patches.shape[0] != n_g:
                raise ExtractError(f"{store}: region {r} has {patches.shape[0]} patches, the store {n_g}")
            if bad is not None and bad.any():  # black-filled corrupt tiles: never encode them as tissue
                corrupt[r] = bad & tissue[r]
                tissue[r] &= ~bad
            tis = np.flatnonzero(tissue[r])
            t0 = time.perf_counter()
            row = np.zeros((n_g, d_p), np.float32)
            if tis.size:
                row[tis] = models.patch_encoder.encode(patches[tis], batch_size=cfg.batch_size)
            t1 = time.perf_counter()
            tm.encode += t1 - t0
            row_r = None
            if ds_r is not None:
                row_r = np.zeros((n_g, ds_r.shape[2]), np.float32)
                if tis.size:
                    row_r[tis] = models.region_encoder.encode(patches[tis], batch_size=cfg.batch_size)
            t2 = time.perf_counter()
            tm.region_input += t2 - t1
            res = spf_select(row, models.text_emb, spf_cfg.k, spf_cfg.n_div,
                             spf_candidates(tissue[r], frac[r], cfg.min_tissue), spf_cfg.eq1_atol)
            fill_row(spf, r, res)
            t3 = time.perf_counter()
            tm.spf += t3 - t2
            if cells is not None:
                tm.n_cells += cells.segment(r, patches, res.selected)
            t4 = time.perf_counter()
            tm.cells += t4 - t3
            ds_p[r] = row
            if ds_r is not None:
                ds_r[r] = row_r
            tm.write += time.perf_counter() - t4
            tm.n_regions += 1
            tm.n_patches += int(tis.size)
            tm.n_selected += int(res.selected.size)
            del patches
            t_read0 = time.perf_counter()
        if not seen.all():
            raise ExtractError(f"{store}: the reader delivered {int(seen.sum())} of {n_r} regions")
        t5 = time.perf_counter()
        if cells is not None:
            cells.finish()
        elif cells_kind == "cellvit":
            if cellvit_dir is None:
                raise ExtractError("--cells cellvit needs a folder")
            tm.n_cells = _ingest_cellvit(f, meta, coords, f.region_coords(), spf.selected, cellvit_dir)
            tm.cells += time.perf_counter() - t5
        else:  # --cells none: an EMPTY, well-formed cells group (every patch gets CCAF's "no cells" token);
            # cells of an earlier run would no longer match spf/selected
            _write_empty_cells(f, meta, n_r, n_g)
            f.drop_stage("cells")
        _write_spf(f, spf, models, cfg)
        if corrupt.any():
            f.write_region_dataset("patches/corrupt", corrupt)
            f.set_patch_tissue(tissue)
        f.set_attr("patch_encoder", models.patch_name)
        f.set_attr("region_input", models.region_name)
        f.set_encoder(models.patch_name, d_p)
        if ds_r is not None:
            f.set_encoder(models.region_name, int(ds_r.shape[2]))
        for stage in ("features", "spf") + (("cells",) if cells_kind != "none" else ()) + (STAGE,):
            f.mark_stage(stage)
        f.set_json_attr("extract", models.settings)
        tm.write += time.perf_counter() - t5
    tm.total = time.perf_counter() - t_start
    return tm


def spf_candidates(tissue: np.ndarray, fraction: np.ndarray, min_tissue: float) -> np.ndarray:
    """SPF candidates of one region: tissue patches with tissue ``fraction`` >= ``min_tissue``; if there are none,
    all its tissue patches (a region of thin tissue still gets patch tokens)."""
    cand = tissue & (fraction >= min_tissue)
    return cand if cand.any() else tissue


def _write_empty_cells(f: StoreWriter, meta: StoreMeta, n_r: int, n_g: int) -> None:
    from hwsi.cells.columns import cells_to_columns

    cols, emb, offs = cells_to_columns([], np.zeros(0), np.zeros(0), np.zeros((0, 2)), 1.0,
                                       n_regions=n_r, grid_size=n_g)
    f.write_cells(cols, emb, offs, grid_size=n_g, attrs={"backend": "none", "scope": "none"})


def _write_spf(f: StoreWriter, spf: SPFBatch, models: Models, cfg: ExtractConfig) -> None:
    f.write_spf(spf.selected, spf.relevance, kept_eq1=spf.kept_eq1, diverse=spf.diverse, tau=spf.tau,
                terms=list(models.terms), text_embeddings=models.text_emb,
                attrs={"k": cfg.k, "n_div": cfg.n_div, "entities": "vocabulary",
                       "vocab_fingerprint": models.settings["vocab_fingerprint"],
                       "text_encoder": models.settings["text_encoder"], "patch_encoder": models.patch_name})


def find_cellvit_files(folder: Path, slide_id: str) -> tuple[Path, Path | None]:
    """The CellViT outputs of ``slide_id`` in ``folder``: (cells file, token embeddings file or None).

    Looked up, in order: ``<folder>/<id>/cell_detection/``, ``<folder>/<id>/``, then ``<folder>/<id>.<ext>``;
    cells: ``cells.json``, ``cell_detection.json``, ``cells.geojson``, ``cell_detection.geojson``; tokens:
    ``cells.pt``, ``cells.npy``, ``cell_tokens.npy`` (or ``<id>.pt``/``<id>.npy`` beside ``<id>.json``).
    """
    for d in (folder / slide_id / "cell_detection", folder / slide_id):
        for name in ("cells.json", "cell_detection.json", "cells.geojson", "cell_detection.geojson"):
            if (d / name).is_file():
                emb = next((d / e for e in ("cells.pt", "cells.npy", "cell_tokens.npy") if (d / e).is_file()), None)
                return d / name, emb
    for ext in (".json", ".geojson"):
        c = folder / f"{slide_id}{ext}"
        if c.is_file():
            emb = next((folder / f"{slide_id}{e}" for e in (".pt", ".npy") if (folder / f"{slide_id}{e}").is_file()),
                       None)
            return c, emb
    raise ExtractError(f"{folder}: no CellViT output for slide {slide_id!r} (expected {slide_id}/cell_detection/"
                       "cells.json [+ cells.pt], or {slide_id}.json)")


def _ingest_cellvit(f: StoreWriter, meta: StoreMeta, coords: np.ndarray, region_coords: np.ndarray,
                    selected: np.ndarray, folder: Path) -> int:
    """CellViT backend: read the run's cells (+ tokens), attach them to the grid and keep those in SPF-selected
    patches only (Eq. 3: ∀P_ij ∈ R̂_i). Returns the number of cells written."""
    from hwsi.cells.cellvit import attach_cells_to_grid, load_cellvit

    cells_path, emb_path = find_cellvit_files(folder, meta.slide_id)
    cv = load_cellvit(cells_path, emb_path)
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
    cols, emb_s, offs = rows_to_columns(table, emb, region_idx, patch_idx, n_r, n_g)
    f.delete_cells()
    f.write_cells(cols, emb_s, offs, grid_size=n_g, attrs={
        "backend": "cellvit", "scope": "spf_selected", "source": str(cells_path),
        "embeddings_source": str(emb_path or ""), "n_source_cells": len(cv),
        "n_outside_regions": att.n_unmatched, "n_outside_selected": int((hit & ~keep).sum()),
        "has_embeddings": cv.embeddings is not None,
    })
    return int(keep.sum())


# ------------------------------------------------------------------------------------------------ batch


def is_extracted(store: Path, settings: dict[str, Any]) -> bool:
    """True if ``store`` finished extraction with the same settings (so a rerun skips it)."""
    return read_extract_settings(store) == settings


def run_extract(job: str | Path, cfg: ExtractConfig, *, show_progress: bool = True,
                region_stream: RegionStream | None = None, models: Models | None = None) -> Any:
    """`hwsi extract JOB`: every store of the job, TRIDENT-style batch semantics (skip done, record errors).

    ``models`` (from :func:`load_models` with the same ``cfg``) skips building the encoders again; returns the
    :class:`hwsi.batch.BatchResult` (``exit_code`` 1 if a slide failed)."""
    from hwsi.batch import BatchItem, prepare_job, run_batch

    job = Path(job)
    stores = list_stores(job)
    if not stores:
        raise ExtractError(f"{job}: no stores in {job / 'stores'} (run `hwsi tile` first)")
    if cfg.slide_ids:
        want = set(cfg.slide_ids)
        missing = want - {p.stem for p in stores}
        if missing:
            raise ExtractError(f"{job}: no store for slide(s) {sorted(missing)}")
        stores = [p for p in stores if p.stem in want]
    prepare_job(job)  # writable, and the temporaries of killed runs (never of running ones) removed
    cfg.validate()
    models = models or load_models(cfg)
    cellvit_dir = None
    if cfg.cells.startswith("cellvit:"):
        cellvit_dir = Path(cfg.cells.partition(":")[2]).expanduser()
        if not cellvit_dir.is_dir():
            raise ExtractError(f"{cellvit_dir}: CellViT output folder not found")
    items = [BatchItem(p.stem, p, str(p)) for p in stores]

    def process(item: BatchItem[Path]) -> dict[str, Any]:
        tm = extract_slide(item.payload, models, cfg, job=job, region_stream=region_stream, cellvit_dir=cellvit_dir)
        return {"regions": tm.n_regions, "patches": tm.n_patches, "cells": tm.n_cells,
                "patches/s": round(tm.n_patches / max(tm.total, 1e-9), 1)}

    return run_batch(items, job, STAGE, process, lambda it: is_extracted(it.payload, models.settings),
                     overwrite=cfg.overwrite, show_progress=show_progress)


def default_threads() -> int:
    """Reader threads by default: the number of CPUs, at most 4."""
    return max(1, min(4, os.cpu_count() or 1))
