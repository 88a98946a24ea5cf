"""`hwsi eval --model RUN` and `hwsi ask` on the cached trained SynthPath pipeline, nothing mocked: the CLI reads the
run folder, a slide FILE is tiled and extracted the run's way (RUN/bundle) and answered as its own store is, and a
store made another way is refused with one line naming it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

from hwsi.cli import main

SLIDE = "synth_0012"  # a test-split slide of the cached cohort
Q = "What is the diagnosis?"


def ask(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main(["ask", *argv, "-q", Q, "--max-new-tokens", "24", "--top", "1"])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_eval_model_run_reads_the_trained_run(test_pipeline, tmp_path: Path) -> None:
    """The issue's repro: `hwsi eval --task vqa --data COHORT/text/test.jsonl --job JOB --model RUN --out E`."""
    p = test_pipeline.paths
    out = tmp_path / "E"
    rc = main(["eval", "--task", "vqa", "--data", str(p.cohort / "text" / "test.jsonl"), "--job", str(p.job),
               "--model", str(p.runs), "--out", str(out), "--limit", "6", "--max-new-tokens", "12", "--no-meteor"])
    assert rc == 0
    res = json.loads((out / "vqa.json").read_text())
    assert not res["skipped"] and len(res["predictions"]) == 6
    assert all(isinstance(r["prediction"], str) for r in res["predictions"])
    assert "closed" in res["metrics"]["model"] and (out / "summary.md").is_file()


def test_ask_a_slide_file_tiles_and_extracts_it_the_runs_way(test_pipeline, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    p = test_pipeline.paths
    job = tmp_path / "askjob"
    rc, out_file, err = ask(capsys, str(p.cohort / "slides" / f"{SLIDE}.tiff"), "--run", str(p.runs), "--job", str(job))
    assert rc == 0, err
    assert "tiling into" in err and "extracting with the run's encoders" in err
    new, ref = job / "stores" / f"{SLIDE}.h5", p.job / "stores" / f"{SLIDE}.h5"
    with h5py.File(new, "r") as a, h5py.File(ref, "r") as b:  # the same store as the run's own job holds
        for name in ("regions/coords", "patches/coords", "patches/tissue", "spf/selected", "cells/offsets"):
            np.testing.assert_array_equal(a[name][:], b[name][:], err_msg=name)
        np.testing.assert_allclose(a["patches/hwsi_small_patch"][:], b["patches/hwsi_small_patch"][:], atol=1e-5)
        assert a.attrs["target_mpp"] == b.attrs["target_mpp"] and a.attrs["region_size"] == b.attrs["region_size"]
    rc, out_store, _ = ask(capsys, str(ref), "--run", str(p.runs))
    assert rc == 0 and out_file.strip() and out_file == out_store  # same slide, same answer and evidence
    mtime = new.stat().st_mtime_ns
    rc, again, err = ask(capsys, str(p.cohort / "slides" / f"{SLIDE}.tiff"), "--run", str(p.runs), "--job", str(job))
    assert rc == 0 and again == out_file and "made the run's way earlier" in err and new.stat().st_mtime_ns == mtime
    assert json.loads((job / "slides.json").read_text())[SLIDE]["path"].endswith(f"{SLIDE}.tiff")


@pytest.mark.parametrize(("attr", "value", "words"), [
    ("region_size", 2048, "region size (px at the target µm/px) is 2048"),
    ("target_mpp", 0.25, "target µm/px is 0.25"),
])
def test_a_store_made_another_way_is_refused(test_pipeline, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                            attr: str, value: float, words: str) -> None:
    p = test_pipeline.paths
    job = tmp_path / "job"
    (job / "stores").mkdir(parents=True)
    bad = job / "stores" / f"{SLIDE}.h5"
    shutil.copyfile(p.job / "stores" / f"{SLIDE}.h5", bad)
    with h5py.File(bad, "r+") as f:
        f.attrs[attr] = value
    rc, out, err = ask(capsys, str(bad), "--run", str(p.runs))
    assert rc == 2 and not out
    assert err.strip().splitlines() == [err.strip()] and str(bad) in err and words in err
    rc = main(["eval", "--task", "vqa", "--data", str(p.cohort / "text" / "test.jsonl"), "--job", str(job),
               "--model", str(p.runs), "--out", str(tmp_path / "E")])
    err = capsys.readouterr().err
    assert rc == 2 and str(bad) in err and words in err and not (tmp_path / "E" / "vqa.json").exists()


def test_another_encoder_is_refused(test_pipeline, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = test_pipeline.paths
    bad = tmp_path / f"{SLIDE}.h5"
    shutil.copyfile(p.job / "stores" / f"{SLIDE}.h5", bad)
    with h5py.File(bad, "r+") as f:
        ex = json.loads(f.attrs["extract"])
        ex["patch_checkpoint"] = ex["patch_checkpoint"].replace("model.safetensors:", "model.safetensors:9")
        f.attrs["extract"] = json.dumps(ex)
    rc, _, err = ask(capsys, str(bad), "--run", str(p.runs))
    assert rc == 2 and "patch encoder checkpoint (files and sizes)" in err and str(bad) in err
