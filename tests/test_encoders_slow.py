"""Full-size encoders (run with `pytest -m slow`): CONCH ViT-B/16 at 448 px and HIPT ViT-S/16 at 256 px, loaded from
random checkpoints in the original key layouts and checked against the functional reference forward."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch
from test_encoders import _conch_state, _pos_dino, _random_state, _ref_conch_image, _ref_vit_tokens, _vit_keys

from hwsi.features.encoders import create_encoder

pytestmark = pytest.mark.slow


def test_full_size_conch_image_tower(tmp_path: Path) -> None:
    sd = _conch_state(width=768, depth=12, grid=28, embed=512, caption_q=256, text_w=768, text_layers=12)
    path = tmp_path / "pytorch_model.bin"
    torch.save(sd, path)
    print(f"CONCH-layout checkpoint: {path.stat().st_size / 1e9:.2f} GB, {len(sd)} tensors")
    t = time.perf_counter()
    enc = create_encoder("conch_vit_b16", checkpoint=path)
    print(f"build + load {time.perf_counter() - t:.1f}s")
    assert enc.embed_dim == 512 and enc.input_size == 448
    assert sum(p.numel() for p in enc.trunk.parameters()) == 86_250_240  # timm ViT-B/16 (85,798,656 at 224 px) + a 785-token table
    imgs = np.random.default_rng(0).integers(0, 256, (2, 512, 512, 3), dtype=np.uint8)
    x = enc.preprocess(imgs)
    assert x.shape == (2, 3, 448, 448)
    with torch.no_grad():
        enc(x[:1])
        t = time.perf_counter()
        got = enc(x)
        dt = time.perf_counter() - t
        # random weights make 12 full-width layers chaotic in float32: compare the math in float64
        got64 = enc.double()(x.double())
        want = _ref_conch_image({k: v.double() for k, v in sd.items()}, x.double(), depth=12, heads=12, pool_heads=8)
    print(f"CONCH ViT-B/16 448 px forward: {dt / 2:.2f} s/image (float32)")
    assert got.shape == (2, 512) and torch.isfinite(got).all()
    torch.testing.assert_close(got64, want, rtol=1e-7, atol=1e-7)


def test_full_size_hipt_vit256(tmp_path: Path) -> None:
    sd = _random_state(_vit_keys("", 384, 12, 16, 14), seed=2)
    path = tmp_path / "vit256_small_dino.pth"
    torch.save({"teacher": {f"module.backbone.{k}": v for k, v in sd.items()} | {"module.head.last_layer.weight_v": torch.zeros(8, 256)}}, path)
    enc = create_encoder("hipt_vit256", checkpoint=path)
    assert enc.embed_dim == 384 and enc.input_size == 256
    imgs = np.random.default_rng(1).integers(0, 256, (4, 256, 256, 3), dtype=np.uint8)
    x = enc.preprocess(imgs)
    with torch.no_grad():
        t = time.perf_counter()
        got = enc(x)
        dt = time.perf_counter() - t
        got64 = enc.double()(x.double())
        want = _ref_vit_tokens({k: v.double() for k, v in sd.items()}, "", x.double(), 12, 6, 16, _pos_dino)[:, 0]
    print(f"HIPT ViT-S/16 256 px forward: {dt / 4 * 1000:.0f} ms/image (float32)")
    assert got.shape == (4, 384) and torch.isfinite(got).all()
    torch.testing.assert_close(got64, want, rtol=1e-7, atol=1e-7)
