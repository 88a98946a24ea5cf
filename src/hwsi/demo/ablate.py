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
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from hwsi.demo.ablate_tables import (  # noqa: F401 (public API of this module)
    METRICS,
    TABLE1,
    TABLE2,
    TABLES,
    Row,
    format_table,
    marginal_effects,
    mean_ci,
)
from hwsi.demo.pipeline import Pipeline, PipelineConfig
from hwsi.demo.probes import ProbeResult, probe_stage1
from hwsi.demo.roi_scores import score_roi
from hwsi.errors import ConfigError
from hwsi.data import strip_image_token
from hwsi.eval.tasks import EvalConfig, heldout_closed_vqa, load_eval_data, run_task
from hwsi.eval.vqa import vqa_accuracy
from hwsi.model.llm import load_llm
from hwsi.train.data import findings_text
from hwsi.train.inference import load_trained_model
from hwsi.train.stage0 import findings_model
from hwsi.train.stages import run_stage
from hwsi.utils.atomic import write_bytes_atomic, write_json_atomic


# Bumped when score_run adds a metric: a run scored by an older version is re-scored (not retrained) on resume.
# 3: per-question correctness (paired differences) and the stage-0 oracle.
SCORES_VERSION = 4  # 4: + the questions about one region (hwsi.demo.roi_scores)


def score_run(run: Path, cohort: Path, job: Path) -> dict[str, Any]:
    """Held-out scores of one trained run: closed VQA on val + test pooled (and its shuffled baseline), overall and
    by question category (morphology, classification, grade, extent: the scales' own evidence, docs/synthpath.md),
    the linear probe of z_WSI on test with C chosen on val, and the questions about one region of the held-out
    slides whose regions differ (:func:`hwsi.demo.roi_scores.score_roi`)."""
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
            "shuffled_by_category": vqa["shuffled_acc_by_category"], "closed_correct": vqa["closed_correct"],
            **score_roi(model, run, cohort, job), "version": SCORES_VERSION}


def oracle_scores(llm_dir: Path, cohort: Path, job: Path, batch_size: int = 8) -> dict[str, Any]:
    """The ceiling of the LLM side: the stage-0 LM answering the same held-out closed questions with each slide's
    TRUE findings written as words in the ``<image>`` slot (how stage 0 was trained). A category where this is low
    cannot be won by any visual token; overall and by category."""
    facts = json.loads((cohort / "facts.json").read_text())
    llm, tok = load_llm(llm_dir)
    m = findings_model(llm, tok).mllm.eval()
    closed = [it for s in ("val", "test") for it in load_eval_data(cohort, job, split=s).items if it.options]
    preds: list[str] = []
    with torch.no_grad():
        for i in range(0, len(closed), batch_size):
            chunk = closed[i:i + batch_size]
            vis = [m._embed_ids(m._ids(findings_text(facts[it.slide_id]))) for it in chunk]
            convs = [[{"role": "user", "content": strip_image_token(it.question)}] for it in chunk]
            x = m.build_inputs(vis, convs, add_generation_prompt=True, padding_side="left")
            out = m.llm.generate(inputs_embeds=x.inputs_embeds, attention_mask=x.attention_mask, max_new_tokens=24,
                                 do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
            preds += [t.strip() for t in tok.batch_decode(out, skip_special_tokens=True)]
    acc = vqa_accuracy(preds, closed)
    return {"closed_acc": acc["accuracy"], "n_closed": acc["n"],
            "closed_by_category": {k: round(v["accuracy"], 3) for k, v in acc["by_category"].items()},
            "version": SCORES_VERSION}


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


PROTOCOLS = ("paper", "clean")


def run_ablation(table: int, out: str | Path, seeds: tuple[int, ...] = (0, 1, 2), preset: str = "small",
                 rows: tuple[str, ...] = (), protocol: str = "paper") -> Path:
    """Train and score the rows of ``table`` (all, or those named in ``rows``) for every seed; write
    ``OUT/table<N>.json`` and ``.md`` (the table lists every row scored so far in OUT).

    ``protocol`` (Table 1): "paper" (default) switches a scale off in stage 1 AND in the LLM input, as the paper's
    tables imply (its Table 2 "L_WSI only" row equals its Table 1 "WSI only" row); "clean" trains stage 1 once per
    seed with the full hierarchy (the full row's) and removes scales from the LLM input only (stages 2–3), so the
    effect of a scale's tokens is separated from the effect of its Eq. 6/8 terms. Written to ``table1-clean.*``."""
    if protocol not in PROTOCOLS:
        raise ConfigError(f"--protocol must be one of {list(PROTOCOLS)}, got {protocol!r}")
    if protocol == "clean" and table != 1:
        raise ConfigError("--protocol clean applies to Table 1 (scales), not to Table 2 (loss terms)")
    selected = select_rows(table, rows)
    if not seeds:
        raise ConfigError("--seeds needs at least one seed")
    out = Path(out)
    base_cfg = PipelineConfig.preset(preset)
    base = Pipeline(out / "base", base_cfg).run(until="extract")
    shared_runs = base.paths.runs
    run_stage(0, base.train_config(), base.paths.job, shared_runs, resume=True)
    llm = shared_runs / "stage0" / "llm"
    oracle_file = out / "base" / "oracle.json"
    if not (oracle_file.is_file() and json.loads(oracle_file.read_text()).get("version") == SCORES_VERSION):
        write_json_atomic(oracle_file, oracle_scores(llm, base.paths.cohort, base.paths.job))
    clean = protocol == "clean"
    if clean:  # the full row's stage 1 for every seed first: the clean rows start from it
        _train_and_score(out, base, llm, TABLE1[-1], seeds, "")
    for row in selected:
        _train_and_score(out, base, llm, row, seeds, "clean-" if clean and row.run != "full" else "")
        _collect(out, table, seeds, protocol)
    results = _collect(out, table, seeds, protocol)
    name = f"table{table}" + ("-clean" if clean else "")
    md = format_table(table, results, seeds, json.loads(oracle_file.read_text()), protocol)
    md += full_row_probes(out, seeds)
    write_bytes_atomic(out / f"{name}.md", md.encode("utf-8"))
    return out / f"{name}.md"


def _train_and_score(out: Path, base: Any, llm: Path, row: Row, seeds: tuple[int, ...], prefix: str) -> None:
    """Stages 1–3 of one row for each seed (a finished stage is not retrained), then its held-out scores. With a
    ``clean-`` prefix, stage 1 is the full row's of the same seed (copied) and only stages 2–3 train."""
    for seed in seeds:
        run_dir = out / "rows" / (prefix + row.run_name) / f"seed{seed}"
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
            stages = (1, 2, 3)
            if prefix:
                full = out / "rows" / TABLE1[-1].run_name / f"seed{seed}"
                if not (full / "stage1" / "result.json").is_file():
                    raise ConfigError(f"{full}: the full row's stage 1 is missing (train the full row first)")
                if not (run_dir / "stage1" / "result.json").is_file():
                    shutil.copytree(full / "stage1", run_dir / "stage1", dirs_exist_ok=True,
                                    ignore=shutil.ignore_patterns("checkpoints", "*.lock"))
                    shutil.copy2(full / "config.yaml", run_dir / "config.yaml")
                stages = (2, 3)
            for stage in stages:  # a finished stage is not retrained: an old-version score only re-scores
                run_stage(stage, cfg, base.paths.job, run_dir, resume=True)
            write_json_atomic(run_dir / "scores.json", score_run(run_dir, base.paths.cohort, base.paths.job))


def full_row_probes(out: Path, seeds: tuple[int, ...]) -> str:
    """Markdown: linear probes of the full row's stage-1 outputs per scale (:func:`hwsi.demo.probes.probe_stage1`;
    each against the same probe at random init and on the raw input), mean ± CI over the seeds whose stage 1 has
    finished; each seed's probes are kept in its run folder (``probes.json``) and computed once."""
    per_seed: list[list[ProbeResult]] = []
    for seed in seeds:
        run = out / "rows" / TABLE1[-1].run_name / f"seed{seed}"
        cache = run / "probes.json"
        if cache.is_file():
            per_seed.append([ProbeResult(**r) for r in json.loads(cache.read_text())])
        elif (run / "stage1" / "result.json").is_file():
            res = probe_stage1(out / "base", run)
            write_json_atomic(cache, [r.__dict__ for r in res])
            per_seed.append(res)
    if not per_seed:
        return ""
    lines = ["", f"Stage-1 probes of the full row (seeds {len(per_seed)}; held-out balanced accuracy of a logistic "
             "regression on each scale's stage-1 output z, on the fact that scale owns, beside the same probe at "
             "random init and on the raw input; mean ± 95 % CI over seeds):", "",
             "| scale | fact | stage-1 z | random init | raw input | n train / held-out |", "|---|---|---|---|---|---|"]
    for first in per_seed[0]:
        col = [r for rs in per_seed for r in rs if r.scale == first.scale]
        vals = {k: mean_ci([getattr(r, k) for r in col]) for k in ("trained", "random_init", "raw")}
        cell = {k: f"{m:.3f} ± {h:.3f}" for k, (m, h) in vals.items()}
        lines.append(f"| {first.scale} | {first.fact} | {cell['trained']} | {cell['random_init']} | {cell['raw']} | "
                     f"{first.n_train} / {first.n_test} |")
    return "\n".join(lines) + "\n"


def _collect(out: Path, table: int, seeds: tuple[int, ...], protocol: str = "paper") -> dict[str, Any]:
    """Every score of ``table`` (and ``protocol``) found in OUT — the runs' own ``scores.json`` (the source of truth,
    so several ``hwsi ablate`` processes with different ``--rows`` can share OUT) over the table's JSON — written
    back to ``OUT/table<N>[-clean].json`` atomically."""
    clean = protocol == "clean"
    table_json = out / (f"table{table}" + ("-clean" if clean else "") + ".json")
    results: dict[str, Any] = json.loads(table_json.read_text()) if table_json.is_file() else {}
    for row in TABLES[table]:
        folder = ("clean-" if clean and row.run != "full" else "") + row.run_name
        for seed in seeds:
            path = out / "rows" / folder / f"seed{seed}" / "scores.json"
            if path.is_file():
                results[f"{row.name}|{seed}"] = {"row": row.name, "seed": seed, **json.loads(path.read_text())}
    write_json_atomic(table_json, results)
    return results
