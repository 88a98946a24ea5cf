"""Linear probes of a trained run's stage-1 outputs per scale (docs/design.md §5).

For each scale, a logistic regression on the stage-1 alignment output z (the per-scale heads' unit vectors) is
trained on the train split's slides and scored (balanced accuracy) on the held-out ones, on the SynthPath fact that
scale owns (the facts of :mod:`hwsi.demo.gates`), beside the same probe on the same architecture at random
initialisation and on the scale's raw input. A stage-1 loss that puts its scale's fact into the token beats both.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from hwsi.demo.gates import GateConfig, GateSlide, grid_pooled, load_gate_slides, raw_probe
from hwsi.model.heads import AlignmentHeads
from hwsi.model.hierarchy import HierarchicalEncoder
from hwsi.model.inputs import collate_slides
from hwsi.synth.classes import ARCH_CROWDED, ARCH_REGULAR, GLAND, SOLID
from hwsi.train.config import load_train_config
from hwsi.train.stage_common import ALIGNMENT_FILE, load_part, load_safetensors


@dataclass
class ProbeResult:
    scale: str
    fact: str
    trained: float  # held-out BA of a logistic regression on the stage-1 alignment output z of that scale
    random_init: float  # the same probe on the same architecture at its random initialisation
    raw: float  # the same probe on the scale's raw input (mean-pooled)
    n_train: int
    n_test: int


def _scale_probe_data(slides: list[GateSlide], tokens: dict[str, Any]) -> dict[str, tuple[np.ndarray, ...]]:
    """Per scale: (features, labels, is_train) of the gate facts from per-slide token dicts."""
    rows: dict[str, list[tuple[np.ndarray, int, bool]]] = {"cells": [], "patches": [], "regions": [], "slide": []}
    for s in slides:
        t, tr = tokens[s.slide_id], s.split == "train"
        x = s.inputs
        for i, j in zip(*np.nonzero(np.isin(s.pattern, (GLAND, SOLID)))):
            if t.get("cells") is not None and bool(x.cell_mask[i, j].any()):
                rows["cells"].append((t["cells"][i, j], int(s.atypia[i]), tr))
            if t.get("patches") is not None:
                rows["patches"].append((t["patches"][i, j], int(s.pattern[i, j] == SOLID), tr))
        for i, a in enumerate(s.architecture.tolist()):
            if t.get("regions") is not None and a in (ARCH_REGULAR, ARCH_CROWDED):
                rows["regions"].append((t["regions"][i], int(a == ARCH_CROWDED), tr))
        if (t.get("slide") is not None and s.facts.get("extent") in ("focal", "extensive")
                and s.facts.get("architecture") in ("crowded", "solid")):
            rows["slide"].append((t["slide"], int(s.facts["extent"] == "extensive"), tr))
    return {k: (np.stack([r[0] for r in v]), np.array([r[1] for r in v]), np.array([r[2] for r in v]))
            for k, v in rows.items() if v}


def _tokens_of(model: nn.Module, heads: nn.Module | None, slides: list[GateSlide]) -> dict[str, dict[str, Any]]:
    out = {}
    with torch.no_grad():
        for s in slides:
            h = model(collate_slides([s.inputs]))
            z = heads(h) if heads is not None else None
            get = (lambda n: getattr(z, n)) if z is not None else (
                lambda n: {"cells": h.cell_tokens, "patches": h.patch_tokens, "regions": h.region_tokens,
                           "slide": h.slide_token}[n])
            out[s.slide_id] = {n: (None if get(n) is None else get(n)[0].numpy())
                               for n in ("cells", "patches", "regions", "slide")}
    return out


def probe_stage1(pipeline_out: str | Path, run: str | Path, cfg: GateConfig | None = None) -> list[ProbeResult]:
    """Linear probes of a run's stage-1 outputs (alignment heads' z) per scale, on the fact each scale owns,
    beside the same probe at random initialisation and on the raw input (module docstring)."""
    run = Path(run)
    tcfg = load_train_config(run / "config.yaml")
    cfg = cfg or GateConfig(k=tcfg.model.k, max_cells=tcfg.model.max_cells)
    slides = load_gate_slides(pipeline_out, tcfg.model.k, tcfg.model.max_cells, tcfg.data.patch_encoder,
                              tcfg.data.region_input)
    torch.manual_seed(tcfg.seed)
    trained, heads = HierarchicalEncoder(tcfg.model.hierarchy), AlignmentHeads(tcfg.model.hierarchy.dims(),
                                                                                tcfg.model.text_dim)
    torch.manual_seed(tcfg.seed)
    rand, rand_heads = HierarchicalEncoder(tcfg.model.hierarchy), AlignmentHeads(tcfg.model.hierarchy.dims(),
                                                                                  tcfg.model.text_dim)
    state = load_safetensors(run / "stage1" / "final" / ALIGNMENT_FILE)
    load_part(trained, state, "hierarchy.")
    load_part(heads, state, "heads.")
    trained.eval(), rand.eval()
    got = _scale_probe_data(slides, _tokens_of(trained, heads, slides))
    base = _scale_probe_data(slides, _tokens_of(rand, rand_heads, slides))
    raw_tokens = {}
    for s in slides:
        x = s.inputs
        w = x.cell_mask[..., None].float()
        raw_tokens[s.slide_id] = {
            "cells": ((x.cell_feats * w).sum(2) / w.sum(2).clamp_min(1)).numpy(), "patches": x.patch_feats.numpy(),
            "regions": grid_pooled(x.region_input, x.grid_mask),
            "slide": grid_pooled(x.region_input, x.grid_mask).mean(0)}
    raw = _scale_probe_data(slides, raw_tokens)
    facts = {"cells": "atypia", "patches": "solid vs gland", "regions": "crowded vs regular",
             "slide": "extent (region-visible lesions)"}
    out = []
    for scale, (x, y, tr) in got.items():
        def ba(d: dict[str, tuple[np.ndarray, ...]]) -> float:
            xx, yy, tt = d[scale]
            return raw_probe(xx[tt], yy[tt], xx[~tt], yy[~tt])
        out.append(ProbeResult(scale, facts[scale], ba(got), ba(base), ba(raw), int(tr.sum()), int((~tr).sum())))
    return out


def probes_table(results: list[ProbeResult]) -> str:
    lines = ["| scale | fact | stage-1 z | random init | raw input | n train / held-out |", "|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r.scale} | {r.fact} | {r.trained:.3f} | {r.random_init:.3f} | {r.raw:.3f} | "
                     f"{r.n_train} / {r.n_test} |")
    return "\n".join(lines)
