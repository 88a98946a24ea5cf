"""Where one SynthPath pipeline run keeps each step's output under its folder ``OUT`` (:mod:`hwsi.demo.pipeline`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass
class PipelinePaths:
    out: Path

    @property
    def cohort(self) -> Path:
        return self.out / "cohort"

    @property
    def job(self) -> Path:
        return self.out / "job"

    @property
    def encoder(self) -> Path:
        return self.out / "encoder"

    @property
    def runs(self) -> Path:
        return self.out / "runs"

    @property
    def eval(self) -> Path:
        return self.out / "eval"

    @property
    def report(self) -> Path:
        return self.out / "report.md"

    @property
    def state(self) -> Path:
        return self.out / "pipeline.json"
