"""Stage-1 hierarchical cross-modal alignment losses, paper Eq. 6–9 as read in docs/design.md §5.

All similarities are cosines of L2-normalised vectors (inputs are normalised here, so callers may pass raw
head outputs). Text units come in the granularity of each scale: cells ↔ words, patches ↔ phrases,
regions ↔ sentences, slide ↔ whole report.

Eq. 6, per slide and scale s ∈ {c, p, r} (:func:`scale_contrastive_loss`)::

    L_s = -1/n_s Σ_i log( exp(sim(z_{s,i}, t_{pos(i)})/τ) / Σ_j exp(sim(z_{s,i}, t_j)/τ) )

  where j runs over the slide's text units of that granularity, pos(i) is assigned by the caller from the FROZEN
  encoders' similarity (:func:`assign_positives`), and a negative j ≠ pos(i) whose text is identical to the
  positive's (same ``text_ids``) is removed from the denominator. Tokens with pos = -1 or masked out are skipped.
Eq. 7 (:func:`slide_report_loss`): the same InfoNCE between slide tokens and report embeddings over the batch,
  reports identical to the positive removed from the denominator. On several processes (``gather=True``, what
  stage 1 passes when it runs on more than one) the batch is the GLOBAL one: the report embeddings (and their ids)
  of every process are gathered (:func:`gather_rows`; the local rows keep their gradient, and the gradients other
  processes' losses put on them are summed back), so each process scores its own slides against every report of
  the micro-step and the mean over processes is the one-process loss of the concatenated batch. The slide tokens
  need no gather: each row of this one-directional InfoNCE is a separate term of the mean.
Eq. 8 (:func:`cross_scale_consistency`), per slide, on unit vectors with re-normalised means
  (‖a − b‖² = 2 − 2cos, so rescaling the heads cannot lower it)::

    L_c = 1/(2 n_r) Σ_{s∈{c,p}} Σ_k ‖z_{r,k} − norm(mean_i z_{s,k,i})‖² + 1/n_p Σ_j ‖z_{c_j} − z_{p_j}‖²

  (the 2·n_r is the number of (scale, region) terms actually present: regions without valid tokens of a scale
  and switched-off scales are not counted.)
Eq. 9 (:func:`hca_loss`):  L_HCA = 1/n_b Σ_b (Σ_s L_s^b + λ_c L_c^b) + L_WSI, each term switchable (Table 2).

Reading v2 (docs/design.md §5; ``eq6 = "pooled"``, the default). The units are report CLAUSES routed to a scale
(:mod:`hwsi.train.units`), and the candidates of Eq. 6 are a BANK: the slide's own units of that scale plus the same
scale's units of the other training slides (a departure from the paper's own-report denominator, labelled as one).
A slide's score for a unit u pools its tokens of that scale (:func:`pooled_unit_scores`, multiple-instance style,
a departure): the mean of the top ``top_frac`` of cos(z_i, t_u) for a presence statement (a focal finding needs
only a few tokens), the mean over all tokens for an absence statement. :func:`bank_info_nce` is then, per slide b
and own unit u,  -log exp(S_bu/τ) / (exp(S_bu/τ) + Σ_{u' ∈ N_b} exp(S_bu'/τ)),  N_b = the allowed candidates that
are not b's own units (identical text and same-fact units masked by the caller), optionally divided by
ln(1 + |N_b|) so no term dominates Eq. 9 by its number of candidates. Eq. 7 uses the same function over a bank of
the training split's reports. These bank forms are batch-independent: a slide's candidates, positives, allowed
negatives and ln(1 + |N_b|) come from the whole train split, not from the batch, so they are the same whichever
process, micro-batch or batch size a slide is trained in (nothing to gather). Eq. 8 (``lc_mode = "fine_to_coarse"``) pulls each coarser token toward the
re-normalised mean of the finer ones with stop-gradient on the finer side, only over patches that have nuclei
(the "no cells" token never takes part). ``eq6 = "v1"`` keeps the earlier reading (per-token positives, own-report
denominator, words/phrases/sentences) for comparison.

Empty inputs (a slide without cells, one region, batch of one) give 0 for that term, never NaN.
"""

from __future__ import annotations

import math
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
    scales: tuple[Literal["cells", "patches", "regions", "slide"], ...] = ("cells", "patches", "regions")  # Eq. 6 terms
    eq6: Literal["pooled", "v1"] = "v1"  # "pooled": reading v2 (module docstring); "v1": per-token, own report
    top_frac: float = 0.1  # v2: fraction of a slide's tokens pooled for a presence statement
    normalise: bool = False  # v2: divide each InfoNCE by ln(1 + #negatives)
    lambda_c: float = 1.0  # weight of Eq. 8 in Eq. 9
    lc_mode: Literal["fine_to_coarse", "symmetric"] = "symmetric"  # Eq. 8: stop-grad on the finer side, or both


@dataclass
class ScaleTargets:
    """Text units of one scale's granularity for each slide of the batch."""

    text: torch.Tensor  # (B, T, D) text-unit embeddings (words / phrases / sentences)
    text_mask: torch.Tensor  # (B, T) bool
    positives: torch.Tensor  # (B, ...) long: index into T of each visual token's positive; -1 = none
    text_ids: torch.Tensor | None = None  # (B, T) long: equal ids = identical text


@dataclass
class BankTargets:
    """Reading v2: one scale's (or the reports') candidate bank and, per slide, its positives and allowed negatives."""

    emb: torch.Tensor  # (U, D) unit embeddings
    positive: torch.Tensor  # (B, U) bool: the slide's own units
    allowed: torch.Tensor  # (B, U) bool: may stand in the slide's denominator (not identical text / same fact)
    absence: torch.Tensor | None = None  # (U,) bool: absence statement (mean pooling) vs presence (top-k)
    ids: torch.Tensor | None = None  # (U,) long: index of each unit's text in the model's string list (live text)


@dataclass
class AlignmentTargets:
    cells: ScaleTargets | None = None
    patches: ScaleTargets | None = None
    regions: ScaleTargets | None = None
    report: torch.Tensor | None = None  # (B, D) report embeddings t_r
    report_ids: torch.Tensor | None = None  # (B,) long: equal ids = identical report
    banks: dict[str, BankTargets] = field(default_factory=dict)  # v2: "cells", "patches", "regions", "slide", "report"


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


class _GatherRows(torch.autograd.Function):
    """all_gather along dim 0 (equal row counts); backward: the gathered gradient summed over processes, this
    process's slice (the gradient of the sum of every process's loss w.r.t. its own rows)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        import torch.distributed as dist

        ctx.rank, ctx.rows = dist.get_rank(), x.shape[0]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        import torch.distributed as dist

        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]


def gather_rows(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Every process's ``x`` (B, ...) concatenated in rank order, with this process's rows in their slot keeping
    their gradient; and the offset of those rows. No process group (or one process): ``(x, 0)``. Every process
    must call it with the same number of rows (the Engine's equal shares)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x, 0
    sizes = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor([x.shape[0]], device=x.device))
    if len({int(n) for n in sizes}) != 1:
        raise ValueError(f"gather_rows: the processes hold different row counts {[int(n) for n in sizes]}")
    offset = dist.get_rank() * x.shape[0]
    if x.requires_grad:
        return _GatherRows.apply(x), offset
    parts = [torch.empty_like(x) for _ in sizes]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts), offset


def slide_report_loss(
    z_slide: torch.Tensor, report: torch.Tensor, report_ids: torch.Tensor | None = None, tau: float = 0.02,
    gather: bool = False,
) -> torch.Tensor:
    """Eq. 7: InfoNCE of each slide token against the batch's reports (positive: its own). Scalar.

    ``gather``: the batch is every process's (module docstring); this process's loss is the mean over its own
    slides, so the mean over processes equals the one-process loss of the concatenated batch."""
    b = z_slide.shape[0]
    offset = 0
    if gather:
        report, offset = gather_rows(report)
        if report_ids is not None:
            report_ids, _ = gather_rows(report_ids)
    pos = torch.arange(offset, offset + b, device=z_slide.device)[None]
    ids = None if report_ids is None else report_ids[None]
    rows = torch.ones(1, b, dtype=torch.bool, device=z_slide.device)
    cols = torch.ones(1, report.shape[0], dtype=torch.bool, device=z_slide.device)
    return _masked_info_nce(z_slide[None], report[None], pos, rows, cols, ids, tau)[0]


def pooled_unit_scores(tokens: torch.Tensor, mask: torch.Tensor, units: torch.Tensor,
                       absence: torch.Tensor | None = None, top_frac: float = 0.1) -> torch.Tensor:
    """v2 slide-to-unit scores: tokens (B, N, D), mask (B, N), units (U, D), absence (U,) -> (B, U).

    Presence units: mean of the top ceil(top_frac · n_b) cosines over the slide's n_b valid tokens; absence units:
    the mean over all of them. A slide without valid tokens scores 0."""
    b, n, _ = tokens.shape
    m = mask.to(torch.bool)
    sim = F.normalize(tokens, dim=-1) @ F.normalize(units, dim=-1).T  # (B, N, U)
    count = m.sum(1)  # (B,)
    w = m[..., None].to(sim.dtype)
    mean = (sim * w).sum(1) / count.clamp_min(1)[:, None]
    k = (count.to(torch.float32) * top_frac).ceil().clamp_min(1).to(torch.long)  # (B,)
    srt = sim.masked_fill(~m[..., None], float("-inf")).sort(dim=1, descending=True).values  # (B, N, U)
    take = (torch.arange(n, device=sim.device)[None] < k[:, None])[..., None]  # (B, N, 1)
    top = torch.where(take, srt, torch.zeros_like(srt)).sum(1) / k[:, None]
    out = top if absence is None else torch.where(absence.to(torch.bool)[None], mean, top)
    return torch.where((count > 0)[:, None], out, torch.zeros_like(out))


def bank_info_nce(scores: torch.Tensor, positive: torch.Tensor, allowed: torch.Tensor, tau: float = 0.02,
                  normalise: bool = False) -> torch.Tensor:
    """v2 InfoNCE over a bank: scores (B, U), positive / allowed (B, U) bool -> (B,) (module docstring).

    Each positive is contrasted with the allowed non-positive candidates only (the slide's other own units are
    true of it too). Slides without a positive give 0."""
    pos = positive.to(torch.bool)
    neg = allowed.to(torch.bool) & ~pos
    logits = scores / tau
    lse_neg = logits.masked_fill(~neg, float("-inf")).logsumexp(dim=-1, keepdim=True)  # (B, 1)
    nll = torch.logaddexp(logits, lse_neg) - logits  # (B, U): -log softmax of each unit vs the negatives
    n_pos = pos.sum(-1)
    loss = torch.where(pos, nll, torch.zeros_like(nll)).sum(-1) / n_pos.clamp_min(1)
    if normalise:
        loss = loss / torch.log1p(neg.sum(-1).to(loss.dtype)).clamp_min(math.log(2.0))
    return torch.where(n_pos > 0, loss, torch.zeros_like(loss))


def cross_scale_consistency(
    regions: torch.Tensor | None,
    cells: torch.Tensor | None,
    patches: torch.Tensor | None,
    patch_mask: torch.Tensor,
    region_mask: torch.Tensor,
    cell_mask: torch.Tensor | None = None,
    stop_grad_finer: bool = False,
) -> torch.Tensor:
    """Eq. 8 per slide -> (B,). regions (B,R,D); cells, patches (B,R,k,D); masks (B,R,k) / (B,R).

    ``cell_mask`` (default ``patch_mask``) selects which cell tokens take part (e.g. only patches with nuclei).
    ``stop_grad_finer``: the finer side of each pair (cells vs patches and regions, patches vs regions) is detached,
    so only the coarser token is pulled (reading v2, "fine -> coarse").
    """
    ref = next(x for x in (regions, cells, patches) if x is not None)
    sg = (lambda x: x.detach() if x is not None else None) if stop_grad_finer else (lambda x: x)
    b = ref.shape[0]
    total = ref.new_zeros(b) + 0.0 * ref.sum()
    pm = patch_mask.to(torch.bool) & region_mask.to(torch.bool)[..., None]
    cm = pm if cell_mask is None else cell_mask.to(torch.bool) & pm
    if regions is not None:
        zr = F.normalize(regions, dim=-1)
        acc, n_terms = ref.new_zeros(b), ref.new_zeros(b)
        for z_s, m in ((sg(cells), cm), (sg(patches), pm)):
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
        sq = (F.normalize(sg(cells), dim=-1) - F.normalize(patches, dim=-1)).pow(2).sum(-1)  # (B, R, k)
        sq = torch.where(both, sq, torch.zeros_like(sq))
        total = total + sq.sum((1, 2)) / both.sum((1, 2)).clamp_min(1)
    return total


def hca_loss(z: AlignedTokens, targets: AlignmentTargets, cfg: HCALossConfig | None = None,
             gather: bool = False) -> HCALossOutput:
    """Eq. 9: mean over slides of (Σ_s L_s + L_c) plus L_WSI; terms switched off by ``cfg`` are left out.

    ``gather``: several processes train together; the in-batch Eq. 7 (used when ``targets`` has no report bank)
    contrasts with every process's reports (:func:`slide_report_loss`). Every other term is per slide (and the
    bank forms batch-independent), so the mean over processes is the one-process value."""
    cfg = cfg or HCALossConfig()
    ref = next(x for x in (z.slide, z.regions, z.patches, z.cells) if x is not None)
    b = ref.shape[0]
    per_slide = ref.new_zeros(b)
    terms: dict[str, torch.Tensor] = {}
    if cfg.use_Ls and cfg.eq6 == "pooled":
        l_s = ref.new_zeros(b)
        for scale in cfg.scales:
            tok, bank = _scale_tokens(z, scale), targets.banks.get(scale)
            if tok is None:
                continue
            if bank is None:  # no unit of the train split is routed to this scale: the term is 0 (logged)
                terms[f"L_{scale}"] = ref.new_zeros(())
                continue
            scores = pooled_unit_scores(tok[0], tok[1], bank.emb, bank.absence, cfg.top_frac)
            loss = bank_info_nce(scores, bank.positive, bank.allowed, cfg.tau, cfg.normalise)
            terms[f"L_{scale}"] = loss.mean()
            l_s = l_s + loss
        terms["L_s"] = l_s.mean()
        per_slide = per_slide + l_s
    elif cfg.use_Ls:
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
        v2 = cfg.lc_mode == "fine_to_coarse"
        cell_mask = z.cell_present if v2 and z.cell_present is not None else None
        l_c = cross_scale_consistency(z.regions, z.cells, z.patches, z.patch_mask, z.region_mask, cell_mask, v2)
        terms["L_c"] = l_c.mean()
        per_slide = per_slide + cfg.lambda_c * l_c
    total = per_slide.mean()
    report_bank = targets.banks.get("report")
    if cfg.use_Lwsi and z.slide is not None and report_bank is not None:
        scores = F.normalize(z.slide, dim=-1) @ F.normalize(report_bank.emb, dim=-1).T
        l_w = bank_info_nce(scores, report_bank.positive, report_bank.allowed, cfg.tau, cfg.normalise).mean()
        terms["L_wsi"] = l_w
        total = total + l_w
    elif cfg.use_Lwsi and z.slide is not None and targets.report is not None:
        l_w = slide_report_loss(z.slide, targets.report, targets.report_ids, cfg.tau, gather)
        terms["L_wsi"] = l_w
        total = total + l_w
    return HCALossOutput(total=total, terms=terms)


def _scale_tokens(z: AlignedTokens, scale: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(B, N, D) tokens and (B, N) mask of one scale, flattened over regions and patches."""
    tok = {"cells": z.cells, "patches": z.patches, "regions": z.regions, "slide": z.slide}.get(scale)
    if tok is None:
        return None
    b, d = tok.shape[0], tok.shape[-1]
    if scale == "slide":
        return tok[:, None], torch.ones(b, 1, dtype=torch.bool, device=tok.device)
    if scale == "regions":
        return tok, z.region_mask.to(torch.bool)
    mask = z.patch_mask.to(torch.bool) & z.region_mask.to(torch.bool)[..., None]
    return tok.reshape(b, -1, d), mask.reshape(b, -1)
