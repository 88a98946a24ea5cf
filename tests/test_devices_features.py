"""Features stored in float16 (`hwsi extract --feature-dtype float16`, docs/devices.md): half the store, read back as
float32 by the store reader, the model inputs and training; SPF selects on the float32 features before storing, so
its selections are the float32 run's."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from hwsi.errors import StoreError
from hwsi.features.extract import ExtractConfig, Models, load_models, run_extract
from hwsi.model.inputs import load_slide_inputs
from hwsi.store import SlideStore, store_path, update_store
from test_extract import slide_file, tiled_job  # noqa: F401 - the synthetic slide fixture of tests/test_extract.py

F16_RTOL = 2.0**-11  # float16 keeps 11 significant bits: each stored value within 1/2048 of the float32 one


@pytest.fixture(scope="module")
def models() -> Models:
    return load_models(ExtractConfig(k=4, n_div=8), log=lambda m: None)


@pytest.fixture(scope="module")
def jobs(slide_file: Path, models: Models, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:  # noqa: F811
    """The same slide extracted twice: float32 and float16 features."""
    out = {}
    for dtype in ("float32", "float16"):
        job = tmp_path_factory.mktemp(f"job_{dtype}")
        tiled_job(slide_file, job)
        res = run_extract(job, ExtractConfig(k=4, n_div=8, cells="none", feature_dtype=dtype), show_progress=False,
                          models=models)
        assert res.exit_code == 0
        info = res.outcomes[0].info  # the batch's record of the slide (the summary table's detail)
        assert (info["device"], info["dtype"], info["feature_dtype"]) == ("cpu", "float32", dtype)
        out[dtype] = job
    return out


def test_float16_store_halves_the_features_and_reads_back_as_float32(jobs: dict[str, Path], models: Models) -> None:
    s32, s16 = store_path(jobs["float32"], "s1"), store_path(jobs["float16"], "s1")
    name = models.patch_name
    with h5py.File(s32) as a, h5py.File(s16) as b:
        ds32, ds16 = a[f"patches/{name}"], b[f"patches/{name}"]
        assert ds32.dtype == np.float32 and ds16.dtype == np.float16
        assert ds16.id.get_storage_size() * 2 == ds32.id.get_storage_size()
        np.testing.assert_array_equal(a["spf/selected"][:], b["spf/selected"][:])  # SPF ran on float32 rows
        placement = json.loads(b.attrs["extract_placement"])
    assert placement == {"device": "cpu", "dtype": "float32", "requested": "cpu", "feature_dtype": "float16"}
    with SlideStore(s32) as a, SlideStore(s16) as b:
        assert (a.feature_dtype(name), b.feature_dtype(name)) == ("float32", "float16")
        x32, x16 = a.patch_features(name), b.patch_features(name)
        assert x16.dtype == np.float32 and b.patch_features(name, 1).dtype == np.float32
    np.testing.assert_allclose(x16, x32, rtol=F16_RTOL, atol=1e-7)
    assert not np.array_equal(x16, x32)


def test_model_inputs_of_a_float16_store_are_float32(jobs: dict[str, Path], models: Models) -> None:
    name = models.patch_name
    a = load_slide_inputs(store_path(jobs["float32"], "s1"), name, name, max_regions=8, k=4, max_cells=4)
    b = load_slide_inputs(store_path(jobs["float16"], "s1"), name, name, max_regions=8, k=4, max_cells=4)
    assert b.patch_feats.dtype is torch.float32 and b.region_input.dtype is torch.float32
    torch.testing.assert_close(b.patch_feats, a.patch_feats, rtol=F16_RTOL, atol=1e-7)
    torch.testing.assert_close(b.region_input, a.region_input, rtol=F16_RTOL, atol=1e-7)


def test_the_writer_refuses_other_feature_dtypes(tmp_path: Path, jobs: dict[str, Path]) -> None:
    store = tmp_path / "s1.h5"
    store.write_bytes(store_path(jobs["float32"], "s1").read_bytes())
    with pytest.raises(StoreError, match=r"s1\.h5: patches/x: feature dtype must be float32 or float16, got 'int8'"):
        with update_store(store) as f:
            f.create_features("x", (1, 16, 4), "int8")  # type: ignore[arg-type]


def test_extract_option_is_checked(tmp_path: Path, capsys) -> None:
    from hwsi.cli import main

    assert main(["extract", str(tmp_path), "--feature-dtype", "bfloat16"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--feature-dtype" in err and "must be float32, float16, got 'bfloat16'" in err, err


def _to_float16(job: Path) -> None:
    """Rewrite every store's patch features as float16 through the store's own writer (what --feature-dtype
    float16 writes)."""
    for p in sorted((job / "stores").glob("*.h5")):
        with SlideStore(p) as s:
            feats = {n: s.patch_features(n) for n in ("hwsi_small_patch", "rin")}
        with update_store(p) as f:
            for n, x in feats.items():
                ds = f.create_features(n, x.shape, "float16")
                ds[:] = x


def test_training_reads_float16_stores(tmp_path: Path) -> None:
    """Stage 1, two steps, on the same job stored in float32 and in float16: the same losses to float16's rounding."""
    from test_train import make_job, tiny_config

    from hwsi.train.stages import run_stage

    losses = {}
    for dtype in ("float32", "float16"):
        job = make_job(tmp_path / dtype, n=4)
        if dtype == "float16":
            _to_float16(job)
            with SlideStore(job / "stores" / "s00.h5") as s:
                assert s.feature_dtype("hwsi_small_patch") == "float16"
        res = run_stage(1, tiny_config(stage1=2), job, tmp_path / dtype / "run", progress=False)
        assert res.finished
        losses[dtype] = res.losses
    np.testing.assert_allclose(losses["float16"], losses["float32"], rtol=1e-2)


def test_extract_in_bf16_records_it_and_stays_close(jobs: dict[str, Path], slide_file: Path,  # noqa: F811
                                                     tmp_path: Path) -> None:
    """`hwsi extract --dtype bfloat16` on the CPU: the three encoders run in bf16, the store records it, and the
    stored (float32) features are within the bf16 tolerance of tests/test_devices_bf16.py (cosine >= 0.99)."""
    from test_devices_bf16 import COSINE_MIN, _cosines

    job = tmp_path / "job"
    tiled_job(slide_file, job)
    cfg = ExtractConfig(k=4, n_div=8, cells="none", dtype="bfloat16")
    m = load_models(cfg, log=lambda s: None)
    assert m.patch_encoder.dtype is torch.bfloat16 and m.text_emb.dtype == np.float32
    assert run_extract(job, cfg, show_progress=False, models=m).exit_code == 0
    with SlideStore(store_path(job, "s1")) as b, SlideStore(store_path(jobs["float32"], "s1")) as a:
        assert b.json_attr("extract_placement") == {"device": "cpu", "dtype": "bfloat16", "requested": "cpu",
                                                    "feature_dtype": "float32"}
        tissue = a.patch_tissue()
        x, y = b.patch_features(m.patch_name)[tissue], a.patch_features(m.patch_name)[tissue]
    assert x.dtype == np.float32 and not np.array_equal(x, y)
    assert _cosines(x, y).min() >= COSINE_MIN
