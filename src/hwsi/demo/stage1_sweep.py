"""Stage 1 alone per ablation row and seed, and the linear probes of its outputs (``hwsi ablate --stage1-probes``).

The development loop of docs/design.md §5: a row's stage 1 (Eq. 6–9 with the row's switches) takes a minute, its
probes seconds, while a whole row (stages 1–3 and scoring) takes ~10. Each probe is the held-out balanced accuracy of
a logistic regression on one scale's stage-1 output, on the fact that scale owns (:func:`hwsi.demo.probes.probe_stage1`).

Without ``stage1_epochs`` the runs are the ablation's own (``OUT/rows/<row>/seed<S>``): those whose stage 1 has
finished are probed, the others are left to ``hwsi ablate`` (listed as not trained). With it, stage 1 is retrained
with that many epochs into ``OUT/stage1-e<N>/<row>/seed<S>`` — a sweep that leaves the table's runs alone.
Probes are cached per run (``probes.json``). docs/ablations.md has the measured sweep (20 / 40 / 60 epochs).
"""

from __future__ import annotations

import json
from pathlib import Path

from hwsi.demo.ablate_tables import TABLES, Row
from hwsi.demo.pipeline import Pipeline, PipelineConfig, deep_merge
from hwsi.demo.probes import ProbeResult, probe_stage1
from hwsi.errors import ConfigError
from hwsi.train.stages import run_stage
from hwsi.utils.atomic import write_bytes_atomic, write_json_atomic


def sweep_dir(out: Path, stage1_epochs: int | None) -> Path:
    """Where the sweep's runs live: the ablation's own rows, or ``OUT/stage1-e<N>``."""
    return out / "rows" if stage1_epochs is None else out / f"stage1-e{stage1_epochs}"


def stage1_probes(out: str | Path, table: int, rows: tuple[Row, ...], seeds: tuple[int, ...], preset: str,
                  stage1_epochs: int | None = None) -> Path:
    """Train (or reuse) stage 1 of every ``rows`` × ``seeds`` and probe it; write and return
    ``OUT/stage1-probes[-e<N>].md`` (one line per row and scale, one column per seed)."""
    if table not in TABLES:
        raise ConfigError(f"--table must be 1 or 2, got {table}")
    if stage1_epochs is not None and stage1_epochs < 1:
        raise ConfigError(f"--stage1-epochs must be >= 1, got {stage1_epochs}")
    out = Path(out)
    base: Pipeline | None = None  # built (resumed) only when a run needs training or probing

    def shared() -> Pipeline:
        nonlocal base
        if base is None:
            base = Pipeline(out / "base", PipelineConfig.preset(preset)).run(until="extract")
            run_stage(0, base.train_config(), base.paths.job, base.paths.runs, resume=True)
        return base

    runs_root = sweep_dir(out, stage1_epochs)
    results: dict[tuple[str, int], list[ProbeResult]] = {}
    for row in rows:
        for seed in seeds:
            run = runs_root / row.run_name / f"seed{seed}"
            cache = run / "probes.json"
            if stage1_epochs is None and not (run / "stage1" / "result.json").is_file():
                print(f"ablate: {run}: stage 1 not trained yet (hwsi ablate trains it); left out")
                continue
            if not cache.is_file():
                b = shared()
                extra: dict = {"seed": seed, "model": {"llm_path": str(b.paths.runs / "stage0" / "llm")}}
                if stage1_epochs is not None:
                    extra["stage1"] = {"epochs": stage1_epochs}
                over = deep_merge(json.loads(json.dumps(row.overrides)), extra)  # a copy: rows are shared
                run_stage(1, b.train_config(over), b.paths.job, run, resume=True)
                write_json_atomic(cache, [r.__dict__ for r in probe_stage1(out / "base", run)])
            results[(row.name, seed)] = [ProbeResult(**r) for r in json.loads(cache.read_text())]
    md = format_stage1_probes(results, rows, seeds, stage1_epochs)
    name = "stage1-probes" + ("" if stage1_epochs is None else f"-e{stage1_epochs}") + ".md"
    write_bytes_atomic(out / name, md.encode("utf-8"))
    return out / name


def format_stage1_probes(results: dict[tuple[str, int], list[ProbeResult]], rows: tuple[Row, ...],
                         seeds: tuple[int, ...], stage1_epochs: int | None) -> str:
    """Markdown: one line per row and scale, one column per seed (trained probe, random init in brackets)."""
    epochs = "the preset's" if stage1_epochs is None else str(stage1_epochs)
    lines = [f"Stage-1 probes (stage 1 alone, {epochs} epochs; held-out balanced accuracy of a logistic regression "
             "on each scale's stage-1 output, on the fact that scale owns; random init in brackets):", "",
             "| row | scale | fact | " + " | ".join(f"seed {s}" for s in seeds) + " |",
             "|---|---|---|" + "---|" * len(seeds)]
    for row in rows:
        done = [s for s in seeds if (row.name, s) in results]
        if not done:
            continue
        for first in results[(row.name, done[0])]:
            cells = []
            for seed in seeds:
                r = next((x for x in results.get((row.name, seed), []) if x.scale == first.scale), None)
                cells.append("–" if r is None else f"{r.trained:.3f} ({r.random_init:.3f})")
            lines.append(f"| {row.name} | {first.scale} | {first.fact} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
