"""Slide in, answer out: a new slide tiled and extracted exactly the way a run's stores were (``hwsi ask SLIDE.svs``).

    store = prepare_slide("new.svs", run="RUN")            # RUN/ask/stores/new.h5, made with RUN/bundle's settings
    store = prepare_slide("new.svs", run="RUN", job="JOB") # into another job folder (cached there)

The job folder is a cache: a store already there that was made from the same slide file the run's way
(:func:`hwsi.train.bundle.check_store`) is reused; one tiled or extracted another way is re-made in the default
folder ``RUN/ask`` and refused in a job folder you named (it may be another run's data). ``JOB/slides.json`` gets the
slide, so ``hwsi serve JOB --model RUN`` shows it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from hwsi.config import from_dict
from hwsi.errors import ConfigError, HwsiError, StoreError
from hwsi.features.extract import ExtractConfig, checkpoint_identity, extract_slide, load_models
from hwsi.features.vocab import DEFAULT_VOCABULARY, vocabulary_fingerprint
from hwsi.slide.grid import GridConfig
from hwsi.slide.tile import TileConfig, collect_slides, tile_slide, update_registry
from hwsi.slide.tissue import TissueConfig
from hwsi.store import SlideStore, store_path
from hwsi.train.bundle import (
    MANIFEST, BundleMismatch, RunBundle, check_store, checkpoint_files, load_bundle, read_store_settings, show_value,
)

ASK_JOB = "ask"


def is_store_path(path: str | Path) -> bool:
    """True for a feature store (``*.h5``), False for a slide file."""
    return Path(path).suffix.lower() == ".h5"


def require_bundle(run: str | Path) -> RunBundle:
    """The run's bundle, or a ConfigError saying how to record it."""
    b = load_bundle(run)
    if b is None:
        raise ConfigError(f"{run}: no bundle/bundle.json (trained before hwsi recorded how its stores were made): "
                          "rerun its last stage with --resume (`hwsi train --stage 3 --resume --config C --job JOB "
                          f"--out {run}`) to record it, or ask about a store: hwsi ask JOB/stores/SLIDE.h5")
    return b


def _state(store: Path, slide: Path, bundle: RunBundle) -> str:
    """``"missing"``, ``"other"`` (another slide file, or tiled another way), ``"tiled"`` (tiled from ``slide`` the
    run's way, not extracted), ``"stale"`` (tiled the run's way, extracted another way) or ``"ready"``."""
    if not store.is_file():
        return "missing"
    try:
        with SlideStore(store) as s:
            src = str(s.attr("slide_path", ""))
    except (OSError, StoreError):
        return "other"
    if Path(src) != slide.resolve():
        return "other"
    sig, extra = read_store_settings(store)
    grid = ("target_mpp", "region_size", "patch_size", "min_region_tissue", "min_patch_tissue")
    if any(bundle.signature.get(k) is not None and sig[k] != bundle.signature[k] for k in grid):
        return "other"
    if "extract" not in extra["stages"]:
        return "tiled"
    try:
        check_store(store, bundle)
    except BundleMismatch:
        return "stale"
    return "ready"


def tile_config(bundle: RunBundle) -> Any:
    """The :class:`hwsi.slide.tile.TileConfig` the run's stores were tiled with."""
    t = bundle.tile or {}
    where = str(bundle.folder / MANIFEST)
    return TileConfig(grid=from_dict(GridConfig, t.get("grid", {}), where),
                      tissue=from_dict(TissueConfig, t.get("tissue", {}), where))


def _encoder_spec(bundle: RunBundle, slot: str, name: str) -> str:
    ck = bundle.checkpoints.get(slot, {})
    if not ck.get("source"):
        return name
    if ck.get("bundled"):
        return f"{name}:{bundle.folder / ck['bundled']}"
    src = Path(ck["source"])

    if not src.exists():
        raise ConfigError(f"{bundle.folder / MANIFEST}: the {name} checkpoint {src} the run was trained with is not "
                          "there (it is referenced, not copied); put it back at that path")
    have = checkpoint_files(checkpoint_identity(src))
    want = bundle.signature.get(f"{slot}_checkpoint")
    if want is not None and have != want:
        raise ConfigError(f"{src}: files {show_value(have)} differ from those the run was trained with "
                          f"({show_value(want)})")
    return f"{name}:{src}"


def extract_config(bundle: RunBundle, cells: str | None = None) -> Any:
    """The :class:`hwsi.features.extract.ExtractConfig` the run's stores were extracted with (``cells`` overrides
    the cells backend, e.g. ``cellvit:DIR`` holding this slide's CellViT output)."""
    s, where = bundle.signature, bundle.folder / MANIFEST
    if not bundle.recorded_extract or not s.get("patch_encoder"):
        raise ConfigError(f"{where}: the run's stores recorded no `hwsi extract` settings (imported features?); "
                          "a new slide cannot be made the same way: extract it yourself and pass its store")
    kind = (bundle.cells or "builtin").partition(":")[0]
    if cells is None:
        if kind == "cellvit":
            raise ConfigError(f"{where}: the run was trained on CellViT nuclei; pass --cells cellvit:DIR with this "
                              "slide's CellViT output")
        cells = kind
    elif cells.partition(":")[0] != kind:
        raise ConfigError(f"--cells {cells}: the run was trained with the {kind!r} cells backend")
    vocab = None
    if bundle.vocabulary:
        vocab = str(bundle.folder / bundle.vocabulary)
    elif s.get("vocab_fingerprint") not in (None, vocabulary_fingerprint(DEFAULT_VOCABULARY)):
        raise ConfigError(f"{where}: the run's SPF vocabulary is not bundled and is not the built-in one")
    patch = _encoder_spec(bundle, "patch", s["patch_encoder"])
    region = "same" if s.get("region_input") in (None, s["patch_encoder"]) else _encoder_spec(
        bundle, "region", s["region_input"])
    d = ExtractConfig()
    spf = {k: (d.__dict__[k] if s.get(k) is None else type(d.__dict__[k])(s[k])) for k in ("k", "n_div", "min_tissue")}
    cfg = ExtractConfig(patch_encoder=patch, region_input=region, cells=cells, vocab=vocab,
                        text_encoder=_encoder_spec(bundle, "text", s.get("text_encoder") or d.text_encoder), **spf)
    cfg.validate()
    return cfg


def prepare_slide(slide: str | Path, run: str | Path, job: str | Path | None = None, mpp: float | None = None,
                  cells: str | None = None, log: Callable[[str], None] = print, device: str = "cpu") -> Path:
    """The store of ``slide`` made the run's way in ``job`` (default ``RUN/ask``); tiles and extracts as needed, the
    encoders on ``device`` in float32 (the dtype the run's stores were made in; docs/devices.md)."""
    run = Path(run)
    bundle = require_bundle(run)
    own_job = job is None
    job = run / ASK_JOB if job is None else Path(job)
    specs = collect_slides(slide, mpp)
    if len(specs) != 1:
        raise HwsiError(f"{slide}: hwsi ask takes one slide file, this names {len(specs)}")
    spec = specs[0]
    store = store_path(job, spec.slide_id)
    state = _state(store, spec.path, bundle)
    if state == "ready":
        log(f"{spec.slide_id}: using {store} (made the run's way earlier)")
        return store
    if state in ("other", "stale") and not own_job:
        raise ConfigError(f"{store}: exists and was not made from {spec.path} the run's way; use another --job "
                          "(or the default RUN/ask)")
    xcfg = extract_config(bundle, cells)  # before any work: a run whose extraction cannot be redone fails here
    xcfg.device = device
    if state != "tiled" and state != "stale":
        tcfg = tile_config(bundle)
        log(f"{spec.slide_id}: tiling into {job} (run's grid: {tcfg.grid.region_size} px regions, "
            f"{tcfg.grid.patch_size} px patches at {tcfg.grid.target_mpp} µm/px)")
        info = tile_slide(spec, job, tcfg)
        update_registry(job, [spec], {spec.slide_id: info})
    log(f"{spec.slide_id}: extracting with the run's encoders ({xcfg.patch_encoder.partition(':')[0]}, "
        f"cells {xcfg.cells}, SPF k={xcfg.k})")
    models = load_models(xcfg, log=log)
    cellvit = Path(xcfg.cells.partition(":")[2]).expanduser() if xcfg.cells.startswith("cellvit:") else None
    extract_slide(store, models, xcfg, job=job, cellvit_dir=cellvit)
    check_store(store, bundle)
    return store
