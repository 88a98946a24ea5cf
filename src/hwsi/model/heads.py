"""Stage-1 alignment heads: one linear map per scale into the text encoder's space, L2-normalised.

docs/design.md §5 reading of Eq. 6–9: the paper writes the stage-1 losses on z while freezing the LLM projectors, so z
here is the unit-norm output of these per-scale heads (CLIP-style), separate from the projectors A_s::

    z_c = norm(H_c c_ij),  z_p = norm(H_p f_ij),  z_r = norm(H_r r_i),  z_WSI = norm(H_WSI f_WSI)

``AlignmentHeads(dims, text_dim)(HierarchyOutput) -> AlignedTokens`` keeps the hierarchy's masks. The patch
head also gives the evidence signal of :meth:`hwsi.model.chat.ChatSession.relevance` (cosine between a question's
text embedding and z_p).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from hwsi.model.hierarchy import HierarchyOutput


@dataclass
class AlignedTokens:
    """Unit vectors in the text space; None where the scale is off."""

    cells: torch.Tensor | None  # (B, R, k, D)
    patches: torch.Tensor | None  # (B, R, k, D)
    regions: torch.Tensor | None  # (B, R, D)
    slide: torch.Tensor | None  # (B, D)
    patch_mask: torch.Tensor  # (B, R, k)
    region_mask: torch.Tensor  # (B, R)
    cell_present: torch.Tensor  # (B, R, k)


class AlignmentHeads(nn.Module):
    """Per-scale Linear(in_dim -> text_dim) followed by L2 normalisation."""

    def __init__(self, dims: dict[str, int], text_dim: int) -> None:
        super().__init__()
        self.text_dim = text_dim
        self.heads = nn.ModuleDict({s: nn.Linear(d, text_dim) for s, d in dims.items()})

    def embed(self, scale: str, x: torch.Tensor) -> torch.Tensor:
        """Unit-norm embedding of raw tokens ``x`` (..., in_dim) of ``scale``."""
        return F.normalize(self.heads[scale](x), dim=-1)

    def forward(self, h: HierarchyOutput) -> AlignedTokens:
        def run(scale: str) -> torch.Tensor | None:
            x = h.get(scale)
            return None if x is None or scale not in self.heads else self.embed(scale, x)

        return AlignedTokens(run("cells"), run("patches"), run("regions"), run("slide"),
                             h.patch_mask, h.region_mask, h.cell_present)
