"""What a training run was trained with, kept in the run folder, and the checks built on it.

    RUN/bundle/bundle.json   how the job's stores were made: µm/px, region and patch size, tissue thresholds
                             (``hwsi tile``); patch encoder, region-encoder input and SPF text encoder with their
                             checkpoints, SPF k / n_div / min_tissue, vocabulary fingerprint, cells backend, feature
                             widths (``hwsi extract``); see :data:`FIELDS`
    RUN/bundle/vocab.yaml    the SPF vocabulary (the stores' ``spf/terms``)
    RUN/bundle/checkpoints/  copies of the encoders' checkpoint FOLDERS up to :data:`COPY_LIMIT` bytes (hwsi's own
                             encoders); checkpoint files (CONCH, HIPT) and larger folders are referenced by path

Stages 1–3 write it (:func:`record_bundle`, from the job's extracted stores): the stores must agree with each other,
and the job of a later stage with the bundle of the earlier ones. Readers:

* :func:`check_store` — a store made another way than the run's (other encoder or checkpoint, µm/px, region or
  patch size, SPF settings, vocabulary, cells backend) raises :class:`BundleMismatch`, one line naming the store;
  checkpoints are compared by their files' names and sizes (``hwsi extract`` records them);
* :func:`hwsi.train.ask.prepare_slide` — ``hwsi ask SLIDE.svs --run RUN`` tiles and extracts a new slide exactly
  the run's way (:func:`hwsi.train.ask.tile_config`, :func:`hwsi.train.ask.extract_config`).

A field a store does not record (stores written by hand, or imported with ``hwsi import-features``) is not compared;
a run whose stores recorded ``hwsi extract`` settings rejects a store that has none.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from hwsi.errors import ConfigError, HwsiError, StoreError
from hwsi.slide.grid import GridConfig
from hwsi.slide.tissue import TissueConfig
from hwsi.store import SlideStore
from hwsi.utils.atomic import write_json_atomic

log = logging.getLogger(__name__)

BUNDLE_DIR = "bundle"
MANIFEST = "bundle.json"
VOCAB_FILE = "vocab.yaml"
VERSION = 1
COPY_LIMIT = 256 * 2**20  # checkpoint folders up to this size are copied into the run

#: compared settings: (key, what it is, in words)
FIELDS: tuple[tuple[str, str], ...] = (
    ("target_mpp", "target µm/px"),
    ("region_size", "region size (px at the target µm/px)"),
    ("patch_size", "patch size (px at the target µm/px)"),
    ("min_region_tissue", "tile min_region_tissue"),
    ("min_patch_tissue", "tile min_patch_tissue"),
    ("patch_encoder", "patch encoder"),
    ("patch_checkpoint", "patch encoder checkpoint (files and sizes)"),
    ("patch_dim", "patch feature width"),
    ("region_input", "region-encoder input"),
    ("region_checkpoint", "region-input checkpoint (files and sizes)"),
    ("region_dim", "region-input feature width"),
    ("text_encoder", "SPF text encoder"),
    ("text_checkpoint", "SPF text-encoder checkpoint (files and sizes)"),
    ("vocab_fingerprint", "SPF vocabulary (fingerprint)"),
    ("k", "SPF k"),
    ("n_div", "SPF n_div"),
    ("min_tissue", "SPF min_tissue"),
    ("cells", "cells backend"),
)
_LABELS = dict(FIELDS)


class BundleMismatch(HwsiError):
    """A store was made another way than the stores a run was trained on."""


# ------------------------------------------------------------------------------------------------ stores
def checkpoint_files(identity: str) -> list[list[Any]]:
    """``[[file name, size], ...]`` (sorted) of a checkpoint identity recorded by ``hwsi extract``
    (:func:`hwsi.features.extract.checkpoint_identity`: ``path|name:size:mtime|...``); [] = no checkpoint."""
    if not identity:
        return []
    out = []
    for part in identity.split("|")[1:]:
        name, size, _mtime = part.rsplit(":", 2)
        out.append([name, int(size)])
    return sorted(out)


def checkpoint_source(identity: str) -> str:
    """The checkpoint path of a recorded identity ('' = none)."""
    return identity.split("|", 1)[0] if identity else ""


def _json_dict(s: SlideStore, name: str) -> dict[str, Any]:
    v = s.json_attr(name, {})
    return v if isinstance(v, dict) else {}


def read_store_settings(store: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(signature, extra)`` of a store. ``signature``: every :data:`FIELDS` key (None where not recorded);
    ``extra``: what re-creating it needs (checkpoint sources, tile settings, vocabulary terms, stages)."""
    path = Path(store)
    try:
        f = SlideStore(path)
    except StoreError as exc:
        raise BundleMismatch(f"{path}: not a readable store ({exc.reason})") from exc
    with f:
        sig: dict[str, Any] = dict.fromkeys(_LABELS)
        mpp = f.attr("target_mpp")
        sig["target_mpp"] = None if mpp is None else round(float(mpp), 6)
        for k in ("region_size", "patch_size"):
            v = f.attr(k)
            sig[k] = None if v is None else int(v)
        tile = _json_dict(f, "tile")
        for k in ("min_region_tissue", "min_patch_tissue"):
            v = tile.get("grid", {}).get(k)
            sig[k] = None if v is None else round(float(v), 6)
        ex = _json_dict(f, "extract")
        stages = json.loads(f.attr("stages") or "[]")
        extra: dict[str, Any] = {"tile": tile, "stages": stages, "has_extract": bool(ex)}
        if ex:
            for k in ("patch_encoder", "region_input", "text_encoder", "vocab_fingerprint"):
                sig[k] = ex.get(k)
            for k in ("k", "n_div"):
                sig[k] = None if ex.get(k) is None else int(ex[k])
            sig["min_tissue"] = None if ex.get("min_tissue") is None else round(float(ex["min_tissue"]), 6)
            sig["cells"] = None if ex.get("cells") is None else str(ex["cells"]).partition(":")[0]
            for kind in ("patch", "region", "text"):
                ident = ex.get(f"{kind}_checkpoint")
                if ident is not None:
                    sig[f"{kind}_checkpoint"] = checkpoint_files(ident)
                    extra[f"{kind}_source"] = checkpoint_source(ident)
            extra["cells_spec"] = ex.get("cells")
        encoders = _json_dict(f, "encoders")
        for kind, key in (("patch", "patch_encoder"), ("region", "region_input")):
            name = sig[key] or f.attr(key)
            if name and name in encoders:
                sig[f"{kind}_dim"] = int(encoders[name])
        terms = f.spf_terms()
        if terms is not None:
            extra["terms"] = terms
    return sig, extra


def differences(run: dict[str, Any], store: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """``(key, run value, store value)`` of every field both record and that differs (:data:`FIELDS` order)."""
    return [(k, run.get(k), store.get(k)) for k, _ in FIELDS
            if run.get(k) is not None and store.get(k) is not None and run.get(k) != store.get(k)]


def show_value(v: Any) -> str:
    if isinstance(v, list):
        return ", ".join(f"{n} ({s} bytes)" for n, s in v) or "no checkpoint"
    return repr(v)


# ------------------------------------------------------------------------------------------------ bundle
@dataclass
class RunBundle:
    """The content of ``RUN/bundle/bundle.json`` (see the module docstring)."""

    signature: dict[str, Any]
    tile: dict[str, Any] = field(default_factory=dict)  # {"grid": GridConfig, "tissue": TissueConfig, "source": ...}
    checkpoints: dict[str, dict[str, Any]] = field(default_factory=dict)  # patch/region/text -> source, bundled
    cells: str | None = None  # the stores' cells setting (builtin | none | cellvit:DIR)
    vocabulary: str | None = None  # file name in RUN/bundle, None = the stores hold no terms
    recorded_extract: bool = False  # the stores recorded `hwsi extract` settings
    job: str = ""
    n_stores: int = 0
    version: int = VERSION
    run: Path | None = None  # the run folder it was read from (not saved)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("run")
        return d

    @property
    def folder(self) -> Path:
        if self.run is None:
            raise ConfigError("this bundle was not read from a run folder")
        return self.run / BUNDLE_DIR


def bundle_from_stores(stores: list[Path], job: str | Path = "") -> tuple[RunBundle, dict[str, Any]]:
    """The bundle of a job's stores (the extracted ones; every one must agree) and the first store's extras."""
    sig: dict[str, Any] | None = None
    first: Path | None = None
    extra: dict[str, Any] = {}
    n = 0
    for p in stores:
        s, e = read_store_settings(p)
        if "tile" in e["stages"] and "extract" not in e["stages"]:
            continue  # tiled, not extracted: no slide of the run
        if sig is None:
            sig, extra, first = s, e, p
        else:
            diff = differences(sig, s)
            if diff:
                k, a, b = diff[0]
                raise ConfigError(f"{p}: {_LABELS[k]} is {show_value(b)}, but {first} has {show_value(a)}; a run "
                                  "trains on stores made one way (re-extract the job with one setting)")
            for k, v in s.items():  # a field only later stores record
                if sig.get(k) is None and v is not None:
                    sig[k] = v
        n += 1
    if sig is None:
        raise ConfigError(f"{job}: no extracted stores to record the run's settings from (run `hwsi extract`)")
    b = RunBundle(sig, job=str(job), n_stores=n, recorded_extract=bool(extra.get("has_extract")),
                  cells=extra.get("cells_spec"))
    return b, extra


def _tile_settings(job: Path, sig: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """Grid + tissue settings of the stores: the store's own ``tile`` attribute, else ``JOB/tile_config.json``
    when its grid matches the stores, else the defaults with the stores' µm/px and sizes."""
    grid_keys = ("target_mpp", "region_size", "patch_size")
    if extra.get("tile", {}).get("grid"):
        return {**extra["tile"], "source": "store"}
    cfg_file = job / "tile_config.json"
    if cfg_file.is_file():
        with contextlib.suppress(ValueError, KeyError, TypeError):
            saved = json.loads(cfg_file.read_text())
            g = saved["grid"]
            if all(sig[k] is None or round(float(g[k]), 6) == sig[k] for k in grid_keys):
                return {"grid": g, "tissue": saved.get("tissue", asdict(TissueConfig())), "source": str(cfg_file)}
    g = asdict(GridConfig())
    g.update({k: sig[k] for k in grid_keys if sig[k] is not None})
    return {"grid": g, "tissue": asdict(TissueConfig()), "source": "defaults + the stores' µm/px and sizes"}


def _copy_checkpoint(source: str, dest_root: Path, slot: str) -> str:
    """Copy a checkpoint FOLDER (<= COPY_LIMIT) to ``dest_root/slot``; returns its path relative to the bundle
    ('' when referenced by path instead: a file, too big, or gone)."""
    src = Path(source)
    if not src.is_dir():
        return ""
    size = sum(q.stat().st_size for q in src.rglob("*") if q.is_file())
    if size > COPY_LIMIT:
        log.info("checkpoint %s (%d MiB) is referenced by path, not copied into the run", src, size >> 20)
        return ""
    rel = f"checkpoints/{slot}"
    dest = dest_root / rel
    if not dest.is_dir():
        tmp = dest.with_name(f"{dest.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(src, tmp)  # copy2: names, sizes and mtimes kept
        try:
            tmp.replace(dest)
        except OSError:  # another process put it there first
            shutil.rmtree(tmp, ignore_errors=True)
    return rel


def record_bundle(job: str | Path, stores: dict[str, Path], run: str | Path, replace: bool = False) -> RunBundle:
    """Write (or confirm) ``RUN/bundle`` from the job's stores; a job made another way than the run's existing
    bundle is a ConfigError (a later stage trained on other features). ``replace``: drop the existing bundle first
    (stage 1 trained from scratch)."""
    job, run = Path(job), Path(run)
    new, extra = bundle_from_stores([stores[k] for k in sorted(stores)], job)
    if replace:
        shutil.rmtree(run / BUNDLE_DIR, ignore_errors=True)
    old = load_bundle(run)
    if old is not None:
        diff = differences(old.signature, new.signature)
        if diff:
            k, a, b = diff[0]
            raise ConfigError(f"{job}: the stores' {_LABELS[k]} is {show_value(b)}, but {run} was trained (earlier "
                              f"stage) on {show_value(a)} ({run / BUNDLE_DIR / MANIFEST})")
        if old.version == VERSION:
            return old
    folder = run / BUNDLE_DIR
    folder.mkdir(parents=True, exist_ok=True)
    new.tile = _tile_settings(job, new.signature, extra)
    copied: dict[str, str] = {}
    for slot in ("patch", "region", "text"):
        src = extra.get(f"{slot}_source")
        if src is not None:
            if src and src not in copied:
                copied[src] = _copy_checkpoint(src, folder, slot)
            new.checkpoints[slot] = {"source": src, "bundled": copied.get(src, "")}
    if extra.get("terms"):
        write_json_atomic(folder / VOCAB_FILE, {"terms": extra["terms"]})  # JSON is YAML: load_vocabulary reads it
        new.vocabulary = VOCAB_FILE
    write_json_atomic(folder / MANIFEST, new.to_json())
    new.run = run
    return new


def load_bundle(run: str | Path) -> RunBundle | None:
    """The run's bundle, or None for a run trained before hwsi recorded one."""
    path = Path(run) / BUNDLE_DIR / MANIFEST
    if not path.is_file():
        return None
    try:
        d = json.loads(path.read_text())
        d.pop("run", None)
        b = RunBundle(**d)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{path}: not a run bundle ({exc})") from exc
    b.run = Path(run)
    return b


def check_store(store: str | Path, bundle: RunBundle, hint: str = "") -> None:
    """Raise :class:`BundleMismatch` (one line naming ``store``) unless it was made the run's way."""
    sig, extra = read_store_settings(store)
    run = bundle.run or "the run"
    if bundle.recorded_extract and not extra["has_extract"]:
        raise BundleMismatch(f"{store}: records no `hwsi extract` settings, but {run} was trained on extracted "
                             f"stores{hint}")
    diff = differences(bundle.signature, sig)
    if diff:
        k, a, b = diff[0]
        more = f" (and {len(diff) - 1} more setting(s))" if len(diff) > 1 else ""
        raise BundleMismatch(f"{store}: {_LABELS[k]} is {show_value(b)}, but {run} was trained on "
                             f"{show_value(a)}{more}{hint}")


def check_stores(stores: list[Path], run: str | Path, hint: str = "") -> RunBundle | None:
    """:func:`check_store` for each store against the run's bundle; None (nothing checked) without a bundle."""
    bundle = load_bundle(run)
    if bundle is not None:
        for s in stores:
            check_store(s, bundle, hint)
    return bundle
