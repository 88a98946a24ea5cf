"""Undo watershed over-splitting: merge adjacent pieces whose union is convex (docs/cells.md, step 5).

A distance-transform watershed seeds one nucleus per dome of the distance map. A large, elongated or kidney-shaped
nucleus has several domes and is cut into pieces although nothing in the image separates them; two touching round
nuclei also give two domes, but their union has a waist. The solidity (area / convex-hull area) of the union tells
the two apart without any length scale: pieces of one convex nucleus make a union about as solid as each piece,
touching nuclei make a union with a notch on both sides of the contact.
"""

from __future__ import annotations

import cv2
import numpy as np


def adjacent_label_pairs(labels: np.ndarray) -> np.ndarray:
    """(K, 2) sorted unique pairs (a < b) of non-zero labels that touch (4-neighbourhood)."""
    found = []
    for x, y in ((labels[:, :-1], labels[:, 1:]), (labels[:-1, :], labels[1:, :])):
        touch = (x > 0) & (y > 0) & (x != y)
        found.append(np.stack([np.minimum(x[touch], y[touch]), np.maximum(x[touch], y[touch])], axis=1))
    pairs = np.concatenate(found)
    return np.unique(pairs, axis=0) if len(pairs) else pairs.reshape(0, 2)


def _solidity(points_xy: np.ndarray) -> float:
    """Pixel count over the digital convex-hull area (hull of pixel centres + P/2 + 1, as in
    :func:`hwsi.cells.morphology.convex_hull_areas`)."""
    if len(points_xy) < 3:
        return 1.0
    hull = cv2.convexHull(points_xy)
    return len(points_xy) / (cv2.contourArea(hull) + cv2.arcLength(hull, True) / 2.0 + 1.0)


def merge_convex_pieces(labels: np.ndarray, min_solidity: float) -> np.ndarray:
    """Merge touching instances while the union of a pair has solidity ≥ ``min_solidity``.

    Rounds of greedy merging: each round scores every touching pair of current groups, merges the disjoint pairs
    in order of decreasing union solidity (ties by label), and repeats until no pair qualifies. Returns a label
    image whose merged pieces carry the smallest label of their group (labels need not be consecutive).
    """
    pairs = adjacent_label_pairs(labels)
    if len(pairs) == 0 or min_solidity >= 1:
        return labels
    n = int(labels.max())
    flat = labels.ravel()
    fg = np.flatnonzero(flat)
    order = fg[np.argsort(flat[fg], kind="stable")]
    starts = np.searchsorted(flat[order], np.arange(n + 2))
    w = labels.shape[1]
    points = np.stack([order % w, order // w], axis=1).astype(np.int32)
    members: dict[int, list[int]] = {i: [i] for i in range(1, n + 1)}
    root = np.arange(n + 1)

    def group_points(g: int) -> np.ndarray:
        return np.concatenate([points[starts[i]:starts[i + 1]] for i in members[g]])

    while True:
        scored = []
        seen: set[tuple[int, int]] = set()
        for a, b in pairs:
            ra, rb = int(root[a]), int(root[b])
            key = (min(ra, rb), max(ra, rb))
            if ra == rb or key in seen:
                continue
            seen.add(key)
            s = _solidity(np.concatenate([group_points(key[0]), group_points(key[1])]))
            if s >= min_solidity:
                scored.append((-s, key[0], key[1]))
        if not scored:
            break
        used: set[int] = set()
        for _, a, b in sorted(scored):
            if a in used or b in used:
                continue
            used |= {a, b}
            members[a] += members.pop(b)
            root[members[a]] = a
    root[0] = 0
    return root[labels].astype(np.int32, copy=False)
