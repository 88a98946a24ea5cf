"""hwsi demo pipeline bookkeeping (the heavy run itself is `make demo` and the slow learning test)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from hwsi.demo.pipeline import Pipeline, PipelineConfig
from hwsi.errors import HwsiError


def test_relative_out_gives_absolute_training_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    p = Pipeline("demo_rel", PipelineConfig.test())
    assert p.paths.out.is_absolute()
    cfg = p.train_config()
    for path in (cfg.data.records, cfg.data.facts, cfg.data.reports, cfg.data.captions):
        assert os.path.isabs(path), path  # relative paths would be read from the job folder


def test_changed_config_refuses_the_folder(tmp_path: Path) -> None:
    p = Pipeline(tmp_path / "run", PipelineConfig.test())
    p._mark("synth", 1.0)
    with pytest.raises(HwsiError, match="another pipeline configuration"):
        Pipeline(tmp_path / "run", PipelineConfig.demo())
    assert Pipeline(tmp_path / "run", PipelineConfig.test())._done("synth")
