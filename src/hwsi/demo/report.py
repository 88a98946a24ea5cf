"""``OUT/report.md`` of the SynthPath pipeline: what ran, how long, and every evaluation table with its plots.

Plots (PNG beside the report): loss curves of stages 0–3 (from ``runs/stageN/metrics.csv``), the classification
confusion matrices (written by :mod:`hwsi.eval.tasks`), and one test slide's thumbnail with its tissue, its
SPF-selected patches (Eq. 1–2) and the nuclei segmented in them (Eq. 3).
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from hwsi.demo.paths import PipelinePaths
from hwsi.store import SlideStore
from hwsi.utils.atomic import atomic_path


CELL_COLOURS = {0: (200, 200, 200), 1: (40, 90, 255), 2: (255, 40, 40), 3: (40, 200, 80)}


def read_losses(stage_dir: Path) -> tuple[list[int], list[float]]:
    """(step, loss) rows of a stage's ``metrics.csv``; empty when the stage has not run."""
    path = stage_dir / "metrics.csv"
    if not path.is_file():
        return [], []
    steps, losses = [], []
    with path.open(newline="") as fh:
        for row in csv.DictReader(fh):
            try:
                steps.append(int(float(row["step"])))
                losses.append(float(row["loss"]))
            except (KeyError, ValueError):
                continue
    return steps, losses


def plot_losses(runs: Path, path: Path) -> Path | None:
    """One panel per training stage with its loss curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = {s: read_losses(runs / f"stage{s}") for s in range(4)}
    curves = {s: c for s, c in curves.items() if c[0]}
    if not curves:
        return None
    names = {0: "stage 0: tiny LM on train text", 1: "stage 1: L_HCA (Eq. 9)", 2: "stage 2: projectors (LM loss)",
             3: "stage 3: projectors + LoRA"}
    fig, axes = plt.subplots(1, len(curves), figsize=(4 * len(curves), 3), squeeze=False)
    for ax, (s, (steps, losses)) in zip(axes[0], curves.items(), strict=True):
        ax.plot(steps, losses, lw=1)
        ax.set_title(names[s], fontsize=9)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return path


def evidence_figure(store: Path, path: Path, max_side: int = 900) -> Path:
    """A slide's thumbnail with tissue outline, region grid, SPF-selected patches (yellow) and nuclei (by type)."""
    from PIL import Image, ImageDraw

    with SlideStore(store) as s:
        thumb, tds = s.thumbnail()
        rcoords = s.region_coords()
        pcoords = s.patch_coords()
        selected = s.spf_selected()
        rsize = float(s.meta.region_size_level0)
        psize = float(s.meta.patch_size_level0)
        cx = s.cell_column("x") if s.has_cell_column("x") else np.zeros(0)
        cy = s.cell_column("y") if s.has_cell_column("y") else np.zeros(0)
        ctype = s.cell_column("type") if s.has_cell_column("type") else np.zeros(0, int)
    img = Image.fromarray(thumb).convert("RGB")
    scale = min(1.0, max_side / max(img.size))
    if scale < 1:
        img = img.resize((round(img.width * scale), round(img.height * scale)))
    k = scale / tds  # level-0 px -> figure px
    draw = ImageDraw.Draw(img, "RGBA")
    for x, y in rcoords:
        draw.rectangle([x * k, y * k, (x + rsize) * k, (y + rsize) * k], outline=(0, 0, 160, 255), width=2)
    for r, row in enumerate(selected):
        for g in row:
            if g < 0:
                continue
            x, y = pcoords[r, g]
            draw.rectangle([x * k, y * k, (x + psize) * k, (y + psize) * k], outline=(255, 200, 0, 255),
                           fill=(255, 220, 0, 50), width=2)
    rad = max(1.5, 3 * scale * 4)
    for x, y, t in zip(cx, cy, ctype, strict=True):
        c = CELL_COLOURS.get(int(t), (0, 0, 0))
        draw.ellipse([x * k - rad, y * k - rad, x * k + rad, y * k + rad], fill=(*c, 220))
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")
    return path


def _md_table(rows: list[dict[str, Any]], cols: list[str]) -> str:
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        out.append("| " + " | ".join(_fmt(r.get(c, "")) for c in cols) + " |")
    return "\n".join(out)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3f}"
    return str(v)


def write_report(paths: PipelinePaths, state: dict[str, Any]) -> Path:
    """Assemble ``OUT/report.md`` from the pipeline's state (``pipeline.json``), the training run and the evaluation
    folder."""
    out = paths.out
    st = state["steps"]
    lines = ["# hwsi demo — MLLM-HWSI on SynthPath", ""]
    lines += [
        "Everything here was produced by `make demo` (`hwsi demo`) on this machine, deterministic by seed. "
        "SynthPath slides are procedural; their diagnoses need evidence from several scales (cells: atypia, "
        "patches: glands, regions: architecture, slide: extent; see docs/synthpath.md).", "",
        "## Run", "",
    ]
    cfg = state["config"]
    lines.append(f"- cohort: {cfg['n_slides']} slides of {cfg['slide_size']}² px at {cfg['mpp']} µm/px, regions "
                 f"{cfg['region_size']} px of {(cfg['region_size'] // cfg['patch_size']) ** 2} patches of "
                 f"{cfg['patch_size']} px; splits {st.get('synth', {}).get('splits', {})}")
    lines.append(f"- seed {cfg['seed']}; training preset `{cfg['train_config']}`")
    rows = [{"step": k, "seconds": v["seconds"]} for k, v in st.items()]
    rows.append({"step": "total", "seconds": round(sum(v["seconds"] for v in st.values()), 1)})
    lines += ["", _md_table(rows, ["step", "seconds"]), ""]
    enc = st.get("encoder", {})
    if enc:
        lines += [f"Small image–text patch encoder (stand-in for CONCH): held-out zero-shot patch accuracy "
                  f"{enc.get('zero_shot_accuracy', float('nan')):.3f} (chance {enc.get('chance', float('nan')):.3f}).",
                  ""]
    tr = st.get("train", {})
    if tr:
        rows = []
        for s in range(4):
            m = tr.get(f"stage{s}", {})
            if m:
                rows.append({"stage": s, "first loss": m.get("first_loss", ""), "final loss": m.get("final_loss", ""),
                             "steps": m.get("steps", ""), "seconds": m.get("seconds", "")})
        lines += ["## Training", "", _md_table(rows, ["stage", "first loss", "final loss", "steps", "seconds"]), ""]
    png = plot_losses(paths.runs, out / "loss_curves.png")
    if png:
        lines += ["![loss curves](loss_curves.png)", ""]
    summary = paths.eval / "summary.md"
    if summary.is_file():
        body = summary.read_text(encoding="utf-8")
        rel = os.path.relpath(paths.eval, out)
        body = body.replace("](", f"]({rel}/") if "](" in body else body
        lines += ["## Evaluation (held-out test split)", "", body, ""]
        for png_path in sorted(paths.eval.glob("*_confusion.png")):
            lines += [f"![{png_path.stem}]({os.path.relpath(png_path, out)})", ""]
    test_ids = _test_slides(paths)
    if test_ids:
        store = paths.job / "stores" / f"{test_ids[0]}.h5"
        if store.is_file():
            fig = evidence_figure(store, out / "evidence.png")
            lines += ["## Evidence on one held-out slide", "",
                      f"`{test_ids[0]}`: regions (blue), SPF-selected patches (yellow, Eq. 1–2 with the fixed "
                      "vocabulary), nuclei segmented in them (dots: blue small round, red large/atypical, green "
                      "elongated, grey other).", "", f"![evidence]({fig.name})", ""]
    lines += ["## Look at it", "", "```", f"hwsi serve {paths.job} --model {paths.runs}", "```", ""]
    with atomic_path(paths.report) as tmp:
        tmp.write_text("\n".join(lines), encoding="utf-8")
    return paths.report


def _test_slides(paths: PipelinePaths) -> list[str]:
    cohort = paths.cohort / "cohort.json"
    if not cohort.is_file():
        return []
    data = json.loads(cohort.read_text())
    return [s["slide_id"] for s in data["slides"] if s.get("split") == "test"]
