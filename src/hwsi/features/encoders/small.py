"""``hwsi_small_patch``: the default CPU patch encoder, a small CNN image tower in MiniLM's 384-d text space.

It sees a patch downsampled to 64x64 (a 256 px patch at 0.5 µm/px -> 2 µm/px: glands and tissue layout are
visible, single-nucleus detail is not — which is the point, see docs/design.md §8). It plays CONCH's role where CONCH's
weights are absent: trained CLIP-style on SynthPath patch captions against the FROZEN MiniLM text encoder
(``hwsi train-encoder``), its embeddings can be compared to MiniLM text embeddings directly (SPF Eq. 2, zero-shot
classification). Its 384-d output is also the region-encoder (ViT-4K) input on CPU when no HIPT weights are given.

Without a checkpoint the weights are random but seeded (``seed``), so features are reproducible — useful for tests,
meaningless for text comparison. Architecture: 4 stride-2 conv stages (3x3 conv, GroupNorm, GELU; then a 3x3
residual conv), global average + max pooling, a 2-layer MLP head to ``embed_dim``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hwsi.features.encoders.base import EncoderError, ImageEncoder, make_config, seeded_init
from hwsi.features.encoders.registry import register_encoder


@dataclass
class SmallPatchConfig:
    """Small patch CNN. ``text_encoder`` names the text space it was trained against (recorded, not loaded)."""

    input_size: int = 64
    channels: tuple[int, ...] = (32, 64, 128, 192)  # one stride-2 stage per entry
    hidden: int = 512
    embed_dim: int = 384
    groups: int = 8
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.25, 0.25, 0.25)
    text_encoder: str = "minilm"
    seed: int = 0


class _Stage(nn.Module):
    """Stride-2 3x3 conv -> GN -> GELU, then x + GELU(GN(conv3x3(x)))."""

    def __init__(self, cin: int, cout: int, groups: int) -> None:
        super().__init__()
        self.down = nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False)
        self.norm1 = nn.GroupNorm(min(groups, cout), cout)
        self.conv = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.norm2 = nn.GroupNorm(min(groups, cout), cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.norm1(self.down(x)))
        return x + F.gelu(self.norm2(self.conv(x)))


class SmallPatchEncoder(ImageEncoder):
    """CNN (64 px input) -> ``embed_dim`` embedding (not normalised; compare with cosine)."""

    def __init__(self, config: SmallPatchConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_dim = config.embed_dim
        with seeded_init(config.seed):
            chans = (3, *config.channels)
            self.stages = nn.Sequential(*[_Stage(chans[i], chans[i + 1], config.groups) for i in range(len(config.channels))])
            self.head = nn.Sequential(
                nn.Linear(2 * chans[-1], config.hidden), nn.GELU(), nn.Linear(config.hidden, config.embed_dim)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.stages(x)
        pooled = torch.cat([f.mean(dim=(2, 3)), f.amax(dim=(2, 3))], dim=1)
        return self.head(pooled)


@register_encoder(
    "hwsi_small_patch",
    description="small CNN patch encoder (64 px, 384-d) trained against frozen MiniLM (hwsi train-encoder)",
    tiny={"channels": (8, 8, 16, 16), "hidden": 32, "input_size": 32},
)
def build_small_patch(checkpoint: Path | None = None, **overrides: Any) -> SmallPatchEncoder:
    """The default CPU patch encoder; trained weights come from an ``hwsi train-encoder`` folder."""
    cfg = make_config(SmallPatchConfig, overrides, "hwsi_small_patch")
    if len(cfg.channels) < 1:
        raise EncoderError("hwsi_small_patch: channels must name at least one stage")
    if checkpoint is not None:
        raise EncoderError(
            "hwsi_small_patch loads only hwsi checkpoint folders (encoder.json + model.safetensors, "
            "written by `hwsi train-encoder`)",
            checkpoint,
        )
    return SmallPatchEncoder(cfg)
