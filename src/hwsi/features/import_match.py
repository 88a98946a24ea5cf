"""Matching foreign patch positions to a store's patch grid, and saying why they do not match
(docs/formats-features.md, "Matching").

Positions are compared by patch CENTRE (top-left + half the patch's own side), so a foreign footprint that differs
slightly from ours (TRIDENT's magnification rule) is compared where the two patches overlap most; for equal sides
this is the top-left distance.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def match_coords(
    foreign: np.ndarray, ours: np.ndarray, max_dist: float
) -> tuple[np.ndarray, np.ndarray, int]:
    """Match foreign positions (N, 2) to our flat positions (M, 2) in Chebyshev distance ≤ ``max_dist``.

    Returns (target (N,) int64 index into ours or −1, distance (N,), number of duplicates dropped). When several
    foreign rows hit one of our patches, the nearest (then the first) keeps it.
    """
    from scipy.spatial import cKDTree

    n = len(foreign)
    target = np.full(n, -1, dtype=np.int64)
    dist = np.full(n, np.inf)
    if n == 0 or len(ours) == 0:
        return target, dist, 0
    tree = cKDTree(np.asarray(ours, dtype=np.float64))
    d, j = tree.query(np.asarray(foreign, dtype=np.float64), k=1, p=np.inf)
    ok = d <= max_dist
    target[ok] = j[ok]
    dist[ok] = d[ok]
    # resolve duplicates: order by (target, distance, row) and keep the first of each target
    idx = np.flatnonzero(ok)
    order = idx[np.lexsort((idx, dist[idx], target[idx]))]
    first = np.ones(len(order), dtype=bool)
    first[1:] = target[order][1:] != target[order][:-1]
    dup = order[~first]
    target[dup] = -1
    return target, dist, int(len(dup))


def grid_step(coords: np.ndarray) -> tuple[int, float] | None:
    """The commonest positive step between neighbouring top-lefts of one row (same y) or column (same x), and the
    share of neighbour steps equal to it; None with fewer than two neighbours. CLAM and TRIDENT step by the patch
    side unless patches overlap (TRIDENT ``overlap``, CLAM ``step_size``)."""
    c = np.asarray(coords, np.int64)
    steps = []
    for axis in (0, 1):
        other = 1 - axis
        s = c[np.lexsort((c[:, axis], c[:, other]))]
        same = s[1:, other] == s[:-1, other]
        d = (s[1:, axis] - s[:-1, axis])[same]
        steps.append(d[d > 0])
    d = np.concatenate(steps)
    if len(d) == 0:
        return None
    vals, counts = np.unique(d, return_counts=True)
    k = int(np.argmax(counts))
    return int(vals[k]), float(counts[k] / len(d))


def grid_offset(coords: np.ndarray, side: float) -> tuple[float, float]:
    """Median signed offset (x, y) of top-lefts from the nearest multiple of ``side`` (hwsi's grid starts at (0, 0)
    and steps by the patch side), in level-0 px, each in [-side/2, side/2]."""
    c = np.asarray(coords, np.float64)
    r = c - np.rint(c / side) * side
    return float(np.median(r[:, 0])), float(np.median(r[:, 1]))


def px(v: float) -> str:
    """A level-0 size for a message: one decimal at most (486.5, 512)."""
    return f"{round(float(v), 1):g}"


@dataclass
class GridFacts:
    """What the diagnosis needs about the store (level-0 px)."""

    width: int
    height: int
    patch_side: float
    n_regions: int
    tolerance: float  # fraction of a patch side
    retile_mpp: float | None = None  # the --target-mpp at which hwsi's grid would be the foreign one


def diagnose(coords: np.ndarray, unmatched: np.ndarray, facts: GridFacts) -> str:
    """Why the ``unmatched`` rows (bool (N,)) of ``coords`` found no patch: the most likely cause first."""
    c = np.asarray(coords, np.int64)
    n = len(c)
    if n == 0:
        return "the file has no patches"
    w, h = facts.width, facts.height
    outside = (c[:, 0] < 0) | (c[:, 1] < 0) | (c[:, 0] >= w) | (c[:, 1] >= h)
    if outside.sum() >= 0.5 * max(1, int(unmatched.sum())):
        return (f"{int(outside.sum())} of {n} coordinates lie outside the slide ({w}×{h} level-0 px; they span "
                f"x {c[:, 0].min()}–{c[:, 0].max()}, y {c[:, 1].min()}–{c[:, 1].max()}): wrong slide, or "
                "coordinates not in level-0 pixels")
    side = facts.patch_side
    step = grid_step(c)
    if step is not None and abs(step[0] - side) > 1.0:
        fix = (f"re-tile with --target-mpp {facts.retile_mpp:.4g} to put the store on the foreign grid, or "
               if facts.retile_mpp else "")
        return (f"the coordinates step by {step[0]} px ({step[1]:.0%} of neighbour steps) but the store's patches "
                f"are {px(side)} level-0 px (the grids drift apart by {abs(step[0] - side):.3g} px a patch): a "
                f"different patch size or level; {fix}raise --tolerance (at most 0.5) to take the nearest patch")
    dx, dy = grid_offset(c[unmatched], side)
    tol = facts.tolerance * side
    if max(abs(dx), abs(dy)) > tol:
        return (f"the foreign grid is offset from the store's by about ({dx:+.0f}, {dy:+.0f}) level-0 px, more than "
                f"--tolerance {facts.tolerance:g} of a {px(side)} px patch (CLAM starts each tissue contour's grid at "
                "the contour's corner); raise --tolerance (at most 0.5) to take the nearest patch")
    return (f"the unmatched patches lie outside the store's {facts.n_regions} tissue regions (`hwsi tile` kept less "
            "tissue than the foreign tool, or the slides differ)")
