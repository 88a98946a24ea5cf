"""Stage-1 hierarchical cross-modal alignment losses, paper Eq. 6–9 as read in DESIGN §5.

All similarities are cosines of L2-normalised vectors (inputs are normalised here, so callers may pass raw
head outputs). Text units come in the granularity of each scale: cells ↔ words, patches ↔ phrases,
regions ↔ sentences, slide ↔ whole report.

Eq. 6, per slide and scale s ∈ {c, p, r} (:func:`scale_contrastive_loss`)::

    L_s = -1/n_s Σ_i log( exp(sim(z_{s,i}, t_{pos(i)})/τ) / Σ_j exp(sim(z_{s,i}, t_j)/τ) )

  where j runs over the slide's text units of that granularity, pos(i) is assigned by the caller from the FROZEN
  encoders' similarity (:func:`assign_positives`), and a negative j ≠ pos(i) whose text is identical to the
  positive's (same ``text_ids``) is removed from the denominator. Tokens with pos = -1 or masked out are skipped.
Eq. 7 (:func:`slide_report_loss`): the same InfoNCE between slide tokens and report embeddings over the batch,
  reports identical to the positive removed from the denominator.
Eq. 8 (:func:`cross_scale_consistency`), per slide, on unit vectors with re-normalised means
  (‖a − b‖² = 2 − 2cos, so rescaling the heads cannot lower it)::

    L_c = 1/(2 n_r) Σ_{s∈{c,p}} Σ_k ‖z_{r,k} − norm(mean_i z_{s,k,i})‖² + 1/n_p Σ_j ‖z_{c_j} − z_{p_j}‖²

  (the 2·n_r is the number of (scale, region) terms actually present: regions without valid tokens of a scale
  and switched-off scales are not counted.)
Eq. 9 (:func:`hca_loss`):  L_HCA = 1/n_b Σ_b (Σ_s L_s^b + L_c^b) + L_WSI, each term switchable (Table 2).

Empty inputs (a slide without cells, one region, batch of one) give 0 for that term, never NaN.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F

from hwsi.config import PositiveFloat
from hwsi.model.heads import AlignedTokens


@dataclass
class HCALossConfig:
    tau: PositiveFloat = 0.02
    use_Ls: bool = True  # Eq. 6 (cells, patches, regions)
    use_Lc: bool = True  # Eq. 8
    use_Lwsi: bool = True  # Eq. 7
    scales: tuple[Literal["cells", "patches", "regions"], ...] = ("cells", "patches", "regions")  # which Eq. 6 terms


@dataclass
class ScaleTargets:
    """Text units of one scale's granularity for each slide of the batch."""

    text: torch.Tensor  # (B, T, D) text-unit embeddings (words / phrases / sentences)
    text_mask: torch.Tensor  # (B, T) bool
    positives: torch.Tensor  # (B, ...) long: index into T of each visual token's positive; -1 = none
    text_ids: torch.Tensor | None = None  # (B, T) long: equal ids = identical text


@dataclass
class AlignmentTargets:
    cells: ScaleTargets | None = None
    patches: ScaleTargets | None = None
    regions: ScaleTargets | None = None
    report: torch.Tensor | None = None  # (B, D) report embeddings t_r
    report_ids: torch.Tensor | None = None  # (B,) long: equal ids = identical report


@dataclass
class HCALossOutput:
    total: torch.Tensor
    terms: dict[str, torch.Tensor] = field(default_factory=dict)  # batch-mean of each term (for logging)


def assign_positives(
    frozen_visual: torch.Tensor, frozen_text: torch.Tensor, text_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """argmax_j cos(v_i, t_j) over valid text units, from frozen (shared-space) embeddings.

    frozen_visual (..., n, D), frozen_text (..., T, D), text_mask (..., T) -> (..., n) long; -1 where no text
    unit is valid. Computed without gradient: positives must not come from the heads being trained.
    """
    if frozen_text.shape[-2] == 0:
        return torch.full(frozen_visual.shape[:-1], -1, dtype=torch.long, device=frozen_visual.device)
    with torch.no_grad():
        sim = F.normalize(frozen_visual.float(), dim=-1) @ F.normalize(frozen_text.float(), dim=-1).transpose(-1, -2)
        if text_mask is not None:
            sim = sim.masked_fill(~text_mask.to(torch.bool)[..., None, :], float("-inf"))
        idx = sim.argmax(dim=-1)
        if text_mask is not None:
            idx = torch.where(text_mask.any(dim=-1, keepdim=True), idx, torch.full_like(idx, -1))
    return idx


def _masked_info_nce(
    z: torch.Tensor,
    t: torch.Tensor,
    pos: torch.Tensor,
    z_mask: torch.Tensor,
    t_mask: torch.Tensor,
    t_ids: torch.Tensor | None,
    tau: float,
) -> torch.Tensor:
    """Batched InfoNCE. z (B,N,D), t (B,T,D), pos (B,N), z_mask (B,N), t_mask (B,T), t_ids (B,T) -> (B,)."""
    b, n, _ = z.shape
    tt = t.shape[1]
    if n == 0 or tt == 0:
        return (z.sum() + t.sum()).new_zeros(b) + 0.0 * (z.sum() + t.sum())
    t_mask = t_mask.to(torch.bool)
    pos_c = pos.clamp(0, tt - 1)
    row_ok = z_mask.to(torch.bool) & (pos >= 0) & torch.gather(t_mask, 1, pos_c)
    logits = F.normalize(z, dim=-1) @ F.normalize(t, dim=-1).transpose(1, 2) / tau  # (B, N, T)
    drop = ~t_mask[:, None, :].expand(b, n, tt)
    if t_ids is not None:
        pos_id = torch.gather(t_ids, 1, pos_c)  # (B, N)
        same = t_ids[:, None, :] == pos_id[..., None]
        is_pos = F.one_hot(pos_c, tt).to(torch.bool)
        drop = drop | (same & ~is_pos)
    logits = logits.masked_fill(drop, float("-inf"))
    logits = torch.where(row_ok[..., None], logits, torch.zeros_like(logits))
    nll = -torch.gather(logits.log_softmax(dim=-1), 2, pos_c[..., None]).squeeze(-1)  # (B, N)
    nll = torch.where(row_ok, nll, torch.zeros_like(nll))
    count = row_ok.sum(dim=1)
    return nll.sum(dim=1) / count.clamp_min(1)


def scale_contrastive_loss(
    z: torch.Tensor, z_mask: torch.Tensor, targets: ScaleTargets, tau: float = 0.02
) -> torch.Tensor:
    """Eq. 6 for one scale, per slide: z (B, ..., D) visual tokens, z_mask (B, ...) -> (B,) losses."""
    b, d = z.shape[0], z.shape[-1]
    return _masked_info_nce(
        z.reshape(b, -1, d), targets.text, targets.positives.reshape(b, -1), z_mask.reshape(b, -1),
        targets.text_mask, targets.text_ids, tau,
    )


def slide_report_loss(
    z_slide: torch.Tensor, report: torch.Tensor, report_ids: torch.Tensor | None = None, tau: float = 0.02
) -> torch.Tensor:
    """Eq. 7: InfoNCE of each slide token against the batch's reports (positive: its own). Scalar."""
    b = z_slide.shape[0]
    pos = torch.arange(b, device=z_slide.device)[None]
    ids = None if report_ids is None else report_ids[None]
    mask = torch.ones(1, b, dtype=torch.bool, device=z_slide.device)
    return _masked_info_nce(z_slide[None], report[None], pos, mask, mask, ids, tau)[0]


def cross_scale_consistency(
    regions: torch.Tensor | None,
    cells: torch.Tensor | None,
    patches: torch.Tensor | None,
    patch_mask: torch.Tensor,
    region_mask: torch.Tensor,
    cell_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Eq. 8 per slide -> (B,). regions (B,R,D); cells, patches (B,R,k,D); masks (B,R,k) / (B,R).

    ``cell_mask`` (default ``patch_mask``) selects which cell tokens take part (e.g. only patches with nuclei).
    """
    ref = next(x for x in (regions, cells, patches) if x is not None)
    b = ref.shape[0]
    total = ref.new_zeros(b) + 0.0 * ref.sum()
    pm = patch_mask.to(torch.bool) & region_mask.to(torch.bool)[..., None]
    cm = pm if cell_mask is None else cell_mask.to(torch.bool) & pm
    if regions is not None:
        zr = F.normalize(regions, dim=-1)
        acc, n_terms = ref.new_zeros(b), ref.new_zeros(b)
        for z_s, m in ((cells, cm), (patches, pm)):
            if z_s is None:
                continue
            w = m[..., None].to(z_s.dtype)
            mean = F.normalize((F.normalize(z_s, dim=-1) * w).sum(dim=2), dim=-1)  # (B, R, D)
            ok = region_mask.to(torch.bool) & m.any(dim=2)  # (B, R)
            sq = (zr - mean).pow(2).sum(-1)
            acc = acc + torch.where(ok, sq, torch.zeros_like(sq)).sum(1)
            n_terms = n_terms + ok.sum(1)
        total = total + acc / n_terms.clamp_min(1)
    if cells is not None and patches is not None:
        both = cm
        sq = (F.normalize(cells, dim=-1) - F.normalize(patches, dim=-1)).pow(2).sum(-1)  # (B, R, k)
        sq = torch.where(both, sq, torch.zeros_like(sq))
        total = total + sq.sum((1, 2)) / both.sum((1, 2)).clamp_min(1)
    return total


def hca_loss(z: AlignedTokens, targets: AlignmentTargets, cfg: HCALossConfig | None = None) -> HCALossOutput:
    """Eq. 9: mean over slides of (Σ_s L_s + L_c) plus L_WSI; terms switched off by ``cfg`` are left out."""
    cfg = cfg or HCALossConfig()
    ref = next(x for x in (z.slide, z.regions, z.patches, z.cells) if x is not None)
    b = ref.shape[0]
    per_slide = ref.new_zeros(b)
    terms: dict[str, torch.Tensor] = {}
    if cfg.use_Ls:
        masks = {"cells": z.patch_mask, "patches": z.patch_mask, "regions": z.region_mask}
        l_s = ref.new_zeros(b)
        for scale in cfg.scales:
            tok, tgt = getattr(z, scale), getattr(targets, scale)
            if tok is None or tgt is None:
                continue
            mask = masks[scale] if scale == "regions" else masks[scale] & z.region_mask[..., None]
            loss = scale_contrastive_loss(tok, mask, tgt, cfg.tau)
            terms[f"L_{scale}"] = loss.mean()
            l_s = l_s + loss
        terms["L_s"] = l_s.mean()
        per_slide = per_slide + l_s
    if cfg.use_Lc and any(x is not None for x in (z.regions, z.cells, z.patches)):  # only z_WSI: no Eq. 8 term
        l_c = cross_scale_consistency(z.regions, z.cells, z.patches, z.patch_mask, z.region_mask)
        terms["L_c"] = l_c.mean()
        per_slide = per_slide + l_c
    total = per_slide.mean()
    if cfg.use_Lwsi and z.slide is not None and targets.report is not None:
        l_w = slide_report_loss(z.slide, targets.report, targets.report_ids, cfg.tau)
        terms["L_wsi"] = l_w
        total = total + l_w
    return HCALossOutput(total=total, terms=terms)
