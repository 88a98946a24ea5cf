"""Semantic Patch Filtering (SPF), paper §3.3 Eq. 1–2, with the readings of docs/design.md §5.

Per region R_i, only tissue patches take part (the *candidates*; n_p of them):

1. **Eq. 1 (redundancy)**: f̂_ij = f_ij / ‖f_ij‖₂, s_i^{j,k} = f̂_ij · f̂_ik, μ_i and σ_i the mean and the
   *population* standard deviation over all n_p² entries of the similarity matrix (diagonal included, as Eq. 1
   writes the sums), τ_i = μ_i + σ_i. Patch j is redundant if its mean similarity μ_i^j = (1/n_p) Σ_k s_i^{j,k}
   exceeds τ_i; the others form R'_i. A tolerance ``eq1_atol`` (default 1e-6) absorbs float rounding: a region of
   identical patches has σ_i = 0 and every μ_i^j = τ_i up to rounding, so none is dropped (rather than a random
   subset depending on the last bit). Because the μ_i^j average to μ_i ≤ τ_i, at least one patch always survives;
   should rounding ever drop them all, R'_i falls back to all candidates (``eq1_fallback`` in the result).
2. **Diversity (docs/design.md §5, the authors' released code)**: Eq. 1 alone rarely removes anything on realistic mixes,
   so top-k would pick near-duplicates. Of the survivors, the ``n_div`` (32) most mutually dissimilar are kept by
   farthest-point sampling in cosine distance 1 − s: the first pick is the survivor with the LOWEST mean similarity
   μ_i^j (the most atypical patch of the region; ties → lowest index), then repeatedly the survivor whose minimum
   distance to the picked set is largest (ties → lowest index). Fully deterministic. With ≤ n_div survivors all
   are kept; ``n_div=0`` disables this step.
3. **Eq. 2 (relevance)**: r_ij = (1/M) Σ_m f̂_ij · t̂_m over M text-entity embeddings (normalised). Relevance is
   computed for EVERY candidate (it feeds the relevance heatmap) and is NaN for non-candidates. The top-k of the
   diverse set by r_ij (ties → lowest index) form R̂_i, returned in decreasing relevance.

Degenerate regions: no candidates → nothing selected; one patch → it is selected; identical patches → nothing
dropped by Eq. 1, the diversity step keeps the first (lowest index) and any others whose distance is 0 until n_div —
all equally relevant, so the lowest indices win; fewer than k survivors → fewer returned (the store pads with −1).

Both the patch features and the text embeddings must live in ONE space (the frozen patch encoder's, e.g. CONCH or
``hwsi_small_patch`` trained against MiniLM): a dimension mismatch is an :class:`SPFError`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hwsi.errors import HwsiError

_EPS = 1e-12


class SPFError(HwsiError):
    """Inputs of SPF do not fit together (shapes, dimensions, non-finite values)."""


@dataclass
class SPFConfig:
    """SPF parameters: ``k`` patches per region (paper: 16), ``n_div`` diverse survivors (0 = off)."""

    k: int = 16
    n_div: int = 32
    eq1_atol: float = 1e-6

    def __post_init__(self) -> None:
        if self.k < 1:
            raise SPFError(f"SPF k must be >= 1, got {self.k}")
        if self.n_div < 0:
            raise SPFError(f"SPF n_div must be >= 0, got {self.n_div}")
        if self.n_div and self.n_div < self.k:
            raise SPFError(f"SPF n_div ({self.n_div}) must be 0 (off) or >= k ({self.k})")


@dataclass
class SPFResult:
    """Outcome of SPF for one region of G patches.

    selected:  (≤k,) int64 patch indices of R̂_i, in decreasing relevance
    relevance: (G,) float32 Eq. 2 r_ij for candidates, NaN elsewhere
    kept_eq1:  (G,) bool, the survivors R'_i of Eq. 1 (False for non-candidates)
    diverse:   (G,) bool, the farthest-point subset of R'_i from which top-k is taken
    tau, mu:   τ_i and μ_i of Eq. 1 (NaN without candidates)
    eq1_fallback: True if Eq. 1 dropped every candidate and all were kept instead
    """

    selected: np.ndarray
    relevance: np.ndarray
    kept_eq1: np.ndarray
    diverse: np.ndarray
    tau: float
    mu: float
    eq1_fallback: bool = False


def l2_normalize(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """x / ‖x‖₂ along ``axis`` in float64; zero vectors stay zero (their cosine with anything is 0)."""
    x = np.asarray(x, dtype=np.float64)
    n = np.linalg.norm(x, axis=axis, keepdims=True)
    return x / np.maximum(n, _EPS)


def eq1_redundancy(feats_hat: np.ndarray, atol: float = 1e-6) -> tuple[np.ndarray, np.ndarray, float, float]:
    """Eq. 1 on unit vectors (n, D): returns (keep (n,) bool, row means μ^j (n,), μ, τ).

    μ and σ are the mean and population std over all n² similarities (diagonal included).
    """
    s = feats_hat @ feats_hat.T
    mu = float(s.mean())
    sigma = float(s.std())
    tau = mu + sigma
    row_mean = s.mean(axis=1)
    keep = row_mean <= tau + atol
    return keep, row_mean, mu, tau


def farthest_point_sampling(feats_hat: np.ndarray, n: int, start: int) -> np.ndarray:
    """Indices of ``n`` mutually dissimilar rows of unit vectors (m, D), cosine distance 1 − s.

    Starts at ``start``; each step adds the row with the largest distance to its nearest picked row (ties → lowest
    index). Returns all rows (in pick order) if m ≤ n.
    """
    m = feats_hat.shape[0]
    if m == 0:
        return np.zeros(0, dtype=np.int64)
    n = min(n, m)
    picked = [int(start)]
    min_dist = 1.0 - feats_hat @ feats_hat[start]
    min_dist[start] = -np.inf
    for _ in range(n - 1):
        nxt = int(np.argmax(min_dist))  # argmax returns the first maximum: lowest index on ties
        picked.append(nxt)
        min_dist = np.minimum(min_dist, 1.0 - feats_hat @ feats_hat[nxt])
        min_dist[picked] = -np.inf
    return np.asarray(picked, dtype=np.int64)


def eq2_relevance(feats_hat: np.ndarray, text_hat: np.ndarray) -> np.ndarray:
    """Eq. 2: r_j = (1/M) Σ_m f̂_j · t̂_m for unit patch vectors (n, D) and unit text vectors (M, D)."""
    return (feats_hat @ text_hat.T).mean(axis=1)


def _check(patch_feats: np.ndarray, text_emb: np.ndarray) -> None:
    if patch_feats.ndim != 2:
        raise SPFError(f"patch features must be (G, D), got shape {patch_feats.shape}")
    if text_emb.ndim != 2 or text_emb.shape[0] == 0:
        raise SPFError(f"text-entity embeddings must be (M >= 1, D), got shape {text_emb.shape}")
    if text_emb.shape[1] != patch_feats.shape[1]:
        raise SPFError(
            f"patch features are {patch_feats.shape[1]}-d but text embeddings {text_emb.shape[1]}-d: SPF (Eq. 2) "
            "needs a patch encoder that shares the text encoder's space (e.g. hwsi_small_patch with minilm, "
            "conch_vit_b16 with conch_text)"
        )
    if not np.isfinite(text_emb).all():
        raise SPFError("text-entity embeddings contain NaN or inf")


def spf_select(
    patch_feats: np.ndarray,
    text_emb: np.ndarray,
    k: int = 16,
    n_div: int = 32,
    candidates: np.ndarray | None = None,
    eq1_atol: float = 1e-6,
) -> SPFResult:
    """SPF for one region (Eq. 1–2): features (G, D) of its patches, text embeddings (M, D) in the same space.

    ``candidates`` (G,) bool marks the tissue patches (default: all). Non-finite candidate features are an error.
    See the module docstring for every step and the degenerate cases.
    """
    cfg = SPFConfig(k=k, n_div=n_div, eq1_atol=eq1_atol)
    patch_feats = np.asarray(patch_feats)
    text_emb = np.asarray(text_emb)
    _check(patch_feats, text_emb)
    g = patch_feats.shape[0]
    cand = np.ones(g, dtype=bool) if candidates is None else np.asarray(candidates, dtype=bool)
    if cand.shape != (g,):
        raise SPFError(f"candidates mask has shape {cand.shape}, expected ({g},)")
    relevance = np.full(g, np.nan, dtype=np.float32)
    kept = np.zeros(g, dtype=bool)
    diverse = np.zeros(g, dtype=bool)
    idx = np.flatnonzero(cand)
    if idx.size == 0:
        return SPFResult(np.zeros(0, dtype=np.int64), relevance, kept, diverse, float("nan"), float("nan"))
    f = patch_feats[idx]
    if not np.isfinite(f).all():
        raise SPFError("patch features of tissue patches contain NaN or inf")
    fh = l2_normalize(f)
    th = l2_normalize(text_emb)

    keep, row_mean, mu, tau = eq1_redundancy(fh, cfg.eq1_atol)
    fallback = not keep.any()
    if fallback:
        keep[:] = True
    surv = np.flatnonzero(keep)  # positions within idx
    kept[idx[surv]] = True

    if cfg.n_div and surv.size > cfg.n_div:
        start = int(np.argmin(row_mean[surv]))  # most atypical survivor; argmin → lowest index on ties
        div_pos = surv[farthest_point_sampling(fh[surv], cfg.n_div, start)]
    else:
        div_pos = surv
    diverse[idx[div_pos]] = True

    rel = eq2_relevance(fh, th)
    relevance[idx] = rel.astype(np.float32)
    div_sorted = np.sort(div_pos)  # rank ties by lowest patch index
    order = np.argsort(-rel[div_sorted], kind="stable")[: cfg.k]
    selected = idx[div_sorted[order]].astype(np.int64)
    return SPFResult(selected, relevance, kept, diverse, tau, mu, fallback)


@dataclass
class SPFBatch:
    """SPF over R regions, in the store's layout: selected (R, k) int32 −1 padded, relevance (R, G) float32,
    kept_eq1 (R, G) bool, diverse (R, G) bool, tau (R,) float32."""

    selected: np.ndarray
    relevance: np.ndarray
    kept_eq1: np.ndarray
    diverse: np.ndarray
    tau: np.ndarray


def spf_select_regions(
    patch_feats: np.ndarray,
    text_emb: np.ndarray,
    tissue: np.ndarray,
    cfg: SPFConfig | None = None,
) -> SPFBatch:
    """Apply :func:`spf_select` to each region of features (R, G, D) with tissue mask (R, G)."""
    cfg = cfg or SPFConfig()
    patch_feats = np.asarray(patch_feats)
    if patch_feats.ndim != 3:
        raise SPFError(f"region features must be (R, G, D), got shape {patch_feats.shape}")
    r, g, _ = patch_feats.shape
    tissue = np.asarray(tissue, dtype=bool)
    if tissue.shape != (r, g):
        raise SPFError(f"tissue mask has shape {tissue.shape}, expected {(r, g)}")
    out = SPFBatch(
        selected=np.full((r, cfg.k), -1, dtype=np.int32),
        relevance=np.full((r, g), np.nan, dtype=np.float32),
        kept_eq1=np.zeros((r, g), dtype=bool),
        diverse=np.zeros((r, g), dtype=bool),
        tau=np.full(r, np.nan, dtype=np.float32),
    )
    for i in range(r):
        res = spf_select(patch_feats[i], text_emb, cfg.k, cfg.n_div, tissue[i], cfg.eq1_atol)
        fill_row(out, i, res)
    return out


def fill_row(out: SPFBatch, i: int, res: SPFResult) -> None:
    """Write one region's :class:`SPFResult` into row ``i`` of ``out`` (selected padded with −1)."""
    out.selected[i] = -1
    out.selected[i, : res.selected.size] = res.selected
    out.relevance[i] = res.relevance
    out.kept_eq1[i] = res.kept_eq1
    out.diverse[i] = res.diverse
    out.tau[i] = res.tau
