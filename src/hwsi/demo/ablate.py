"""The paper's ablations on SynthPath, one command each: Table 1 (which scales feed the LLM) and Table 2 (which
terms of L_HCA, Eq. 9, train stage 1).

``hwsi ablate --table 1|2 --out DIR [--seeds 0,1,2] [--preset small|test|demo]``

Shared by every row (built once, resumable): the SynthPath cohort, its stores and extracted features, and the
stage-0 tiny LLM (docs/design.md §5: it stands in for Qwen's pretraining) — a ``Pipeline`` run up to ``extract`` in
``DIR/base`` plus ``run_stage(0)``. Per row and seed, stages 1–3 train from scratch into ``DIR/rows/<row>/seed<S>``
with the row's switches and that seed, then the row is scored on the HELD-OUT slides (val + test pooled):

* closed-ended VQA accuracy (greedy) and the same model's accuracy with visual tokens shuffled across slides,
* linear-probe balanced accuracy of the slide embedding z_WSI (diagnosis; test split, C chosen on val). Every
  Table 1 row keeps the WSI scale, as in the paper.

Tables print mean ± 95 % confidence half-width (Student t over seeds), the closed accuracy by question category
(true / shuffled), and each switch's marginal effect (all row-seeds with it on vs off). Everything is deterministic
by seed. Each run keeps its ``scores.json`` and is claimed with a file lock while it trains, so several processes
(e.g. different ``--rows``) can share OUT; docs/ablations.md has the measured tables.
"""

from __future__ import annotations

import fcntl
import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hwsi.errors import ConfigError
from hwsi.utils.atomic import write_bytes_atomic, write_json_atomic


@dataclass(frozen=True)
class Row:
    """One ablation row: its printed name, its config overrides and the folder its runs train in (``run``; rows
    of both tables with the same configuration share it, so the full model trains once per seed)."""

    name: str
    overrides: dict[str, Any]
    run: str = ""

    @property
    def run_name(self) -> str:
        return self.run or _slug(self.name)


def _scales(cells: bool, patches: bool, regions: bool, slide: bool) -> dict[str, Any]:
    return {"model": {"hierarchy": {"use_cells": cells, "use_patches": patches, "use_regions": regions,
                                    "use_slide": slide}}}


def _losses(ls: bool, lc: bool, lwsi: bool) -> dict[str, Any]:
    return {"stage1": {"loss": {"use_Ls": ls, "use_Lc": lc, "use_Lwsi": lwsi}}}


# Table 1 of the paper (our model's rows, MLLM-HWSI1..7 and the full model): cell / patch / region / WSI features
TABLE1: tuple[Row, ...] = (
    Row("WSI", _scales(False, False, False, True)),
    Row("region+WSI", _scales(False, False, True, True)),
    Row("patch+region+WSI", _scales(False, True, True, True)),
    Row("cell+WSI", _scales(True, False, False, True)),
    Row("patch+WSI", _scales(False, True, False, True)),
    Row("cell+patch+WSI", _scales(True, True, False, True)),
    Row("cell+region+WSI", _scales(True, False, True, True)),
    Row("cell+patch+region+WSI (full)", _scales(True, True, True, True), run="full"),
)
# Table 2 of the paper: L_s (Eq. 6), L_c (Eq. 8), L_WSI (Eq. 7)
TABLE2: tuple[Row, ...] = (
    Row("Ls+Lc+Lwsi (full)", _losses(True, True, True), run="full"),
    Row("Ls+Lc", _losses(True, True, False)),
    Row("Ls", _losses(True, False, False)),
    Row("Lwsi", _losses(False, False, True)),
    Row("Lc+Lwsi", _losses(False, True, True)),
    Row("Ls+Lwsi", _losses(True, False, True)),
)
TABLES = {1: TABLE1, 2: TABLE2}
METRICS = ("closed_acc", "shuffled_acc", "chance", "probe_bal_acc")
# Bumped when score_run adds a metric: a run scored by an older version is re-scored (not retrained) on resume.
SCORES_VERSION = 2


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_").lower()


def mean_ci(values: list[float], confidence: float = 0.95) -> tuple[float, float]:
    """Mean and the half-width of its Student-t confidence interval (0 for a single value)."""
    vals = [v for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return float("nan"), float("nan")
    n = len(vals)
    m = sum(vals) / n
    if n < 2:
        return m, 0.0
    from scipy import stats

    sd = math.sqrt(sum((v - m) ** 2 for v in vals) / (n - 1))
    return m, float(stats.t.ppf(0.5 + confidence / 2, n - 1) * sd / math.sqrt(n))


def score_run(run: Path, cohort: Path, job: Path) -> dict[str, Any]:
    """Held-out scores of one trained run: closed VQA on val + test pooled (and its shuffled baseline), overall and
    by question category (morphology, classification, grade, extent: the scales' own evidence, docs/synthpath.md),
    and the linear probe of z_WSI on test with C chosen on val."""
    from hwsi.eval.tasks import EvalConfig, heldout_closed_vqa, load_eval_data, run_task
    from hwsi.train.inference import load_trained_model

    model = load_trained_model(run)
    cfg = EvalConfig(meteor=False)
    datas = [load_eval_data(cohort, job, split=s) for s in ("val", "test")]
    vqa = heldout_closed_vqa(model, datas, cfg)
    probe = float("nan")
    res = run_task("linear_probe", model, datas[1], cfg)
    if not res.skipped:
        probe = float(res.metrics.get("balanced_accuracy", float("nan")))
    return {"closed_acc": vqa["closed_acc"], "shuffled_acc": vqa["shuffled_acc"], "chance": vqa["chance"],
            "n_closed": vqa["n_closed"], "probe_bal_acc": probe,
            "closed_by_category": vqa["closed_acc_by_category"],
            "shuffled_by_category": vqa["shuffled_acc_by_category"], "version": SCORES_VERSION}


@contextmanager
def _claim(run_dir: Path) -> Iterator[bool]:
    """An exclusive, non-blocking lock on ``run_dir/train.lock``: yields False when another process holds it (that
    process is training this run), so processes sharing OUT never train one run twice. Released on exit, also
    when the process dies."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "train.lock", "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            mine = True
        except BlockingIOError:
            mine = False
        try:
            yield mine
        finally:
            if mine:
                fcntl.flock(fh, fcntl.LOCK_UN)


def _scored(run_dir: Path) -> bool:
    path = run_dir / "scores.json"
    return path.is_file() and json.loads(path.read_text()).get("version", 1) >= SCORES_VERSION


def select_rows(table: int, names: tuple[str, ...] = ()) -> tuple[Row, ...]:
    """The rows of ``table`` named in ``names`` (all rows when empty), in the table's order; an unknown name is a
    ConfigError listing the table's rows."""
    if table not in TABLES:
        raise ConfigError(f"--table must be 1 or 2, got {table}")
    rows = TABLES[table]
    unknown = [n for n in names if n not in {r.name for r in rows}]
    if unknown:
        raise ConfigError(f"--rows: no row {unknown} in Table {table}; its rows are {[r.name for r in rows]}")
    return tuple(r for r in rows if not names or r.name in names)


def run_ablation(table: int, out: str | Path, seeds: tuple[int, ...] = (0, 1, 2), preset: str = "small",
                 rows: tuple[str, ...] = ()) -> Path:
    """Train and score the rows of ``table`` (all, or those named in ``rows``) for every seed; write
    ``OUT/table<N>.json`` and ``.md`` (the table lists every row scored so far in OUT)."""
    from hwsi.demo.pipeline import Pipeline, PipelineConfig
    from hwsi.train.stages import run_stage

    selected = select_rows(table, rows)
    if not seeds:
        raise ConfigError("--seeds needs at least one seed")
    out = Path(out)
    base_cfg = PipelineConfig.preset(preset)
    base = Pipeline(out / "base", base_cfg).run(until="extract")
    shared_runs = base.paths.runs
    run_stage(0, base.train_config(), base.paths.job, shared_runs, resume=True)
    llm = shared_runs / "stage0" / "llm"
    for row in selected:
        for seed in seeds:
            run_dir = out / "rows" / row.run_name / f"seed{seed}"
            if _scored(run_dir):
                continue  # scored before, by this table or by the other (the shared full row)
            with _claim(run_dir) as mine:
                if not mine or _scored(run_dir):
                    print(f"ablate: {run_dir} is being trained by another process; skipped (rerun to collect it)")
                    continue
                over = json.loads(json.dumps(row.overrides))
                over.setdefault("model", {})["llm_path"] = str(llm)
                over["seed"] = seed
                cfg = base.train_config(over)
                for stage in (1, 2, 3):  # a finished stage is not retrained: an old-version score only re-scores
                    run_stage(stage, cfg, base.paths.job, run_dir, resume=True)
                write_json_atomic(run_dir / "scores.json", score_run(run_dir, base.paths.cohort, base.paths.job))
            _collect(out, table, seeds)
    results = _collect(out, table, seeds)
    md = format_table(table, results, seeds)
    write_bytes_atomic(out / f"table{table}.md", md.encode("utf-8"))
    return out / f"table{table}.md"


def _collect(out: Path, table: int, seeds: tuple[int, ...]) -> dict[str, Any]:
    """Every score of ``table`` found in OUT — the runs' own ``scores.json`` (the source of truth, so several
    ``hwsi ablate`` processes with different ``--rows`` can share OUT) over the table's JSON — written back to
    ``OUT/table<N>.json`` atomically."""
    table_json = out / f"table{table}.json"
    results: dict[str, Any] = json.loads(table_json.read_text()) if table_json.is_file() else {}
    for row in TABLES[table]:
        for seed in seeds:
            path = out / "rows" / row.run_name / f"seed{seed}" / "scores.json"
            if path.is_file():
                results[f"{row.name}|{seed}"] = {"row": row.name, "seed": seed, **json.loads(path.read_text())}
    write_json_atomic(table_json, results)
    return results


def format_table(table: int, results: dict[str, Any], seeds: tuple[int, ...]) -> str:
    head = {1: "Table 1 (scales fed to the LLM)", 2: "Table 2 (terms of L_HCA in stage 1)"}[table]
    lines = [f"## SynthPath ablation — {head}", "",
             f"Held-out slides (val + test), seeds {list(seeds)}; mean ± 95% CI (Student t). closed acc: "
             "closed-ended VQA accuracy; shuffled: same model, visual tokens shuffled across slides; chance: mean "
             "1/len(options); probe: linear-probe balanced accuracy of z_WSI (diagnosis).", "",
             "| row | closed acc | shuffled | chance | probe BA | n closed |", "|---|---|---|---|---|---|"]
    by_row = {row.name: [results[f"{row.name}|{s}"] for s in seeds if f"{row.name}|{s}" in results]
              for row in TABLES[table]}
    by_row = {k: v for k, v in by_row.items() if v}
    for name, rs in by_row.items():
        cells = [_cell([r[m] for r in rs]) for m in METRICS]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {rs[0].get('n_closed', '')} |")
    cats = sorted({c for rs in by_row.values() for r in rs for c in r.get("closed_by_category", {})})
    if cats:
        lines += ["", "Closed-VQA accuracy by question category (true visual tokens / shuffled), same runs:", "",
                  "| row | " + " | ".join(cats) + " |", "|---|" + "---|" * len(cats)]
        for name, rs in by_row.items():
            cells = [_cell([r["closed_by_category"].get(c) for r in rs if "closed_by_category" in r]) + " / "
                     + _cell([r["shuffled_by_category"].get(c) for r in rs if "shuffled_by_category" in r])
                     for c in cats]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += marginal_effects(table, results, seeds)
    return "\n".join(lines) + "\n"


def _switches(row: Row) -> dict[str, bool]:
    """The row's on/off switches, e.g. {'use_cells': True, ...} (Table 1) or {'use_Ls': False, ...} (Table 2)."""
    flat: dict[str, bool] = {}

    def walk(d: dict[str, Any]) -> None:
        for k, v in d.items():
            if isinstance(v, dict):
                walk(v)
            elif isinstance(v, bool):
                flat[k] = v
    walk(row.overrides)
    return flat


def marginal_effects(table: int, results: dict[str, Any], seeds: tuple[int, ...]) -> list[str]:
    """Markdown lines: for each switch that varies across the table's rows (a scale in Table 1, a loss term in
    Table 2), the closed-VQA accuracy of all row-seeds with it on vs off, their difference and Welch's t-test p.
    Row-seeds share the cohort, stage 0 and the held-out questions, so p is a guide, not an exact test."""
    from scipy import stats

    keys = sorted({k for r in TABLES[table] for k in _switches(r)})
    out = []
    for key in keys:
        on, off = [], []
        for row in TABLES[table]:
            sw = _switches(row)
            for seed in seeds:
                res = results.get(f"{row.name}|{seed}")
                if res is not None and key in sw:
                    (on if sw[key] else off).append(res["closed_acc"])
        if len(on) < 2 or len(off) < 2:
            continue
        m_on, m_off = sum(on) / len(on), sum(off) / len(off)
        spread = max(on) - min(on) + max(off) - min(off)
        p = f"{float(stats.ttest_ind(on, off, equal_var=False).pvalue):.3f}" if spread > 1e-12 else "–"
        out.append(f"| {key} | {m_on:.3f} (n={len(on)}) | {m_off:.3f} (n={len(off)}) | {m_on - m_off:+.3f} | {p} |")
    if not out:
        return []
    return ["", "Marginal effect of each switch on closed-VQA accuracy (all row-seeds with it on vs off; Welch's t; "
            "runs share the cohort and held-out questions, so p is a guide):", "",
            "| switch | on | off | on − off | p |", "|---|---|---|---|---|", *out]


def _cell(values: list[float | None]) -> str:
    vals = [v for v in values if v is not None]
    if not vals:
        return "–"
    mu, hw = mean_ci(vals)
    return f"{mu:.3f} ± {hw:.3f}"
