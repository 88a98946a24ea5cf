"""Shared fixtures. Real files written by others live in ../shared/data (never copied into this repo)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _shared_data() -> Path | None:
    env = os.environ.get("HWSI_SHARED_DATA")
    candidates = [Path(env)] if env else []
    candidates += [REPO.parent / "shared" / "data", REPO.parent.parent / "shared" / "data"]
    for c in candidates:
        if (c / "README.md").is_file():
            return c
    return None


SHARED_DATA = _shared_data()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The folder of real test files; tests using it skip with a clear reason where it is absent."""
    if SHARED_DATA is None:
        pytest.skip("../shared/data (real slides, tiles, text) is not present next to this checkout")
    return SHARED_DATA


# ----------------------------------------------------------------------------------------------------------------
# The test preset of the whole SynthPath pipeline (hwsi.demo.pipeline), built ONCE and cached across sessions.
def pipeline_test_key() -> str:
    """Hash of what decides the cached pipeline: PipelineConfig.test(), the training preset's YAML text and the
    SynthPath generator's sources."""
    import hashlib
    import json
    from dataclasses import asdict

    from hwsi.demo.pipeline import PipelineConfig, preset_path

    cfg = PipelineConfig.test()
    h = hashlib.sha256(json.dumps(asdict(cfg), sort_keys=True, default=str).encode())
    h.update(preset_path(cfg.train_config).read_bytes())
    for src in sorted((REPO / "src" / "hwsi" / "synth").glob("*.py")):  # the cohort's slides, truth and text
        h.update(src.read_bytes())
    return h.hexdigest()[:16]


@pytest.fixture(scope="session")
def test_pipeline():
    """The finished test-preset Pipeline (synth → … → train; eval/report steps are left to the tests).

    Lives in ``REPO/.cache/pipeline-test-<key>`` (``HWSI_PIPELINE_CACHE`` overrides the parent folder); a matching
    folder from an earlier session is reused, an interrupted one resumes (every step is resumable). ~6 min on 2 cores
    the first time.
    """
    from hwsi.demo.pipeline import Pipeline, PipelineConfig

    root = Path(os.environ.get("HWSI_PIPELINE_CACHE", REPO / ".cache"))
    return Pipeline(root / f"pipeline-test-{pipeline_test_key()}", PipelineConfig.test()).run(until="train")
