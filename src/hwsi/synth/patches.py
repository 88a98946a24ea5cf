"""Patch–caption pairs for training the small CLIP-style patch encoder (docs/design.md §5, CONCH's stand-in).

Patches come from SynthPath scenes whose patch size equals ``patch_px``; each shows one patch-level pattern
(gland, solid sheet, stroma, or background/edge). Captions describe ONLY patch-scale facts (no atypia, which the
patch encoder cannot see by design). To stay fast, ``ceil(n / 8)`` distinct patches are rendered and each is used
under the 8 flips/rotations of the square with a mild stain jitter; every sample gets its own caption.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from hwsi.synth.classes import BACKGROUND, GLAND, PATTERNS, SOLID, STROMA, SlideClasses, SynthError
from hwsi.synth.render import render_window
from hwsi.synth.scene import Scene, SceneConfig

_PREFIX = [
    "", "", "H&E image of ", "an H&E patch showing ", "histology patch: ", "photomicrograph of ",
    "a microscopic field with ", "tissue patch with ",
]
_DESC = {
    "gland": [
        "a gland with a central lumen lined by epithelial cells",
        "a glandular structure, a ring of epithelial nuclei around a pale lumen",
        "a tubular gland in fibrous stroma",
        "gland formation with an open lumen",
        "a single gland surrounded by pink stroma",
        "epithelial cells forming a gland around a clear lumen",
    ],
    "solid": [
        "a solid sheet of epithelial cells without glands",
        "densely packed epithelial cells in a solid nest",
        "solid growth of crowded cells with no lumen",
        "a sheet of tumour cells without gland formation",
        "confluent solid epithelium",
        "closely packed nuclei in a solid pattern",
    ],
    "stroma": [
        "fibrous stroma with scattered spindle cells",
        "pink collagenous stroma",
        "connective tissue with sparse spindle-shaped nuclei and a few lymphocytes",
        "eosinophilic stroma without epithelium",
        "loose fibrous tissue",
        "stromal tissue with wavy collagen fibres",
    ],
    "background": [
        "background with little or no tissue",
        "mostly empty glass at the edge of the tissue",
        "the border of the section, largely background",
        "white background",
    ],
}


@dataclass
class PatchDataset:
    """``images`` uint8 (n, P, P, 3); ``captions`` and ``labels`` (pattern names) of each image."""

    images: np.ndarray
    captions: list[str]
    labels: list[str]


def patch_caption(label: str, rng: np.random.Generator) -> str:
    """One caption of a patch-level pattern, from prefix × description paraphrases."""
    if label not in _DESC:
        raise SynthError(f"no captions for pattern {label!r}; known: {sorted(_DESC)}")
    d = _DESC[label][int(rng.integers(len(_DESC[label])))]
    p = _PREFIX[int(rng.integers(len(_PREFIX)))]
    s = p + d
    return s[0].upper() + s[1:] + ("." if rng.random() < 0.5 else "")


_DIHEDRAL = 8


def _dihedral(img: np.ndarray, k: int) -> np.ndarray:
    out = np.rot90(img, k % 4)
    return np.ascontiguousarray(out[:, ::-1] if k >= 4 else out)


def sample_patch_dataset(n: int, seed: int, patch_px: int = 256, mpp: float = 0.5,
                         mix: dict[str, float] | None = None) -> PatchDataset:
    """``n`` single patches (gland / solid / stroma / background) with varied captions, deterministic by seed.

    Args:
        n: number of samples.
        seed: random seed.
        patch_px: patch side in pixels (the scene's patch size).
        mpp: µm per pixel of the patches.
        mix: fraction of each label (default gland .35, solid .25, stroma .3, background .1).
    """
    import cv2

    if n < 1:
        raise SynthError(f"n must be >= 1, got {n}")
    mix = mix or {"gland": 0.35, "solid": 0.25, "stroma": 0.30, "background": 0.10}
    unknown = set(mix) - set(_DESC)
    if unknown:
        raise SynthError(f"unknown labels in mix: {sorted(unknown)}")
    rng = np.random.default_rng([seed, 8080])
    n_unique = math.ceil(n / _DIHEDRAL)
    names = list(mix)
    probs = np.array([mix[k] for k in names], dtype=np.float64)
    probs /= probs.sum()
    want = rng.choice(len(names), size=n_unique, p=probs)

    G = 8
    scenes = {
        "gland": Scene(SceneConfig(width=4 * G * patch_px, height=4 * G * patch_px, mpp=mpp, region_size=G * patch_px,
                                   patch_size=patch_px, seed=seed,
                                   classes=SlideClasses("adenocarcinoma_high_grade", "extensive"))),
        "solid": Scene(SceneConfig(width=4 * G * patch_px, height=4 * G * patch_px, mpp=mpp, region_size=G * patch_px,
                                   patch_size=patch_px, seed=seed + 1,
                                   classes=SlideClasses("solid_carcinoma", "extensive"))),
    }
    pools: dict[str, list[tuple[Scene, int, int]]] = {k: [] for k in names}
    code = {"gland": GLAND, "solid": SOLID, "stroma": STROMA, "background": BACKGROUND}
    for sc in scenes.values():
        pat = sc.patterns
        for lab in names:
            rr, cc = np.nonzero(pat == code[lab])
            if lab == "background":  # edge patches holding a little tissue, plus empty glass
                keep = sc.patch_tissue[rr, cc] < 0.5
                rr, cc = rr[keep], cc[keep]
            pools[lab] += [(sc, int(r), int(c)) for r, c in zip(rr, cc, strict=True)]
    images = np.empty((n, patch_px, patch_px, 3), dtype=np.uint8)
    captions: list[str] = []
    labels: list[str] = []
    i = 0
    for u in range(n_unique):
        lab = names[int(want[u])]
        pool = pools[lab]
        if not pool:
            raise SynthError(f"no {lab!r} patches in the sampling scenes (patch_px={patch_px})")
        sc, r, c = pool[int(rng.integers(len(pool)))]
        base = render_window(sc, c * patch_px, r * patch_px, patch_px, patch_px)
        for k in rng.permutation(_DIHEDRAL):
            if i >= n:
                break
            gains = rng.uniform(0.95, 1.05, 3)  # mild stain/scanner jitter, per channel through a LUT
            lut = np.clip(np.arange(256)[:, None] * gains[None, :] + 0.5, 0, 255).astype(np.uint8)
            images[i] = cv2.LUT(_dihedral(base, int(k)), lut.reshape(256, 1, 3))
            captions.append(patch_caption(lab, rng))
            labels.append(lab)
            i += 1
    assert set(labels) <= set(PATTERNS)
    return PatchDataset(images, captions, labels)
