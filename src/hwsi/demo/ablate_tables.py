"""The tables of ``hwsi ablate`` (hwsi.demo.ablate): rows, mean ± CI, marginal effects, paired differences.

Paired differences (the power to tell two rows apart): every run of a table answers the SAME held-out closed questions,
so a row is compared with the full row question by question — d = correct_full − correct_row over all (seed,
question) pairs — and the table gives the mean of d with a 95 % interval from a bootstrap over questions (seeds
kept paired: a question is resampled with all its seeds), which the per-row intervals over seeds cannot give.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_").lower()

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


def format_table(table: int, results: dict[str, Any], seeds: tuple[int, ...],
                 oracle: dict[str, Any] | None = None, protocol: str = "paper") -> str:
    head = {1: "Table 1 (scales fed to the LLM)", 2: "Table 2 (terms of L_HCA in stage 1)"}[table]
    if protocol == "clean":
        head += ", clean protocol: stage 1 with every scale, scales removed from the LLM input only"
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
    if oracle:
        lines.append(f"| oracle: stage-0 LM given the true findings | {oracle['closed_acc']:.3f} | – | – | – | "
                     f"{oracle.get('n_closed', '')} |")
    cats = sorted({c for rs in by_row.values() for r in rs for c in r.get("closed_by_category", {})})
    if cats:
        lines += ["", "Closed-VQA accuracy by question category (true visual tokens / shuffled), same runs:", "",
                  "| row | " + " | ".join(cats) + " |", "|---|" + "---|" * len(cats)]
        for name, rs in by_row.items():
            cells = [_cell([r["closed_by_category"].get(c) for r in rs if "closed_by_category" in r]) + " / "
                     + _cell([r["shuffled_by_category"].get(c) for r in rs if "shuffled_by_category" in r])
                     for c in cats]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        if oracle and oracle.get("closed_by_category"):
            lines.append("| oracle (true findings) | " + " | ".join(
                f"{oracle['closed_by_category'].get(c, float('nan')):.3f}" for c in cats) + " |")
    roi_rows = {name: [r for r in rs if "roi_acc" in r] for name, rs in by_row.items()}
    if any(roi_rows.values()):
        lines += ["", "Questions about ONE region of a held-out slide whose regions differ, answered from the ROI's "
                  "prefix (hwsi.demo.roi_scores; the whole-slide questions above can all be answered from the "
                  "slide token):", "", "| row | ROI acc | architecture | atypia | chance | n ROI questions |",
                  "|---|---|---|---|---|---|"]
        for name, rs in roi_rows.items():
            if rs:
                lines.append(f"| {name} | {_cell([r['roi_acc'] for r in rs])} | "
                             f"{_cell([r['roi_by_kind'].get('architecture') for r in rs])} | "
                             f"{_cell([r['roi_by_kind'].get('atypia') for r in rs])} | "
                             f"{rs[0]['roi_chance']:.3f} | {rs[0]['n_roi']} |")
    lines += paired_differences(table, results, seeds)
    lines += marginal_effects(table, results, seeds)
    if any(roi_rows.values()):
        lines += marginal_effects(table, results, seeds, field="roi_correct")
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


def matched_pairs(table: int, key: str) -> list[tuple[Row, Row]]:
    """The (on, off) row pairs of ``table`` that differ in switch ``key`` only (e.g. cell+WSI vs WSI)."""
    rows = TABLES[table]
    pairs = []
    for on in rows:
        sw = _switches(on)
        if not sw.get(key):
            continue
        want = {**sw, key: False}
        pairs += [(on, off) for off in rows if _switches(off) == want]
    return pairs


def paired_marginal(table: int, results: dict[str, Any], seeds: tuple[int, ...], key: str, n_boot: int = 2000,
                    seed: int = 0, field: str = "closed_correct") -> tuple[float, float, float, int, int] | None:
    """The marginal effect of switch ``key``: the mean over every matched pair of rows (:func:`matched_pairs`)
    and every seed both rows scored of correct_on − correct_off on the same held-out closed questions, with a
    95 % bootstrap interval over questions (a question is resampled with all its pairs and seeds):
    (mean, low, high, n_pair_seeds, n_questions), or None when no pair has both rows scored. ``field``: the
    per-question results compared (``roi_correct``: the questions about one region, hwsi.demo.roi_scores)."""
    a, b = [], []
    for on, off in matched_pairs(table, key):
        for s in seeds:
            ra, rb = results.get(f"{on.name}|{s}", {}), results.get(f"{off.name}|{s}", {})
            if field in ra and field in rb:
                a.append(ra[field])
                b.append(rb[field])
    if not a:
        return None
    m, lo, hi, n = paired_difference(a, b, n_boot=n_boot, seed=seed)
    return m, lo, hi, len(a), n


def marginal_effects(table: int, results: dict[str, Any], seeds: tuple[int, ...],
                     field: str = "closed_correct") -> list[str]:
    """Markdown lines: for each switch that varies across the table's rows (a scale in Table 1, a loss term in
    Table 2), its marginal effect on closed-VQA accuracy, paired (:func:`paired_marginal`: rows that differ in
    that switch only, same seed, same questions), and beside it the unpaired contrast of all row-seeds with the
    switch on vs off (Welch's t; runs share the cohort and the questions, so that p is a guide only)."""
    from scipy import stats

    keys = sorted({k for r in TABLES[table] for k in _switches(r)})
    acc = "roi_acc" if field == "roi_correct" else "closed_acc"
    out = []
    for key in keys:
        on, off = [], []
        for row in TABLES[table]:
            sw = _switches(row)
            for seed in seeds:
                res = results.get(f"{row.name}|{seed}")
                if res is not None and key in sw and acc in res:
                    (on if sw[key] else off).append(res[acc])
        if len(on) < 2 or len(off) < 2:
            continue
        m_on, m_off = sum(on) / len(on), sum(off) / len(off)
        spread = max(on) - min(on) + max(off) - min(off)
        p = f"{float(stats.ttest_ind(on, off, equal_var=False).pvalue):.3f}" if spread > 1e-12 else "–"
        pm = paired_marginal(table, results, seeds, key, field=field)
        paired = (f"{pm[0]:+.3f} | [{pm[1]:+.3f}, {pm[2]:+.3f}] | {pm[3]} | {pm[4]}" if pm else "– | – | – | –")
        out.append(f"| {key} | {paired} | {m_on:.3f} (n={len(on)}) | {m_off:.3f} (n={len(off)}) | "
                   f"{m_on - m_off:+.3f} | {p} |")
    if not out:
        return []
    what = "closed-VQA accuracy" if field == "closed_correct" else "accuracy on the questions about one region"
    return ["", f"Marginal effect of each switch on {what}. Paired: rows that differ in that switch "
            "only, same seed, same held-out questions (mean of correct_on − correct_off; 95 % bootstrap interval "
            "over questions). Unpaired: all row-seeds with it on vs off (Welch's t; a guide only).", "",
            "| switch | paired mean | paired 95 % CI | pair-seeds | questions | on | off | on − off | p |",
            "|---|---|---|---|---|---|---|---|---|", *out]


def _cell(values: list[float | None]) -> str:
    vals = [v for v in values if v is not None]
    if not vals:
        return "–"
    mu, hw = mean_ci(vals)
    return f"{mu:.3f} ± {hw:.3f}"


def paired_difference(a: list[dict[str, int]], b: list[dict[str, int]], n_boot: int = 2000,
                      seed: int = 0) -> tuple[float, float, float, int]:
    """Mean of correct_a − correct_b over the questions both answered, seeds paired by position, with a 95 %
    bootstrap interval over questions (each resampled with all its seeds): (mean, low, high, n_questions)."""
    qs = sorted(set.intersection(*[set(x) for x in a + b])) if a and b else []
    if not qs:
        return float("nan"), float("nan"), float("nan"), 0
    d = np.array([[x[q] - y[q] for q in qs] for x, y in zip(a, b)], dtype=np.float64).mean(0)  # per question
    rng = np.random.default_rng(seed)
    boots = d[rng.integers(0, len(d), (n_boot, len(d)))].mean(1)
    return float(d.mean()), float(np.quantile(boots, 0.025)), float(np.quantile(boots, 0.975)), len(qs)


def paired_differences(table: int, results: dict[str, Any], seeds: tuple[int, ...]) -> list[str]:
    """Markdown lines: each row against the full row on the same held-out questions (module docstring)."""
    rows = TABLES[table]
    full = next(r for r in rows if r.run == "full")
    common = [s for s in seeds if "closed_correct" in results.get(f"{full.name}|{s}", {})]
    out = []
    for row in rows:
        if row is full:
            continue
        ss = [s for s in common if "closed_correct" in results.get(f"{row.name}|{s}", {})]
        if not ss:
            continue
        m, lo, hi, n = paired_difference([results[f"{full.name}|{s}"]["closed_correct"] for s in ss],
                                         [results[f"{row.name}|{s}"]["closed_correct"] for s in ss])
        out.append(f"| full − {row.name} | {m:+.3f} | [{lo:+.3f}, {hi:+.3f}] | {len(ss)} | {n} |")
    if not out:
        return []
    return ["", "Paired difference of the full row and each row on the same held-out closed questions (seeds "
            "paired; 95 % bootstrap interval over questions):", "",
            "| comparison | mean | 95 % CI | seeds | questions |", "|---|---|---|---|---|", *out]
