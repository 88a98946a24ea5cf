"""hwsi ablate: the rows match the paper's tables, statistics are right, tables render every row."""

from __future__ import annotations

import math

import pytest

from hwsi.config import from_dict
from hwsi.demo.ablate import METRICS, TABLE1, TABLE2, format_table, mean_ci
from hwsi.demo.pipeline import deep_merge


def test_table1_rows_are_the_papers_scale_subsets() -> None:
    subsets = set()
    for row in TABLE1:
        h = row.overrides["model"]["hierarchy"]
        subsets.add((h["use_cells"], h["use_patches"], h["use_regions"], h["use_slide"]))
    # MLLM-HWSI1..7 and the full model (Table 1): every row keeps WSI features
    assert subsets == {
        (False, False, False, True), (False, False, True, True), (False, True, True, True), (True, False, False, True),
        (False, True, False, True), (True, True, False, True), (True, False, True, True), (True, True, True, True),
    }


def test_table2_rows_are_the_papers_loss_subsets() -> None:
    combos = {tuple(r.overrides["stage1"]["loss"][k] for k in ("use_Ls", "use_Lc", "use_Lwsi")) for r in TABLE2}
    assert combos == {(True, True, True), (True, True, False), (True, False, False), (False, False, True),
                      (False, True, True), (True, False, True)}


def test_overrides_are_valid_train_config_fields() -> None:
    from dataclasses import asdict

    from hwsi.train.config import TrainConfig

    for row in TABLE1 + TABLE2:
        cfg = from_dict(TrainConfig, deep_merge(asdict(TrainConfig()), row.overrides))
        cfg.validate()


def test_mean_ci_matches_student_t_by_hand() -> None:
    m, hw = mean_ci([0.5, 0.6, 0.7])
    assert m == pytest.approx(0.6)
    # sd = 0.1, n = 3, t(0.975, 2) = 4.302652729911275
    assert hw == pytest.approx(4.302652729911275 * 0.1 / math.sqrt(3))
    assert mean_ci([0.4]) == (0.4, 0.0)
    assert all(math.isnan(x) for x in mean_ci([]))


def test_format_table_lists_each_row_with_mean_and_ci() -> None:
    results = {}
    for i, row in enumerate(TABLE2):
        for s in (0, 1):
            results[f"{row.name}|{s}"] = {m: 0.1 * i + 0.01 * s for m in METRICS} | {"n_closed": 40}
    md = format_table(2, results, (0, 1))
    for row in TABLE2:
        assert f"| {row.name} |" in md
    assert "0.105 ± " in md  # row 1: mean of 0.10 and 0.11


@pytest.mark.parametrize("preset", ["small", "test", "demo"])
def test_rows_sharing_a_run_folder_train_the_same_config(preset: str) -> None:
    """The two tables' full rows train once per seed in rows/full: that is only right if their configs agree."""
    from dataclasses import asdict

    from hwsi.demo.pipeline import PipelineConfig, preset_path
    from hwsi.train.config import TrainConfig, load_train_config

    base = asdict(load_train_config(preset_path(PipelineConfig.preset(preset).train_config)))
    by_run: dict[str, list[TrainConfig]] = {}
    for row in TABLE1 + TABLE2:
        by_run.setdefault(row.run_name, []).append(from_dict(TrainConfig, deep_merge(base, row.overrides)))
    shared = {k: v for k, v in by_run.items() if len(v) > 1}
    assert set(shared) == {"full"}
    assert all(cfg == shared["full"][0] for cfg in shared["full"])


def test_select_rows_keeps_table_order_and_names_unknown_rows() -> None:
    from hwsi.demo.ablate import select_rows
    from hwsi.errors import ConfigError

    assert select_rows(1) == TABLE1
    picked = select_rows(1, ("cell+patch+region+WSI (full)", "WSI"))
    assert [r.name for r in picked] == ["WSI", "cell+patch+region+WSI (full)"]
    with pytest.raises(ConfigError, match="no row \\['Ls'\\] in Table 1"):
        select_rows(1, ("Ls",))
    with pytest.raises(ConfigError, match="--table must be 1 or 2"):
        select_rows(3)


def test_cli_ablate_rejects_an_unknown_row_before_any_work(tmp_path, capsys: pytest.CaptureFixture) -> None:
    from hwsi.cli import main

    assert main(["ablate", "--table", "2", "--out", str(tmp_path / "a"), "--rows", "Ls;Lx"]) == 2
    assert "no row ['Lx'] in Table 2" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()


def test_collect_merges_run_scores_into_each_table(tmp_path) -> None:
    """Per-run scores.json are the source of truth: the shared full row lands in both tables, a score only in the
    table JSON (an older run) is kept, and processes scoring different rows of one table cannot drop each other's."""
    import json

    from hwsi.demo.ablate import _collect

    def scores(acc: float) -> dict[str, float]:
        return {"closed_acc": acc, "shuffled_acc": 0.4, "chance": 0.38, "n_closed": 81, "probe_bal_acc": 0.5}

    for run, seed, acc in [("full", 0, 0.6), ("wsi", 0, 0.55), ("ls", 1, 0.5)]:
        d = tmp_path / "rows" / run / f"seed{seed}"
        d.mkdir(parents=True)
        (d / "scores.json").write_text(json.dumps(scores(acc)))
    (tmp_path / "table1.json").write_text(json.dumps({"region+WSI|0": {"row": "region+WSI", "seed": 0, **scores(0.7)}}))
    t1 = _collect(tmp_path, 1, (0, 1))
    assert set(t1) == {"region+WSI|0", "WSI|0", "cell+patch+region+WSI (full)|0"}
    assert t1["WSI|0"]["closed_acc"] == 0.55 and t1["cell+patch+region+WSI (full)|0"]["closed_acc"] == 0.6
    t2 = _collect(tmp_path, 2, (0, 1))
    assert set(t2) == {"Ls+Lc+Lwsi (full)|0", "Ls|1"}
    assert json.loads((tmp_path / "table2.json").read_text()) == t2


def test_format_table_adds_the_by_category_table_when_runs_have_it(tmp_path) -> None:
    import json

    from hwsi.demo.ablate import SCORES_VERSION, _scored

    results = {}
    for i, row in enumerate(TABLE1[:2]):
        for s in (0, 1, 2):
            results[f"{row.name}|{s}"] = {m: 0.5 for m in METRICS} | {
                "n_closed": 81, "closed_by_category": {"Extent": 0.4 + 0.1 * i, "Grade": 0.6},
                "shuffled_by_category": {"Extent": 0.3, "Grade": 0.5}}
    md = format_table(1, results, (0, 1, 2))
    assert "| row | Extent | Grade |" in md
    assert "| region+WSI | 0.500 ± 0.000 / 0.300 ± 0.000 | 0.600 ± 0.000 / 0.500 ± 0.000 |" in md
    # an old-format score (no version) is re-scored on resume; a current one is kept
    (tmp_path / "scores.json").write_text(json.dumps({"closed_acc": 0.5}))
    assert not _scored(tmp_path)
    (tmp_path / "scores.json").write_text(json.dumps({"closed_acc": 0.5, "version": SCORES_VERSION}))
    assert _scored(tmp_path)
    assert not _scored(tmp_path / "missing")


def test_claim_lets_one_process_train_a_run(tmp_path) -> None:
    """Two processes sharing OUT: the second sees the run claimed and skips it; once released it can be claimed."""
    import subprocess
    import sys
    import textwrap

    from hwsi.demo.ablate import _claim

    run = tmp_path / "rows" / "full" / "seed0"
    probe = textwrap.dedent(f"""
        from pathlib import Path
        from hwsi.demo.ablate import _claim
        with _claim(Path({str(run)!r})) as mine:
            print(mine)
    """)
    with _claim(run) as mine:
        assert mine
        other = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
        assert other.stdout.strip() == "False"
    other = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert other.stdout.strip() == "True"


def test_marginal_effects_compare_row_seeds_with_a_switch_on_and_off() -> None:
    from scipy import stats

    from hwsi.demo.ablate import marginal_effects

    results = {}
    for row in TABLE1:
        cells_on = row.overrides["model"]["hierarchy"]["use_cells"]
        for s in (0, 1, 2):
            results[f"{row.name}|{s}"] = {"closed_acc": (0.7 if cells_on else 0.5) + 0.01 * s}
    lines = marginal_effects(1, results, (0, 1, 2))
    on = [0.7, 0.71, 0.72] * 4
    off = [0.5, 0.51, 0.52] * 4
    p = stats.ttest_ind(on, off, equal_var=False).pvalue
    # no per-question correctness in these results: the paired columns are empty, the unpaired ones filled
    assert f"| use_cells | – | – | – | – | 0.710 (n=12) | 0.510 (n=12) | +0.200 | {p:.3f} |" in lines
    assert "| use_patches | – | – | – | – | 0.610 (n=12) | 0.610 (n=12) | +0.000 |" in "\n".join(lines)
    assert not any("use_slide" in line for line in lines)  # on in every Table 1 row: nothing to compare
    assert marginal_effects(1, {}, (0,)) == []


def test_matched_pairs_differ_in_one_switch_only() -> None:
    from hwsi.demo.ablate_tables import TABLE2, _switches, matched_pairs

    pairs = matched_pairs(1, "use_cells")
    # every Table 1 row with cells has its twin without cells: 4 pairs (WSI, +patch, +region, +patch+region)
    assert len(pairs) == 4
    for on, off in pairs:
        a, b = _switches(on), _switches(off)
        assert a["use_cells"] and not b["use_cells"] and {**a, "use_cells": False} == b
    # Table 2 has no "Lc only" row and no empty-loss row: L_c has three pairs, L_s and L_WSI two each
    assert [len(matched_pairs(2, k)) for k in ("use_Lc", "use_Ls", "use_Lwsi")] == [3, 2, 2]
    assert all(r in TABLE2 for pair in matched_pairs(2, "use_Lwsi") for r in pair)


def test_paired_marginal_uses_same_questions_and_seeds() -> None:
    from hwsi.demo.ablate_tables import paired_marginal

    qs = [f"q{i}" for i in range(200)]
    results = {}
    for row in TABLE1:
        sw = row.overrides["model"]["hierarchy"]
        for s in (0, 1):
            # cells fix questions 0-59, patches change nothing; same answers otherwise
            results[f"{row.name}|{s}"] = {"closed_correct": {
                q: int(i % 2 == 0 or (sw["use_cells"] and i < 60)) for i, q in enumerate(qs)}}
    m, lo, hi, n_pairs, n_q = paired_marginal(1, results, (0, 1), "use_cells")
    assert n_pairs == 8 and n_q == 200 and abs(m - 30 / 200) < 1e-12 and lo > 0.08 and hi < 0.22
    m, lo, hi, _, _ = paired_marginal(1, results, (0, 1), "use_patches")
    assert (m, lo, hi) == (0.0, 0.0, 0.0)
    assert paired_marginal(1, {}, (0,), "use_cells") is None


def test_paired_difference_pairs_questions_and_seeds() -> None:
    from hwsi.demo.ablate_tables import paired_difference

    a = [{"q1": 1, "q2": 1, "q3": 0, "q4": 1}, {"q1": 1, "q2": 0, "q3": 1, "q4": 1}]
    b = [{"q1": 0, "q2": 1, "q3": 0, "q4": 1}, {"q1": 0, "q2": 0, "q3": 0, "q4": 1, "extra": 1}]
    m, lo, hi, n = paired_difference(a, b)
    # per question (mean over seeds): q1 +1, q2 0, q3 +0.5, q4 0 -> mean 0.375; "extra" is not shared
    assert n == 4 and abs(m - 0.375) < 1e-12 and lo <= m <= hi and lo >= 0.0
    same = paired_difference(a, a)
    assert same[:3] == (0.0, 0.0, 0.0)


def test_oracle_answers_from_true_findings(test_pipeline) -> None:
    """The stage-0 LM given each held-out slide's true findings: the LLM side's ceiling per category."""
    from hwsi.demo.ablate import oracle_scores

    p = test_pipeline
    res = oracle_scores(p.paths.runs / "stage0" / "llm", p.paths.cohort, p.paths.job)
    print("oracle:", res)
    assert res["n_closed"] >= 500 and res["closed_acc"] >= 0.8, res


def test_full_row_probes_average_the_seeds_cached_probes(tmp_path) -> None:
    import json

    from hwsi.demo.ablate import full_row_probes

    assert full_row_probes(tmp_path, (0, 1)) == ""
    for seed, trained in ((0, 0.9), (1, 1.0)):
        run = tmp_path / "rows" / "full" / f"seed{seed}"
        run.mkdir(parents=True)
        (run / "probes.json").write_text(json.dumps([
            {"scale": "regions", "fact": "crowded vs regular", "trained": trained, "random_init": 0.6, "raw": 0.5,
             "n_train": 10, "n_test": 20}]))
    md = full_row_probes(tmp_path, (0, 1, 2))  # seed 2 has no run: left out
    assert "seeds 2;" in md
    assert "| regions | crowded vs regular | 0.950 ± 0.635 | 0.600 ± 0.000 | 0.500 ± 0.000 | 10 / 20 |" in md


def test_cli_stage1_epochs_needs_stage1_probes(tmp_path, capsys: pytest.CaptureFixture) -> None:
    from hwsi.cli import main

    assert main(["ablate", "--table", "1", "--out", str(tmp_path / "a"), "--stage1-epochs", "60"]) == 2
    assert "--stage1-epochs applies only with --stage1-probes" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()


def test_stage1_probes_table_from_the_rows_probed_runs(tmp_path, capsys: pytest.CaptureFixture) -> None:
    """Finished stage-1 runs with cached probes are tabulated without building anything; an untrained run is left
    out with a message and shows as '–'."""
    import json

    from hwsi.demo.ablate import select_rows
    from hwsi.demo.stage1_sweep import stage1_probes

    rows = select_rows(1, ("WSI", "cell+WSI"))
    for run_name, seed, slide in (("wsi", 0, 0.643), ("wsi", 1, 1.0), ("cell_wsi", 0, 1.0)):
        run = tmp_path / "rows" / run_name / f"seed{seed}"
        (run / "stage1").mkdir(parents=True)
        (run / "stage1" / "result.json").write_text("{}")
        probes = [{"scale": "slide", "fact": "extent", "trained": slide, "random_init": 0.55, "raw": 0.5,
                   "n_train": 34, "n_test": 62}]
        if run_name == "cell_wsi":
            probes.insert(0, {"scale": "cells", "fact": "atypia", "trained": 0.99, "random_init": 0.998, "raw": 1.0,
                              "n_train": 1791, "n_test": 3327})
        (run / "probes.json").write_text(json.dumps(probes))
    md = stage1_probes(tmp_path, 1, rows, (0, 1), "test").read_text()
    assert not (tmp_path / "base").exists()  # nothing needed training or probing
    assert "stage 1 not trained yet" in capsys.readouterr().out
    assert "| WSI | slide | extent | 0.643 (0.550) | 1.000 (0.550) |" in md
    assert "| cell+WSI | cells | atypia | 0.990 (0.998) | – |" in md
    assert "| cell+WSI | slide | extent | 1.000 (0.550) | – |" in md
    assert (tmp_path / "stage1-probes.md").read_text() == md


def test_format_table_adds_the_roi_questions_and_their_marginal_when_runs_have_them() -> None:
    """Runs scored with the questions about one region (hwsi.demo.roi_scores) get an ROI table and the paired
    marginal of each switch on those questions, beside the whole-slide one."""
    wsi, reg = TABLE1[0], TABLE1[1]  # WSI, region+WSI: differ in use_regions only
    assert reg.name == "region+WSI"
    results = {}
    for row, right in ((wsi, [1, 0, 0, 1]), (reg, [1, 1, 1, 1])):
        for s in (0, 1):
            results[f"{row.name}|{s}"] = {m: 0.5 for m in METRICS} | {
                "n_closed": 2, "closed_correct": {"q1": 1, "q2": 0}, "roi_acc": sum(right) / 4, "n_roi": 4,
                "roi_chance": 0.417, "roi_by_kind": {"architecture": right[0], "atypia": 1.0},
                "roi_correct": {f"r{i}": v for i, v in enumerate(right)}}
    md = format_table(1, results, (0, 1))
    assert "| row | ROI acc | architecture | atypia | chance | n ROI questions |" in md
    assert "| WSI | 0.500 ± 0.000 |" in md and "| region+WSI | 1.000 ± 0.000 |" in md
    roi_block = md.split("accuracy on the questions about one region")[1]
    line = next(ln for ln in roi_block.splitlines() if ln.startswith("| use_regions |"))
    assert line.startswith("| use_regions | +0.500 |"), line  # 2 of 4 questions flip, the same in both seeds
    whole = md.split("Marginal effect of each switch on closed-VQA accuracy")[1].split("accuracy on the questions")[0]
    assert next(ln for ln in whole.splitlines() if ln.startswith("| use_regions |")).startswith("| use_regions | +0.000 |")


def test_roi_questions_are_the_held_out_mixed_slides_regions(tmp_path) -> None:
    import json

    from hwsi.cli import main
    from hwsi.demo.roi_scores import roi_questions
    from hwsi.synth.classes import ARCHITECTURES
    from hwsi.synth.truth import read_truth

    assert main(["synth", "--cohort", "10", "--size", "2048", "--workers", "1", "--out", str(tmp_path), "--seed",
                 "3"]) == 0
    meta = json.loads((tmp_path / "cohort.json").read_text())
    qs = roi_questions(tmp_path)
    split = {s["slide_id"]: s for s in meta["slides"]}
    assert qs and all(split[q.slide_id]["split"] in ("val", "test") for q in qs)
    for q in qs:
        t = read_truth(tmp_path / split[q.slide_id]["truth"])
        i = [tuple(c) for c in t.data["regions/coords"].tolist()].index(q.roi[:2])
        want = (("yes" if t.data["regions/atypia"][i] else "no") if q.kind == "atypia"
                else ARCHITECTURES[int(t.data["regions/architecture"][i])])
        assert q.options[q.answer] == want and q.question.endswith(q.options[-1])
    assert {q.kind for q in qs} == {"architecture", "atypia"}
