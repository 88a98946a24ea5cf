"""Supervised ceilings ("gates") of each scale's encoder on the SynthPath fact that scale owns (docs/design.md §5, §8).

A stage-1 loss (Eq. 6–8) can only put into a token what that token's encoder can compute. Before any loss work,
each trainable encoder of the hierarchy (Eq. 4–5) is trained DIRECTLY on its scale's fact, from the same stored
frozen inputs the model gets, on the TRAIN split's slides, and scored (balanced accuracy) on the held-out slides
(val + test). A gate below 0.9 means no alignment loss can put the fact into that scale's token::

    cells    CCAF (Eq. 4) over the nuclei of one SPF-selected epithelial patch      -> atypia (region truth)
    patches  the frozen f_ij (a linear probe: z_p is f_ij itself, Eq. 5)            -> gland vs solid
    regions  ViT-4K over the region's whole patch grid (its ``stem`` is the bias)   -> crowded vs regular
    slide    ViT_WSI over frozen region tokens (the region gate's encoder, trained  -> extent: focal vs extensive
             on architectural lesion = crowded/solid vs regular)                       (lesions visible to regions)

Every gate also reports the same head on the RAW input (mean-pooled, logistic regression) so a gate's number can
be read against what needs no encoder at all. Dihedral augmentation of the region grid (arrangement is invariant
to it) is on by default. ``hwsi gates OUT`` runs them on a finished ``hwsi demo``/test pipeline folder, and the
stage-1 probes of :mod:`hwsi.demo.probes` beside them.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hwsi.errors import ConfigError
from hwsi.model.ccaf import CCAF, CCAFConfig
from hwsi.model.inputs import SlideInputs, load_slide_inputs
from hwsi.model.slide_vit import SlideViT, SlideViTConfig
from hwsi.model.vit4k import ViT4K, ViT4KConfig
from hwsi.synth.classes import ARCH_CROWDED, ARCH_REGULAR, ARCH_SOLID, GLAND, SOLID
from hwsi.synth.truth import read_truth


@dataclass
class GateConfig:
    """Sizes of the gate runs; encoder configs default to the demo preset's hierarchy (dims from the data)."""

    ccaf: CCAFConfig = field(default_factory=lambda: CCAFConfig(in_dim=0, dim=32, depth=2, n_heads=2))
    vit4k: ViT4KConfig = field(default_factory=lambda: ViT4KConfig(in_dim=0, dim=32, depth=2, n_heads=2, pos_grid=4))
    slide: SlideViTConfig = field(default_factory=lambda: SlideViTConfig(in_dim=32, dim=32, depth=1, n_heads=2))
    k: int = 8
    max_cells: int = 32
    epochs: int = 40
    lr: float = 1e-3
    weight_decay: float = 0.05
    batch_size: int = 32
    augment: bool = True  # dihedral views of the region grid (regions and slide gates)
    seed: int = 0


@dataclass
class GateSlide:
    slide_id: str
    split: str
    facts: dict[str, Any]
    inputs: SlideInputs
    architecture: np.ndarray  # (R,) truth architecture code of each kept region
    atypia: np.ndarray  # (R,) bool
    pattern: np.ndarray  # (R, k) truth pattern of each selected patch (-1 padding)


def load_gate_slides(pipeline_out: str | Path, k: int = 8, max_cells: int = 32,
                     patch_encoder: str = "hwsi_small_patch", region_input: str = "hwsi_small_patch") -> list[GateSlide]:
    """Every slide of a SynthPath pipeline folder (``cohort/``, ``job/stores``) with its truth aligned to the store."""
    root = Path(pipeline_out)
    cohort_file = root / "cohort" / "cohort.json"
    if not cohort_file.is_file():
        raise ConfigError(f"{cohort_file}: not found (give a finished `hwsi demo` / pipeline folder)")
    cohort = json.loads(cohort_file.read_text())
    out = []
    for rec in cohort["slides"]:
        store = root / "job" / "stores" / f"{rec['slide_id']}.h5"
        if not store.is_file():
            raise ConfigError(f"{store}: missing (the pipeline's extract step has not run)")
        x = load_slide_inputs(store, patch_encoder, region_input, max_regions=10_000, k=k, max_cells=max_cells)
        truth = read_truth(root / "cohort" / rec["truth"]).data
        coords = {tuple(c): i for i, c in enumerate(truth["regions/coords"].tolist())}
        arch_all, aty_all, pat_all = truth["regions/architecture"], truth["regions/atypia"], truth["patches/pattern"]
        rows = [coords.get(tuple(c)) for c in x.region_coords.tolist()]
        if any(r is None for r in rows):
            raise ConfigError(f"{store}: region grid does not match {rec['truth']} (tile at the cohort's grid)")
        arch = np.array([arch_all[r] for r in rows], np.int64)
        aty = np.array([bool(aty_all[r]) for r in rows])
        sel = x.selected.numpy()
        pat = np.full(sel.shape, -1, np.int64)
        for i, r in enumerate(rows):
            ok = sel[i] >= 0
            pat[i, ok] = pat_all[r][sel[i, ok]]
        out.append(GateSlide(rec["slide_id"], rec["split"], rec["facts"], x, arch, aty, pat))
    return out


# ------------------------------------------------------------------------------------------------ scoring
def balanced_accuracy(y: np.ndarray, pred: np.ndarray) -> float:
    """Mean per-class recall over the classes present in ``y``."""
    classes = np.unique(y)
    return float(np.mean([(pred[y == c] == c).mean() for c in classes])) if classes.size else float("nan")


def raw_probe(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray) -> float:
    """Logistic regression (balanced classes, standardised) on raw features: what needs no encoder."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if np.unique(y_train).size < 2:
        return float("nan")
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, class_weight="balanced", C=0.5))
    clf.fit(x_train, y_train)
    return balanced_accuracy(y_test, clf.predict(x_test))


def _dihedral(grid: torch.Tensor, side: int, t: int) -> torch.Tensor:
    """One of the 8 dihedral views of (M, G, ...) row-major grids."""
    m, g = grid.shape[:2]
    x = grid.reshape(m, side, side, *grid.shape[2:])
    if t & 4:
        x = x.transpose(1, 2)
    x = torch.rot90(x, t & 3, dims=(1, 2))
    return x.reshape(m, g, *grid.shape[2:])


def _fit(model: nn.Module, n: int, batch_fn, y: torch.Tensor, cfg: GateConfig) -> None:
    """Class-balanced cross-entropy, AdamW, cosine schedule; ``batch_fn(idx, train=True) -> logits``."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                            weight_decay=cfg.weight_decay)
    steps = cfg.epochs * math.ceil(n / cfg.batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, steps))
    counts = torch.bincount(y, minlength=2).float().clamp_min(1)
    weight = counts.sum() / (2 * counts)
    g = torch.Generator().manual_seed(cfg.seed)
    model.train()
    for _ in range(cfg.epochs):
        for idx in torch.randperm(n, generator=g).split(cfg.batch_size):
            loss = F.cross_entropy(batch_fn(idx, True), y[idx], weight=weight)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    model.eval()


@torch.no_grad()
def _predict(n: int, batch_fn, bs: int = 256) -> np.ndarray:
    return torch.cat([batch_fn(idx, False).argmax(-1) for idx in torch.arange(n).split(bs)]).numpy()


@dataclass
class GateResult:
    scale: str
    fact: str
    encoder: str
    balanced_accuracy: float  # held-out (val + test slides)
    train_balanced_accuracy: float
    raw_balanced_accuracy: float  # logistic regression on the mean-pooled raw input
    n_train: int
    n_test: int

    def passed(self, bar: float = 0.9) -> bool:
        return self.balanced_accuracy >= bar


def _split(slides: list[GateSlide]) -> tuple[list[GateSlide], list[GateSlide]]:
    train = [s for s in slides if s.split == "train"]
    test = [s for s in slides if s.split != "train"]
    if not train or not test:
        raise ConfigError("gates need train and held-out (val/test) slides")
    return train, test


# ------------------------------------------------------------------------------------------------ the four gates
def gate_cells(slides: list[GateSlide], cfg: GateConfig) -> GateResult:
    """CCAF (Eq. 4) + linear head on the nuclei of SPF-selected gland/solid patches -> region atypia."""
    def samples(group: list[GateSlide]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        feats, masks, ys = [], [], []
        for s in group:
            x = s.inputs
            for i, j in zip(*np.nonzero(np.isin(s.pattern, (GLAND, SOLID)))):
                if bool(x.cell_mask[i, j].any()):
                    feats.append(x.cell_feats[i, j])
                    masks.append(x.cell_mask[i, j])
                    ys.append(int(s.atypia[i]))
        n_max = max(f.shape[0] for f in feats)
        pad = [F.pad(f, (0, 0, 0, n_max - f.shape[0])) for f in feats]
        pm = [F.pad(m, (0, n_max - m.shape[0])) for m in masks]
        return torch.stack(pad), torch.stack(pm), torch.tensor(ys)

    train, test = _split(slides)
    xa, ma, ya = samples(train)
    xb, mb, yb = samples(test)
    torch.manual_seed(cfg.seed)
    ccfg = copy.deepcopy(cfg.ccaf)
    ccfg.in_dim = int(xa.shape[-1])
    enc = CCAF(ccfg)
    model = nn.ModuleDict({"enc": enc, "head": nn.Linear(ccfg.dim, 2)})

    def run(x: torch.Tensor, m: torch.Tensor):
        return lambda idx, _train: model["head"](model["enc"](x[idx], m[idx]))

    _fit(model, len(ya), run(xa, ma), ya, cfg)

    def pooled(x: torch.Tensor, m: torch.Tensor) -> np.ndarray:
        w = m[..., None].float()
        mean = (x * w).sum(1) / w.sum(1).clamp_min(1)
        sd = (((x - mean[:, None]) ** 2) * w).sum(1) / w.sum(1).clamp_min(1)
        return torch.cat([mean, sd.sqrt()], -1).numpy()

    return GateResult("cells", "atypia", "CCAF", balanced_accuracy(yb.numpy(), _predict(len(yb), run(xb, mb))),
                      balanced_accuracy(ya.numpy(), _predict(len(ya), run(xa, ma))),
                      raw_probe(pooled(xa, ma), ya.numpy(), pooled(xb, mb), yb.numpy()), len(ya), len(yb))


def gate_patches(slides: list[GateSlide], cfg: GateConfig) -> GateResult:
    """The frozen f_ij (the patch token itself) -> gland vs solid, by logistic regression."""
    def samples(group: list[GateSlide]) -> tuple[np.ndarray, np.ndarray]:
        xs, ys = [], []
        for s in group:
            ok = np.isin(s.pattern, (GLAND, SOLID))
            xs.append(s.inputs.patch_feats.numpy()[ok])
            ys.append((s.pattern[ok] == SOLID).astype(np.int64))
        return np.concatenate(xs), np.concatenate(ys)

    train, test = _split(slides)
    xa, ya = samples(train)
    xb, yb = samples(test)
    ba = raw_probe(xa, ya, xb, yb)
    return GateResult("patches", "solid vs gland", "frozen f_ij (linear)", ba, raw_probe(xa, ya, xa, ya), ba,
                      len(ya), len(yb))


def _region_samples(group: list[GateSlide], codes: dict[int, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    xs, ms, ys = [], [], []
    for s in group:
        for i, a in enumerate(s.architecture.tolist()):
            if a in codes and bool(s.inputs.grid_mask[i].any()):
                xs.append(s.inputs.region_input[i])
                ms.append(s.inputs.grid_mask[i])
                ys.append(codes[a])
    return torch.stack(xs), torch.stack(ms), torch.tensor(ys)


def _train_region_encoder(xa: torch.Tensor, ma: torch.Tensor, ya: torch.Tensor, cfg: GateConfig) -> nn.ModuleDict:
    torch.manual_seed(cfg.seed)
    vcfg = copy.deepcopy(cfg.vit4k)
    vcfg.in_dim = int(xa.shape[-1])
    model = nn.ModuleDict({"enc": ViT4K(vcfg), "head": nn.Linear(vcfg.dim, 2)})
    side = math.isqrt(xa.shape[1])
    g = torch.Generator().manual_seed(cfg.seed + 1)

    def fn(idx: torch.Tensor, train: bool) -> torch.Tensor:
        x, m = xa[idx], ma[idx]
        if train and cfg.augment:
            t = int(torch.randint(8, (1,), generator=g))
            x, m = _dihedral(x, side, t), _dihedral(m, side, t)
        return model["head"](model["enc"](x, m))

    _fit(model, len(ya), fn, ya, cfg)
    return model


def _region_eval(model: nn.ModuleDict, x: torch.Tensor, m: torch.Tensor) -> np.ndarray:
    return _predict(len(x), lambda idx, _t: model["head"](model["enc"](x[idx], m[idx])))


def grid_pooled(x: torch.Tensor, m: torch.Tensor) -> np.ndarray:
    """Tissue-masked mean of (M, G, D) grid features -> (M, D) numpy (the raw-input baseline of a region)."""
    w = m[..., None].float()
    return ((x * w).sum(1) / w.sum(1).clamp_min(1)).numpy()


def gate_regions(slides: list[GateSlide], cfg: GateConfig) -> GateResult:
    """ViT-4K (with ``cfg.vit4k.stem``) + linear head over the region's patch grid -> crowded vs regular."""
    codes = {ARCH_REGULAR: 0, ARCH_CROWDED: 1}
    train, test = _split(slides)
    xa, ma, ya = _region_samples(train, codes)
    xb, mb, yb = _region_samples(test, codes)
    model = _train_region_encoder(xa, ma, ya, cfg)
    return GateResult("regions", "crowded vs regular", f"ViT-4K (stem {cfg.vit4k.stem})",
                      balanced_accuracy(yb.numpy(), _region_eval(model, xb, mb)),
                      balanced_accuracy(ya.numpy(), _region_eval(model, xa, ma)),
                      raw_probe(grid_pooled(xa, ma), ya.numpy(), grid_pooled(xb, mb), yb.numpy()), len(ya), len(yb))


def gate_slide(slides: list[GateSlide], cfg: GateConfig) -> GateResult:
    """ViT_WSI over frozen region tokens -> extent (focal vs extensive) of region-visible lesions.

    The region tokens come from a ViT-4K trained on architectural lesion (crowded or solid vs regular) on the train
    split; dysplasia (a lesion visible only in the nuclei) is left out: its extent has no path to the slide token.
    """
    codes = {ARCH_REGULAR: 0, ARCH_CROWDED: 1, ARCH_SOLID: 1}
    train, test = _split(slides)
    xa, ma, ya = _region_samples(train, codes)
    region_model = _train_region_encoder(xa, ma, ya, cfg)
    enc = region_model["enc"]

    def slide_set(group: list[GateSlide]) -> tuple[list[GateSlide], torch.Tensor]:
        keep = [s for s in group if s.facts.get("extent") in ("focal", "extensive")
                and s.facts.get("architecture") in ("crowded", "solid")]
        return keep, torch.tensor([int(s.facts["extent"] == "extensive") for s in keep])

    tr, y_tr = slide_set(train)
    te, y_te = slide_set(test)
    with torch.no_grad():
        tokens = {s.slide_id: enc(s.inputs.region_input, s.inputs.grid_mask) for s in tr + te}
    torch.manual_seed(cfg.seed)
    scfg = copy.deepcopy(cfg.slide)
    scfg.in_dim = cfg.vit4k.dim
    model = nn.ModuleDict({"enc": SlideViT(scfg), "head": nn.Linear(scfg.dim, 2)})

    def run(group: list[GateSlide]):
        def fn(idx: torch.Tensor, _train: bool) -> torch.Tensor:
            r_max = max(group[i].inputs.n_regions for i in idx.tolist())
            tok = torch.zeros(len(idx), r_max, scfg.in_dim)
            mask = torch.zeros(len(idx), r_max, dtype=torch.bool)
            coords = torch.zeros(len(idx), r_max, 2, dtype=torch.long)
            for b, i in enumerate(idx.tolist()):
                s = group[i]
                r = s.inputs.n_regions
                tok[b, :r], mask[b, :r], coords[b, :r] = tokens[s.slide_id], True, s.inputs.region_coords
            size = torch.tensor([group[i].inputs.region_size_level0 for i in idx.tolist()])
            return model["head"](model["enc"](tok, mask, coords, size))
        return fn

    _fit(model, len(y_tr), run(tr), y_tr, cfg)

    def counts(group: list[GateSlide]) -> np.ndarray:  # the raw baseline: fraction of tissue regions, mean input
        return np.stack([grid_pooled(s.inputs.region_input, s.inputs.grid_mask).mean(0) for s in group])

    return GateResult("slide", "extent (focal vs extensive)", "ViT_WSI over frozen ViT-4K tokens",
                      balanced_accuracy(y_te.numpy(), _predict(len(y_te), run(te))),
                      balanced_accuracy(y_tr.numpy(), _predict(len(y_tr), run(tr))),
                      raw_probe(counts(tr), y_tr.numpy(), counts(te), y_te.numpy()), len(y_tr), len(y_te))


GATES = {"cells": gate_cells, "patches": gate_patches, "regions": gate_regions, "slide": gate_slide}


def run_gates(pipeline_out: str | Path, cfg: GateConfig | None = None,
              scales: tuple[str, ...] = tuple(GATES)) -> list[GateResult]:
    """Run the named gates on a pipeline folder; see the module docstring."""
    cfg = cfg or GateConfig()
    unknown = [s for s in scales if s not in GATES]
    if unknown:
        raise ConfigError(f"unknown gate(s) {unknown}; choose from {sorted(GATES)}")
    slides = load_gate_slides(pipeline_out, cfg.k, cfg.max_cells)
    return [GATES[s](slides, cfg) for s in scales]


def gates_table(results: list[GateResult]) -> str:
    """Markdown table of gate results."""
    lines = ["| scale | fact | encoder | held-out BA | train BA | raw-input BA | n train / held-out |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r.scale} | {r.fact} | {r.encoder} | {r.balanced_accuracy:.3f} | "
                     f"{r.train_balanced_accuracy:.3f} | {r.raw_balanced_accuracy:.3f} | {r.n_train} / {r.n_test} |")
    return "\n".join(lines)


def results_json(results: list[GateResult], cfg: GateConfig) -> dict[str, Any]:
    return {"config": asdict(cfg), "gates": [asdict(r) for r in results]}
