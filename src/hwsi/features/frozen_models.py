"""The frozen encoders of one `hwsi extract` run and the text embeddings of its SPF vocabulary (Eq. 2's t_m),
built once and used for every slide; :func:`checkpoint_identity` makes a replaced checkpoint re-run the slides."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hwsi.devices import Placement, resolve_placement
from hwsi.features.extract_config import ExtractConfig, ExtractError
from hwsi.features.vocab import load_vocabulary, vocabulary_fingerprint


def checkpoint_identity(ckpt: Path | None) -> str:
    """Cheap identity of a checkpoint (resolved path, size, mtime of each file) so a replaced file re-runs."""
    if ckpt is None:
        return ""
    p = Path(ckpt).expanduser().resolve()
    files = sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else [p]
    parts = [str(p)]
    for q in files:
        st = q.stat()
        parts.append(f"{q.name}:{st.st_size}:{st.st_mtime_ns}")
    return "|".join(parts)


@dataclass
class Models:
    """The frozen encoders and the text embeddings of one run (built once, used for every slide)."""

    patch_encoder: Any
    patch_name: str
    region_encoder: Any | None  # None = same as the patch encoder
    region_name: str
    terms: tuple[str, ...]
    text_emb: np.ndarray
    settings: dict[str, Any]
    placement: Placement = Placement("cpu", "float32", "cpu")  # where and in which dtype the encoders run

    def record(self, feature_dtype: str) -> dict[str, str]:
        """What a store and the job's batch record say about how its features were computed (docs/devices.md)."""
        return {**self.placement.record(), "feature_dtype": feature_dtype}


def load_models(cfg: ExtractConfig, log: Callable[[str], None] = print) -> Models:
    """Build the encoders named in ``cfg`` and embed the SPF vocabulary once (Eq. 2's t_m)."""
    from hwsi.features.encoders import create_encoder, create_text_encoder, parse_encoder_spec

    cfg.validate()
    place = resolve_placement(cfg.device, cfg.dtype)  # no CUDA for --device cuda: one line before any model loads
    terms = load_vocabulary(cfg.vocab)  # a bad vocabulary file fails before any model is loaded
    p_name, p_ckpt = parse_encoder_spec(cfg.patch_encoder)
    enc = place_module(create_encoder(p_name, p_ckpt), place)
    t_name, t_ckpt = parse_encoder_spec(cfg.text_encoder)
    space = getattr(getattr(enc, "config", None), "text_encoder", None)
    if space and space != t_name:
        raise ExtractError(
            f"patch encoder {p_name!r} embeds into the space of text encoder {space!r}, not {t_name!r}: SPF (Eq. 2) "
            f"compares them directly; use --text-encoder {space}"
        )
    if p_name == "hwsi_small_patch" and p_ckpt is None:
        log("warning: hwsi_small_patch without a checkpoint has random weights; SPF relevance (Eq. 2) is "
            "meaningless until it is trained (`hwsi train-encoder`, then --patch-encoder hwsi_small_patch:DIR)")
    text = place_module(create_text_encoder(t_name, t_ckpt), place)
    text_emb = text.encode(list(terms)).astype(np.float32)
    if text_emb.shape[1] != enc.embed_dim:
        raise ExtractError(
            f"patch encoder {p_name!r} is {enc.embed_dim}-d but text encoder {t_name!r} is {text_emb.shape[1]}-d: "
            "SPF (Eq. 2) needs them in one space (hwsi_small_patch + minilm, conch_vit_b16 + conch_text)"
        )
    del text
    region_enc = None
    if cfg.region_input in ("same", ""):
        r_name, r_ckpt = p_name, p_ckpt
    else:
        r_name, r_ckpt = parse_encoder_spec(cfg.region_input)
        if r_name == p_name and r_ckpt != p_ckpt:
            raise ExtractError(f"--region-input {cfg.region_input!r} and --patch-encoder {cfg.patch_encoder!r} "
                               "share a name but not a checkpoint; both would be written to patches/" + p_name)
        if r_name != p_name:
            region_enc = place_module(create_encoder(r_name, r_ckpt), place)
    if r_name in ("coords", "tissue"):
        raise ExtractError(f"encoder name {r_name!r} collides with a store dataset")
    settings = {
        "patch_encoder": p_name,
        "patch_checkpoint": checkpoint_identity(p_ckpt),
        "region_input": r_name,
        "region_checkpoint": checkpoint_identity(r_ckpt),
        "text_encoder": t_name,
        "text_checkpoint": checkpoint_identity(t_ckpt),
        "vocab_fingerprint": vocabulary_fingerprint(terms),
        "k": cfg.k,
        "n_div": cfg.n_div,
        "min_tissue": cfg.min_tissue,
        "cells": _cells_setting(cfg.cells),
    }
    return Models(enc, p_name, region_enc, r_name, terms, text_emb, settings, place)


def place_module(module: Any, place: Placement) -> Any:
    """``module`` moved to ``place``'s device and dtype, in eval mode (an encoder's ``encode`` casts its inputs to
    the weights' dtype and returns float32)."""
    return module.to(device=place.torch_device, dtype=place.torch_dtype).eval()


def _cells_setting(spec: str) -> str:
    """The recorded cells backend: ``builtin``, ``none`` or ``cellvit:<resolved folder>``."""
    kind, _, d = spec.partition(":")
    return f"cellvit:{Path(d).expanduser().resolve()}" if kind == "cellvit" else kind
