"""hwsi.train.bundle / hwsi.train.ask on small stores written by hwsi.store's writer (the attributes `hwsi tile`
and `hwsi extract` record): what a run records, and that a store made another way is refused with one line naming it."""

from __future__ import annotations

import json
import os
from pathlib import Path

import h5py
import numpy as np
import pytest

from hwsi.errors import ConfigError
from hwsi.store import StoreMeta, new_store
from hwsi.train.ask import extract_config, tile_config
from hwsi.train.bundle import (
    BundleMismatch,
    check_store,
    checkpoint_files,
    load_bundle,
    read_store_settings,
    record_bundle,
)

TERMS = ["gland formation", "stroma", "necrosis"]


def identity(path: Path) -> str:
    from hwsi.features.extract import checkpoint_identity

    return checkpoint_identity(path)


def write_store(path: Path, encoder_dir: Path, *, mpp: float = 0.5, region: int = 1024, patch: int = 64,
                k: int = 16, vocab: str = "abc123", extract: bool = True, min_patch_tissue: float = 0.25) -> Path:
    """A store's attributes as `hwsi tile` (+ `hwsi extract`) record them (no grid: only the settings matter)."""
    meta = StoreMeta(slide_path=f"/slides/{path.stem}.svs", slide_id=path.stem, mpp_level0=mpp, target_mpp=mpp,
                     effective_mpp=mpp, region_size=region, patch_size=patch, region_size_level0=float(region),
                     patch_size_level0=float(patch), level0_width=4 * region, level0_height=4 * region,
                     stages=["tile"])
    with new_store(path, meta) as w:
        w.set_json_attr("tile", {"grid": {"target_mpp": mpp, "region_size": region, "patch_size": patch,
                                          "min_region_tissue": 0.05, "min_patch_tissue": min_patch_tissue,
                                          "mpp_tolerance": 0.02},
                                 "tissue": {"mask_mpp": 16.0}})
        if extract:
            ident = identity(encoder_dir)
            w.set_json_attr("extract", {
                "patch_encoder": "hwsi_small_patch", "patch_checkpoint": ident, "region_input": "hwsi_small_patch",
                "region_checkpoint": ident, "text_encoder": "minilm", "text_checkpoint": "",
                "vocab_fingerprint": vocab, "k": k, "n_div": 32, "min_tissue": 0.5, "cells": "builtin"})
            w.set_encoder("hwsi_small_patch", 384)
            w.set_attr("patch_encoder", "hwsi_small_patch")
            w.set_attr("region_input", "hwsi_small_patch")
            w.write_spf(np.zeros((0, k), np.int32), np.zeros((0, 1), np.float32), terms=TERMS)
            for stage in ("features", "spf", "cells", "extract"):
                w.mark_stage(stage)
    return path


@pytest.fixture()
def encoder_dir(tmp_path: Path) -> Path:
    d = tmp_path / "encoder"
    d.mkdir()
    (d / "encoder.json").write_text('{"name": "hwsi_small_patch"}')
    (d / "model.safetensors").write_bytes(b"\0" * 100)
    return d


@pytest.fixture()
def job(tmp_path: Path, encoder_dir: Path) -> Path:
    job = tmp_path / "job"
    for i in range(3):
        write_store(job / "stores" / f"s{i}.h5", encoder_dir)
    write_store(job / "stores" / "tiled_only.h5", encoder_dir, extract=False)  # not a slide of the run
    return job


def stores_of(job: Path) -> dict[str, Path]:
    return {p.stem: p for p in sorted((job / "stores").glob("*.h5"))}


def test_checkpoint_files_drop_path_and_mtime(encoder_dir: Path) -> None:
    ident = identity(encoder_dir)
    assert ident.startswith(str(encoder_dir.resolve()) + "|")
    assert checkpoint_files(ident) == [["encoder.json", 28], ["model.safetensors", 100]]
    assert checkpoint_files("") == []


def test_record_bundle_keeps_settings_vocabulary_and_a_copy_of_the_encoder(job: Path, tmp_path: Path,
                                                                           encoder_dir: Path) -> None:
    run = tmp_path / "run"
    b = record_bundle(job, stores_of(job), run)
    assert b.n_stores == 3 and b.recorded_extract  # the tiled-only store is not one of the run's
    s = b.signature
    assert (s["target_mpp"], s["region_size"], s["patch_size"], s["k"], s["patch_dim"]) == (0.5, 1024, 64, 16, 384)
    assert s["min_patch_tissue"] == 0.25 and s["cells"] == "builtin"
    saved = load_bundle(run)
    assert saved is not None and saved.signature == s and saved.tile["source"] == "store"
    copy = run / "bundle" / saved.checkpoints["patch"]["bundled"]
    assert (copy / "model.safetensors").read_bytes() == (encoder_dir / "model.safetensors").read_bytes()
    assert saved.checkpoints["region"]["bundled"] == saved.checkpoints["patch"]["bundled"]  # "same": one copy
    # what `hwsi ask SLIDE.svs` tiles and extracts with: the bundle's copy, vocabulary and SPF settings
    xc = extract_config(saved)
    assert xc.patch_encoder == f"hwsi_small_patch:{copy}" and xc.region_input == "same"
    assert (xc.k, xc.n_div, xc.min_tissue, xc.cells, xc.text_encoder) == (16, 32, 0.5, "builtin", "minilm")
    from hwsi.features.vocab import load_vocabulary

    assert list(load_vocabulary(xc.vocab)) == TERMS
    tc = tile_config(saved)
    assert (tc.grid.region_size, tc.grid.patch_size, tc.grid.target_mpp, tc.grid.min_patch_tissue) == (
        1024, 64, 0.5, 0.25)
    # the encoder moved away after training: the run still has its copy
    os.rename(encoder_dir, tmp_path / "moved")
    assert extract_config(load_bundle(run)).patch_encoder == xc.patch_encoder


@pytest.mark.parametrize(("change", "words"), [
    ({"mpp": 0.25}, "target µm/px is 0.25, but"),
    ({"region": 2048}, "region size (px at the target µm/px) is 2048"),
    ({"k": 8}, "SPF k is 8"),
    ({"vocab": "other"}, "SPF vocabulary (fingerprint) is 'other'"),
    ({"min_patch_tissue": 0.5}, "tile min_patch_tissue is 0.5"),
    ({"extract": False}, "records no `hwsi extract` settings"),
])
def test_a_store_made_another_way_is_refused_naming_it(job: Path, tmp_path: Path, encoder_dir: Path,
                                                       change: dict, words: str) -> None:
    b = record_bundle(job, stores_of(job), tmp_path / "run")
    check_store(job / "stores" / "s0.h5", b)  # the run's own store passes
    other = write_store(tmp_path / "other" / "x.h5", encoder_dir, **change)
    with pytest.raises(BundleMismatch) as e:
        check_store(other, b)
    msg = str(e.value)
    assert msg.startswith(f"{other}: ") and words in msg and "\n" not in msg


def test_another_encoder_checkpoint_is_refused(job: Path, tmp_path: Path) -> None:
    b = record_bundle(job, stores_of(job), tmp_path / "run")
    other_enc = tmp_path / "other_encoder"
    other_enc.mkdir()
    (other_enc / "encoder.json").write_text('{"name": "hwsi_small_patch"}')
    (other_enc / "model.safetensors").write_bytes(b"\0" * 300)  # another model: other size
    other = write_store(tmp_path / "other" / "x.h5", other_enc)
    with pytest.raises(BundleMismatch, match=r"patch encoder checkpoint \(files and sizes\) is .*300 bytes"):
        check_store(other, b)


def test_stores_of_one_job_must_agree(job: Path, encoder_dir: Path, tmp_path: Path) -> None:
    odd = write_store(job / "stores" / "s9.h5", encoder_dir, mpp=0.25)
    with pytest.raises(ConfigError, match=f"^{odd}: target µm/px is 0.25, but .*s0.h5 has 0.5"):
        record_bundle(job, stores_of(job), tmp_path / "run")


def test_a_later_stage_on_another_job_is_refused(job: Path, encoder_dir: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    record_bundle(job, stores_of(job), run)
    job2 = tmp_path / "job2"
    write_store(job2 / "stores" / "t0.h5", encoder_dir, region=2048)
    with pytest.raises(ConfigError, match="region size .* is 2048, but .*run was trained .*earlier stage.* on 1024"):
        record_bundle(job2, stores_of(job2), run)
    assert record_bundle(job2, stores_of(job2), run, replace=True).signature["region_size"] == 2048  # new stage 1


def test_referenced_checkpoint_file_is_checked_at_ask_time(tmp_path: Path) -> None:
    ckpt = tmp_path / "w" / "pytorch_model.bin"  # a checkpoint FILE (CONCH, HIPT): referenced, not copied
    ckpt.parent.mkdir()
    ckpt.write_bytes(b"\1" * 64)
    job = tmp_path / "job"
    write_store(job / "stores" / "a.h5", ckpt)
    run = tmp_path / "run"
    b = record_bundle(job, stores_of(job), run)
    assert b.checkpoints["patch"] == {"source": str(ckpt.resolve()), "bundled": ""}
    assert extract_config(load_bundle(run)).patch_encoder == f"hwsi_small_patch:{ckpt.resolve()}"
    ckpt.write_bytes(b"\1" * 65)
    with pytest.raises(ConfigError, match="differ from those the run was trained with"):
        extract_config(load_bundle(run))
    ckpt.unlink()
    with pytest.raises(ConfigError, match="is not there"):
        extract_config(load_bundle(run))


def test_store_settings_not_recorded_are_unknown_not_wrong(tmp_path: Path) -> None:
    p = tmp_path / "bare.h5"
    meta = StoreMeta("/slides/bare.svs", "bare", 0.5, 0.5, 0.5, 1024, 64, 1024.0, 64.0, 4096, 4096)
    with new_store(p, meta):  # the file attributes only: no tile or extract settings
        pass
    sig, extra = read_store_settings(p)
    assert (sig["target_mpp"], sig["region_size"], sig["patch_size"]) == (0.5, 1024, 64)
    assert all(v is None for k, v in sig.items() if k not in ("target_mpp", "region_size", "patch_size"))
    assert not extra["has_extract"] and extra["stages"] == []


def test_store_without_its_attributes_is_not_readable(tmp_path: Path) -> None:
    p = tmp_path / "hand.h5"
    with h5py.File(p, "w") as f:  # written by hand, not by hwsi.store: no slide_path, sizes, ...
        f.attrs["schema_version"] = 1
    with pytest.raises(BundleMismatch, match=r"hand\.h5: not a readable store \(missing attribute 'slide_path'\)"):
        read_store_settings(p)


def test_resuming_a_finished_stage_records_the_bundle_of_an_older_run(job: Path, tmp_path: Path) -> None:
    """A run trained before bundles existed gets one from `hwsi train --stage 3 --resume` (nothing retrained)."""
    from hwsi.train.config import TrainConfig
    from hwsi.train.stages import run_stage

    run = tmp_path / "old_run"
    (run / "stage3").mkdir(parents=True)
    (run / "stage3" / "result.json").write_text(json.dumps({"metrics": {"steps": 7}, "output": str(run)}))
    res = run_stage(3, TrainConfig(), job, run, resume=True, progress=False)
    assert res.finished and res.metrics == {"steps": 7}
    b = load_bundle(run)
    assert b is not None and b.n_stores == 3 and b.signature["region_size"] == 1024


def test_ask_never_overwrites_another_slides_store_in_a_named_job(job: Path, tmp_path: Path,
                                                                   encoder_dir: Path) -> None:
    from hwsi.train.ask import prepare_slide, require_bundle

    run = tmp_path / "run"
    with pytest.raises(ConfigError, match="no bundle/bundle.json .*--resume"):
        require_bundle(run)
    record_bundle(job, stores_of(job), run)
    slide = tmp_path / "new" / "s0.svs"
    slide.parent.mkdir()
    slide.write_bytes(b"not read: the store of another s0 is in the way")
    before = (job / "stores" / "s0.h5").read_bytes()
    with pytest.raises(ConfigError, match=r"s0.h5: exists and was not made from .*s0.svs the run's way"):
        prepare_slide(slide, run, job=job)
    assert (job / "stores" / "s0.h5").read_bytes() == before
