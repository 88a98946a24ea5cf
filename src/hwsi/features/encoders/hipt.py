"""``hipt_vit256``: HIPT's ViT-256 (DINO ViT-S/16) patch encoder, 384-d CLS output.

Architecture (HIPT ``vit_small``): patch 16, width 384, depth 12, 6 heads, MLP ratio 4, qkv bias, LayerNorm eps 1e-6,
position table for a 14x14 grid (+CLS, DINO pre-training at 224 px) interpolated bicubically to the 16x16 grid of a
256 px input the way DINO's ``interpolate_pos_encoding`` does; mean = std = 0.5 per channel.

Weights: HIPT's ``vit256_small_dino.pth`` — a full DINO training checkpoint as ``main_dino.py`` saves it
(``student``, ``teacher``, ``optimizer``, ``epoch``, ``args`` (an ``argparse.Namespace``), ``dino_loss`` and, with
fp16, ``fp16_scaler``; ~704 MB). As HIPT's own ``get_vit256`` does, the ``teacher`` entry is used and ``module.`` /
``backbone.`` prefixes are stripped (the DINO projection head ``head.*`` is ignored here); a bare state dict works
too. Read by :func:`~hwsi.features.encoders.checkpoints.read_state_dict` (weights only, ``argparse.Namespace`` the
one extra global; a Git LFS pointer is named as such) and copied by :func:`load_foreign_state_dict` (every ViT
weight must be present).

On CPU without these weights, the region (ViT-4K) input is the small patch encoder's 384-d embedding
(``hwsi_small_patch``): a random ViT-S/16 costs ~36 s per 4096² region here and carries no morphology.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hwsi.features.encoders.base import (
    EncoderError,
    ImageEncoder,
    check_patch_grid,
    is_own_checkpoint,
    make_config,
    seeded_init,
)
from hwsi.features.encoders.checkpoints import load_foreign_state_dict, read_state_dict
from hwsi.features.encoders.registry import register_encoder
from hwsi.features.encoders.vit import VisionTransformer


@dataclass
class HiptViT256Config:
    """HIPT ViT-256 (DINO ViT-S/16). ``pos_grid`` is the stored table's grid (224/16 = 14)."""

    input_size: int = 256
    patch_size: int = 16
    width: int = 384
    depth: int = 12
    heads: int = 6
    mlp_ratio: float = 4.0
    pos_grid: int = 14
    ln_eps: float = 1e-6
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    seed: int = 0


class HiptViT256(ImageEncoder):
    """DINO ViT-S/16 returning the CLS token; the trunk's keys are DINO's (no prefix)."""

    def __init__(self, config: HiptViT256Config) -> None:
        super().__init__()
        self.config = config
        self.embed_dim = config.width
        with seeded_init(config.seed):
            self.vit = VisionTransformer.from_config(config, pos_interp="dino")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.vit(x)


def hipt_key_map(key: str) -> str | None:
    """DINO/HIPT teacher key -> our key: strip ``module.`` and ``backbone.``; ignore the DINO ``head.*``."""
    k = key.replace("module.", "", 1) if key.startswith("module.") else key
    k = k.replace("backbone.", "", 1) if k.startswith("backbone.") else k
    if k.startswith("head.") or k.startswith("head_"):
        return None
    return "vit." + k


def load_hipt_checkpoint(model: HiptViT256, path: str | Path, checkpoint_key: str = "teacher") -> None:
    """Load a HIPT/DINO ViT-256 checkpoint (``teacher`` dict, or a bare state dict) into ``model``."""
    state = read_state_dict(path, unwrap=(checkpoint_key, "state_dict", "model"))
    load_foreign_state_dict(model, state, hipt_key_map, strict=True, source=path)


@register_encoder(
    "hipt_vit256",
    description="HIPT ViT-256 (DINO ViT-S/16, 384-d CLS, 256 px); weights: vit256_small_dino.pth",
    tiny={"width": 48, "depth": 2, "heads": 3, "input_size": 64, "pos_grid": 3},
)
def build_hipt_vit256(checkpoint: Path | None = None, **overrides: Any) -> HiptViT256:
    """HIPT ViT-256; ``checkpoint`` is HIPT's ``vit256_small_dino.pth`` (random weights, seeded, without)."""
    cfg = make_config(HiptViT256Config, overrides, "hipt_vit256")
    check_patch_grid(cfg, "hipt_vit256")
    model = HiptViT256(cfg)
    if checkpoint is not None:
        if is_own_checkpoint(checkpoint):  # pragma: no cover - create_encoder handles own folders
            raise EncoderError("own-format checkpoints are loaded by create_encoder", checkpoint)
        load_hipt_checkpoint(model, checkpoint)
    return model
