"""Pre-norm transformer block shared by CCAF, ViT-4K and ViT_WSI.

The block is the patch encoders' one (:class:`hwsi.features.encoders.vit.Block`, a lower stage), re-exported here:
``Block(dim, n_heads, mlp_ratio=4.0, qkv_bias=True, eps=1e-6)``, ``forward(x, key_mask=None)``.

Parameter names follow the DINO/HIPT layout (``norm1``, ``attn.qkv``, ``attn.proj``, ``norm2``, ``mlp.fc1``,
``mlp.fc2``) so that HIPT's ``vit4k_xs_dino.pth`` loads into :class:`hwsi.model.vit4k.ViT4K` unchanged.

Masking: ``key_mask`` (B, N) bool, True = a real token. Padded / non-tissue tokens are excluded as attention
KEYS (they still produce outputs, which callers ignore). Every sequence here starts with a CLS token that is
always a valid key, so no softmax row is ever fully masked (no NaN).
"""

from __future__ import annotations

from torch import nn

from hwsi.features.encoders.vit import Attention, Block, Mlp

__all__ = ["Attention", "Block", "Mlp", "init_vit_weights"]


def init_vit_weights(module: nn.Module) -> None:
    """Truncated-normal(0.02) linears, zero biases, unit LayerNorms (the ViT/DINO initialisation)."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
