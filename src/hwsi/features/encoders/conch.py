"""CONCH (CoCa, ViT-B/16) image and text towers, re-implemented on plain torch with CONCH's state-dict layout.

Image tower ``conch_vit_b16`` (CONCH ``encode_image(proj_contrast=False, normalize=False)``, 512-d):
  ``visual.trunk.*``: timm ViT-B/16 — width 768, depth 12, 12 heads, MLP 4x, qkv bias, LayerNorm eps 1e-6,
  position table for 448 px (28x28 + CLS; resampled timm-style, bicubic + antialias, for other input sizes),
  ``forward_features`` output (all tokens after the final norm);
  ``visual.attn_pool_contrast.*``: attentional pooler — 1 learned query (512-d), LayerNorm'd query and keys
  (``ln_q``, ``ln_k``, eps 1e-5), 8-head cross-attention with separate q/k/v weights (k, v from 768-d tokens);
  ``visual.ln_contrast``: LayerNorm(512) on the pooled query -> the embedding we return;
  ``visual.proj_contrast`` (512x512): the contrastive projection, applied only with ``project=True``.
  ``visual.attn_pool_caption.*`` / ``visual.ln_caption.*`` (the captioning pooler), ``text.*``, ``text_decoder.*``
  and ``logit_scale`` are not part of the image encoder and are ignored when loading.
  Input: 448 px, bicubic resize + centre crop, CLIP mean/std.

Text tower ``conch_text`` (CONCH ``encode_text(normalize=False)``, 512-d):
  ``text.token_embedding`` (32007x768), ``text.positional_embedding`` (128x768), ``text.cls_emb`` (768),
  12 pre-norm residual blocks ``text.transformer.resblocks.{i}`` (``ln_1``, ``attn.in_proj_weight/bias``,
  ``attn.out_proj``, ``ln_2``, ``mlp.c_fc``, ``mlp.c_proj``; 12 heads, GELU, eps 1e-5), ``text.ln_final``,
  ``text.text_projection`` (768x512). Causal self-attention; a CLS embedding is appended after the (127) tokens and
  attends under CONCH's pad mask; the output is ``ln_final(cls) @ text_projection``.
  Tokenizer: CONCH ships a byte-level BPE ``tokenizer.json`` (special tokens ``<start_of_text>``, ``<end_of_text>``,
  ``<pad>``); give its local path (``tokenizer=...``), or put it next to the checkpoint. Texts are padded/truncated
  to ``context_length - 1`` = 127 tokens (the last position is the CLS).

Checkpoints: the local CONCH ``pytorch_model.bin`` (a flat state dict, optionally under ``state_dict`` and/or with
``module.`` prefixes), read with ``torch.load(weights_only=True)``; every weight of the tower must be present.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hwsi.features.encoders.base import (
    CLIP_MEAN,
    CLIP_STD,
    EncoderError,
    ImageEncoder,
    check_patch_grid,
    make_config,
    seeded_init,
)
from hwsi.features.encoders.checkpoints import check_not_lfs_pointer, load_foreign_state_dict, read_state_dict
from hwsi.features.encoders.registry import register_encoder, register_text_encoder
from hwsi.features.encoders.text import TextEncoder
from hwsi.features.encoders.vit import VisionTransformer

# ------------------------------------------------------------------------------------------ image tower


@dataclass
class ConchImageConfig:
    """CONCH ViT-B/16 image tower; ``pos_grid`` is the stored position table's grid (448/16 = 28)."""

    input_size: int = 448
    patch_size: int = 16
    width: int = 768
    depth: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0
    pos_grid: int = 28
    ln_eps: float = 1e-6
    embed_dim: int = 512
    pool_heads: int = 8
    n_queries: int = 1
    project: bool = False
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    seed: int = 0


class CrossAttention(nn.Module):
    """Multi-head attention of queries (d) over a context (kdim) with separate q/k/v weights.

    Parameter names and math follow ``torch.nn.MultiheadAttention`` when ``kdim != embed_dim``
    (``q_proj_weight``, ``k_proj_weight``, ``v_proj_weight``, ``in_proj_bias``, ``out_proj``).
    """

    def __init__(self, dim: int, kdim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"pooler width {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.q_proj_weight = nn.Parameter(torch.empty(dim, dim))
        self.k_proj_weight = nn.Parameter(torch.empty(dim, kdim))
        self.v_proj_weight = nn.Parameter(torch.empty(dim, kdim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        for w in (self.q_proj_weight, self.k_proj_weight, self.v_proj_weight):
            nn.init.xavier_uniform_(w)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        """q (B, Lq, d), kv (B, L, kdim) -> (B, Lq, d)."""
        bq, bk, bv = self.in_proj_bias.chunk(3)
        b, lq, d = q.shape
        h = self.heads
        qh = F.linear(q, self.q_proj_weight, bq).view(b, lq, h, d // h).transpose(1, 2)
        kh = F.linear(kv, self.k_proj_weight, bk).view(b, -1, h, d // h).transpose(1, 2)
        vh = F.linear(kv, self.v_proj_weight, bv).view(b, -1, h, d // h).transpose(1, 2)
        out = F.scaled_dot_product_attention(qh, kh, vh)
        return self.out_proj(out.transpose(1, 2).reshape(b, lq, d))


class AttentionalPooler(nn.Module):
    """Learned queries attending over LayerNorm'd tokens (CONCH/CoCa ``AttentionalPooler``)."""

    def __init__(self, dim: int, context_dim: int, heads: int, n_queries: int) -> None:
        super().__init__()
        self.query = nn.Parameter(torch.randn(n_queries, dim))
        self.attn = CrossAttention(dim, context_dim, heads)
        self.ln_q = nn.LayerNorm(dim)
        self.ln_k = nn.LayerNorm(context_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L, context_dim) -> (B, n_queries, dim)."""
        q = self.ln_q(self.query).unsqueeze(0).expand(x.shape[0], -1, -1)
        return self.attn(q, self.ln_k(x))


class ConchImageEncoder(ImageEncoder):
    """CONCH image tower -> 512-d pre-projection embedding (``project=True``: after ``proj_contrast``)."""

    def __init__(self, config: ConchImageConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_dim = config.embed_dim
        with seeded_init(config.seed):
            self.trunk = VisionTransformer.from_config(config, pos_interp="timm")
            self.attn_pool_contrast = AttentionalPooler(config.embed_dim, config.width, config.pool_heads, config.n_queries)
            self.ln_contrast = nn.LayerNorm(config.embed_dim)
            self.proj_contrast = nn.Parameter(config.width**-0.5 * torch.randn(config.embed_dim, config.embed_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.trunk.forward_tokens(x)
        pooled = self.ln_contrast(self.attn_pool_contrast(tokens)[:, 0])
        return pooled @ self.proj_contrast if self.config.project else pooled


def _strip_module(key: str) -> str:
    return key[len("module.") :] if key.startswith("module.") else key


_CONCH_VISUAL_OWN = ("trunk.", "attn_pool_contrast.", "ln_contrast.")
_CONCH_VISUAL_IGNORED = ("attn_pool_caption.", "ln_caption.")


def conch_visual_key_map(key: str) -> str | None:
    """CONCH key -> ConchImageEncoder key. ``visual.X`` -> ``X``; caption pooler, text towers ignored.

    Unknown ``visual.*`` keys are passed through so that a strict load reports them.
    """
    k = _strip_module(key)
    if not k.startswith("visual."):
        return None
    sub = k[len("visual.") :]
    if sub.startswith(_CONCH_VISUAL_IGNORED):
        return None
    return sub


def load_conch_image_checkpoint(model: ConchImageEncoder, path: str | Path) -> None:
    """Load CONCH's ``pytorch_model.bin`` (or a ``.safetensors`` with the same keys) into the image tower."""
    state = read_state_dict(path)
    load_foreign_state_dict(model, state, conch_visual_key_map, strict=True, source=path)


@register_encoder(
    "conch_vit_b16",
    description="CONCH image tower (ViT-B/16, 448 px, attentional pooler, 512-d pre-projection)",
    tiny={"width": 64, "depth": 2, "heads": 4, "input_size": 64, "pos_grid": 4, "embed_dim": 32, "pool_heads": 4},
)
def build_conch_vit_b16(checkpoint: Path | None = None, **overrides: Any) -> ConchImageEncoder:
    """CONCH image tower; ``checkpoint`` is the local CONCH ``pytorch_model.bin`` (random weights without)."""
    cfg = make_config(ConchImageConfig, overrides, "conch_vit_b16")
    check_patch_grid(cfg, "conch_vit_b16")
    if cfg.embed_dim == cfg.width:
        # CONCH's pooler stores separate q/k/v weights because 512 != 768; equal sizes would change the layout
        raise EncoderError("conch_vit_b16: embed_dim must differ from width (CONCH's pooler key layout)")
    model = ConchImageEncoder(cfg)
    if checkpoint is not None:
        load_conch_image_checkpoint(model, checkpoint)
    return model


# ------------------------------------------------------------------------------------------- text tower


@dataclass
class ConchTextConfig:
    """CONCH text tower. ``tokenizer``: path to CONCH's tokenizer JSON (or a folder holding ``tokenizer.json``)."""

    context_length: int = 128
    vocab_size: int = 32007
    width: int = 768
    heads: int = 12
    layers: int = 12
    mlp_ratio: float = 4.0
    embed_dim: int = 512
    pad_id: int = 0
    tokenizer: str = ""
    seed: int = 0


class TextSelfAttention(nn.Module):
    """Self-attention with a fused ``in_proj_weight`` (nn.MultiheadAttention layout) and an additive mask."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        nn.init.normal_(self.in_proj_weight, std=dim**-0.5)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        h = self.heads
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias).view(b, n, 3, h, d // h).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], attn_mask=mask)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, d))


class TextBlock(nn.Module):
    """x + attn(ln_1(x)); x + mlp(ln_2(x)) with mlp = c_fc -> GELU -> c_proj."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim)
        self.attn = TextSelfAttention(dim, heads)
        self.ln_2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(dim, hidden))
        self.mlp.add_module("gelu", nn.GELU())
        self.mlp.add_module("c_proj", nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), mask)
        return x + self.mlp(self.ln_2(x))


class _Resblocks(nn.Module):
    def __init__(self, dim: int, heads: int, layers: int, mlp_ratio: float) -> None:
        super().__init__()
        self.resblocks = nn.ModuleList([TextBlock(dim, heads, mlp_ratio) for _ in range(layers)])


def _find_tokenizer_file(path: Path) -> Path | None:
    if path.is_file():
        return path
    if path.is_dir():
        for name in ("tokenizer.json", "conch_byte_level_bpe_uncased.json"):
            if (path / name).is_file():
                return path / name
    return None


class ConchTextEncoder(TextEncoder):
    """CONCH text tower -> 512-d ``encode_text(normalize=False)`` embedding (keys: CONCH's minus ``text.``)."""

    def __init__(self, config: ConchTextConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_dim = config.embed_dim
        w = config.width
        with seeded_init(config.seed):
            self.token_embedding = nn.Embedding(config.vocab_size, w)
            self.positional_embedding = nn.Parameter(torch.randn(config.context_length, w) * 0.01)
            self.cls_emb = nn.Parameter(torch.randn(w) * 0.01)
            nn.init.normal_(self.token_embedding.weight, std=0.02)
            self.transformer = _Resblocks(w, config.heads, config.layers, config.mlp_ratio)
            self.ln_final = nn.LayerNorm(w)
            self.text_projection = nn.Parameter(torch.randn(w, config.embed_dim) * w**-0.5)
        self._tokenizer: Any = None

    # -- tokenization
    @property
    def tokenizer(self) -> Any:
        """CONCH's byte-level BPE tokenizer from the local file given as ``tokenizer``."""
        if self._tokenizer is None:
            if not self.config.tokenizer:
                raise EncoderError(
                    "conch_text needs CONCH's tokenizer file: pass tokenizer=PATH (conch_byte_level_bpe_uncased.json "
                    "or a folder with tokenizer.json), or put tokenizer.json next to the checkpoint"
                )
            f = _find_tokenizer_file(Path(self.config.tokenizer))
            if f is None:
                raise EncoderError("no tokenizer JSON here", self.config.tokenizer)
            check_not_lfs_pointer(f)
            from transformers import PreTrainedTokenizerFast

            try:
                self._tokenizer = PreTrainedTokenizerFast(
                    tokenizer_file=str(f), bos_token="<start_of_text>", eos_token="<end_of_text>", pad_token="<pad>"
                )
            except Exception as exc:
                raise EncoderError(f"cannot load tokenizer ({exc})", f) from exc
        return self._tokenizer

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """{'input_ids': (N, context_length - 1)} padded with <pad> / truncated, special tokens added."""
        tok = self.tokenizer(
            texts,
            max_length=self.config.context_length - 1,
            add_special_tokens=True,
            truncation=True,
            padding="max_length",
            return_token_type_ids=False,
            return_tensors="pt",
        )
        return {"input_ids": tok["input_ids"].to(self.token_embedding.weight.device)}

    # -- math
    def attention_mask(self, ids: torch.Tensor) -> torch.Tensor:
        """Additive (N, 1, L+1, L+1) mask: causal, plus CONCH's CLS-row pad mask (shifted by one, as in CONCH)."""
        n, length = ids.shape
        s = length + 1
        causal = torch.full((s, s), float("-inf"), device=ids.device).triu_(1)
        keep = F.pad((ids != self.config.pad_id).unsqueeze(1), (1, 0, length, 0), value=True)  # (N, s, s)
        cls_mask = torch.zeros(keep.shape, device=ids.device).masked_fill_(~keep, float("-inf"))
        return (causal.unsqueeze(0) + cls_mask).unsqueeze(1)

    def forward_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids (N, L) with L <= context_length - 1 -> (N, embed_dim)."""
        if ids.shape[1] + 1 > self.config.context_length:
            raise EncoderError(f"conch_text: {ids.shape[1]} tokens + CLS exceed context {self.config.context_length}")
        n, length = ids.shape
        x = self.token_embedding(ids)
        x = torch.cat([x, self.cls_emb.view(1, 1, -1).expand(n, 1, -1)], dim=1)
        x = x + self.positional_embedding[: length + 1]
        mask = self.attention_mask(ids).to(x.dtype)
        for blk in self.transformer.resblocks:
            x = blk(x, mask)
        return self.ln_final(x[:, -1]) @ self.text_projection

    def forward_tokens(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.forward_ids(tokens["input_ids"])


def conch_text_key_map(key: str) -> str | None:
    """CONCH key -> ConchTextEncoder key: ``text.X`` -> ``X``; everything else ignored."""
    k = _strip_module(key)
    return k[len("text.") :] if k.startswith("text.") else None


def load_conch_text_checkpoint(model: ConchTextEncoder, path: str | Path) -> None:
    """Load the text tower of CONCH's ``pytorch_model.bin`` into ``model``."""
    state = read_state_dict(path)
    load_foreign_state_dict(model, state, conch_text_key_map, strict=True, source=path)


@register_text_encoder(
    "conch_text",
    description="CONCH text tower (causal transformer + CLS, 512-d); local weights and tokenizer",
    tiny={"vocab_size": 97, "width": 32, "heads": 4, "layers": 2, "embed_dim": 24, "context_length": 16},
)
def build_conch_text(checkpoint: Path | None = None, **overrides: Any) -> ConchTextEncoder:
    """CONCH text tower; ``checkpoint`` is CONCH's ``pytorch_model.bin`` (random weights without)."""
    cfg = make_config(ConchTextConfig, overrides, "conch_text")
    if cfg.width % cfg.heads:
        raise EncoderError(f"conch_text: width {cfg.width} is not divisible by heads {cfg.heads}")
    if checkpoint is not None and not cfg.tokenizer:
        found = _find_tokenizer_file(Path(checkpoint).parent)
        if found is not None:
            cfg.tokenizer = str(found)
    model = ConchTextEncoder(cfg)
    if checkpoint is not None:
        load_conch_text_checkpoint(model, checkpoint)
    return model
