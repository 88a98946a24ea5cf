"""Encoder registry: every registered encoder builds, runs, is deterministic and round-trips through our format;
foreign checkpoints (CONCH, HIPT/DINO) load through the key maps and reproduce an independent functional forward."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hwsi.errors import HwsiError
from hwsi.features.encoders import (
    EncoderError,
    create_encoder,
    create_text_encoder,
    encoder_entry,
    list_encoders,
    list_text_encoders,
    load_foreign_state_dict,
    parse_encoder_spec,
    read_state_dict,
    save_encoder,
)

RNG = np.random.default_rng(0)


def _images(n: int = 3, side: int = 80) -> np.ndarray:
    return RNG.integers(0, 256, size=(n, side, side, 3), dtype=np.uint8)


# ------------------------------------------------------------------ registry, every encoder


def test_registry_lists_the_builtin_encoders() -> None:
    assert {"conch_vit_b16", "hipt_vit256", "hwsi_small_patch"} <= set(list_encoders())
    assert {"minilm", "conch_text"} <= set(list_text_encoders())


@pytest.mark.parametrize("name", list_encoders())
def test_every_encoder_builds_runs_is_deterministic_and_round_trips(name: str, tmp_path: Path) -> None:
    tiny = encoder_entry(name).tiny
    enc = create_encoder(name, **tiny)
    imgs = _images()
    x = enc.preprocess(imgs)
    assert x.shape == (3, 3, enc.input_size, enc.input_size) and x.dtype == torch.float32
    with torch.no_grad():
        out = enc(x)
    assert out.shape == (3, enc.embed_dim)
    assert torch.isfinite(out).all()
    feats = enc.encode(imgs, batch_size=2)
    assert feats.shape == (3, enc.embed_dim) and feats.dtype == np.float32
    np.testing.assert_allclose(feats, out.numpy(), rtol=1e-5, atol=1e-5)
    feats = enc.encode(imgs)  # same batching below: bit-for-bit comparisons
    # determinism: a second build (same seed) gives the same weights and features; other seed differs
    again = create_encoder(name, **tiny)
    np.testing.assert_array_equal(again.encode(imgs), enc.encode(imgs))
    other = create_encoder(name, **tiny, seed=1)
    assert not np.allclose(other.encode(imgs), feats)
    # round trip through our own checkpoint format, by argument and by "name:path" spec
    ckpt = save_encoder(enc, tmp_path / "ckpt")
    assert (ckpt / "encoder.json").is_file() and (ckpt / "model.safetensors").is_file()
    loaded = create_encoder(name, checkpoint=ckpt)
    assert loaded.config == enc.config
    np.testing.assert_array_equal(loaded.encode(imgs), feats)
    by_spec = create_encoder(f"{name}:{ckpt}")
    np.testing.assert_array_equal(by_spec.encode(imgs), feats)
    # a checkpoint of another encoder is refused with the file named
    other_name = next(n for n in list_encoders() if n != name)
    with pytest.raises(EncoderError, match="encoder.json|not"):
        create_encoder(other_name, checkpoint=ckpt)


def test_parse_encoder_spec() -> None:
    assert parse_encoder_spec("conch_vit_b16") == ("conch_vit_b16", None)
    assert parse_encoder_spec("conch_vit_b16:/w/pytorch_model.bin") == ("conch_vit_b16", Path("/w/pytorch_model.bin"))
    assert parse_encoder_spec("hipt_vit256:rel/a:b.pth") == ("hipt_vit256", Path("rel/a:b.pth"))
    with pytest.raises(EncoderError):
        parse_encoder_spec("conch_vit_b16:")


def test_unknown_names_options_and_files_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(HwsiError, match="unknown image encoder 'nope'.*hwsi_small_patch"):
        create_encoder("nope")
    with pytest.raises(EncoderError, match="unknown key.*'dpeth'"):
        create_encoder("hipt_vit256", dpeth=2)
    with pytest.raises(EncoderError, match="not found"):
        create_encoder("hipt_vit256", checkpoint=tmp_path / "missing.pth")
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(EncoderError, match="bad.pth: cannot read checkpoint"):
        create_encoder("hipt_vit256", checkpoint=bad, **encoder_entry("hipt_vit256").tiny)
    with pytest.raises(EncoderError, match="loads only hwsi checkpoint folders"):
        create_encoder("hwsi_small_patch", checkpoint=bad)


def test_preprocess_resizes_crops_and_normalises() -> None:
    enc = create_encoder("hwsi_small_patch", **encoder_entry("hwsi_small_patch").tiny)  # 32 px, mean .5 std .25
    flat = np.full((2, 100, 60, 3), 200, dtype=np.uint8)  # non-square: shorter side resized then centre crop
    x = enc.preprocess(flat)
    assert x.shape == (2, 3, 32, 32)
    np.testing.assert_allclose(x.numpy(), (200 / 255 - 0.5) / 0.25, atol=1e-4)
    # torch uint8 and a single (H, W, 3) image are accepted; float input is refused
    assert enc.preprocess(torch.from_numpy(flat[0])).shape == (1, 3, 32, 32)
    with pytest.raises(EncoderError, match="uint8"):
        enc.preprocess(flat.astype(np.float32))
    with pytest.raises(EncoderError, match=r"\(B, H, W, 3\)"):
        enc.preprocess(np.zeros((2, 8, 8), np.uint8))
    # left half black, right half white, square: keeps the layout after resizing
    img = np.zeros((1, 64, 64, 3), np.uint8)
    img[:, :, 32:] = 255
    y = enc.preprocess(img)[0, 0]
    assert y[:, :12].max() < -1.9 and y[:, 20:].min() > 1.9


# ------------------------------------------------------------------ independent functional references


def _ln(x: torch.Tensor, sd: dict, key: str, eps: float) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],), sd[key + ".weight"], sd[key + ".bias"], eps)


def _mha(q_in: torch.Tensor, kv_in: torch.Tensor, wq, wk, wv, b, wo, bo, heads: int, mask=None) -> torch.Tensor:
    """Explicit multi-head attention (softmax(QK^T/sqrt(d)) V) with an optional additive mask (B, Lq, Lk)."""
    d = wq.shape[0]
    bq, bk, bv = b.chunk(3)
    q, k, v = q_in @ wq.T + bq, kv_in @ wk.T + bk, kv_in @ wv.T + bv
    bsz, lq, lk, hd = q.shape[0], q.shape[1], k.shape[1], d // heads
    q = q.reshape(bsz, lq, heads, hd).permute(0, 2, 1, 3)
    k = k.reshape(bsz, lk, heads, hd).permute(0, 2, 1, 3)
    v = v.reshape(bsz, lk, heads, hd).permute(0, 2, 1, 3)
    logits = (q @ k.transpose(-1, -2)) / math.sqrt(hd)
    if mask is not None:
        logits = logits + mask[:, None]
    o = torch.softmax(logits, dim=-1) @ v
    return o.permute(0, 2, 1, 3).reshape(bsz, lq, d) @ wo.T + bo


def _ref_vit_tokens(sd: dict, p: str, x: torch.Tensor, depth: int, heads: int, patch: int, pos) -> torch.Tensor:
    """Plain functional ViT (timm/DINO math) from a raw state dict with key prefix ``p``."""
    t = F.conv2d(x, sd[p + "patch_embed.proj.weight"], sd[p + "patch_embed.proj.bias"], stride=patch)
    bsz, d, gh, gw = t.shape
    t = t.flatten(2).transpose(1, 2)
    t = torch.cat([sd[p + "cls_token"].expand(bsz, 1, d), t], dim=1) + pos(sd[p + "pos_embed"], gh, gw)
    for i in range(depth):
        b = f"{p}blocks.{i}."
        h = _ln(t, sd, b + "norm1", 1e-6)
        wq, wk, wv = sd[b + "attn.qkv.weight"].chunk(3)
        t = t + _mha(h, h, wq, wk, wv, sd[b + "attn.qkv.bias"], sd[b + "attn.proj.weight"], sd[b + "attn.proj.bias"], heads)
        h = _ln(t, sd, b + "norm2", 1e-6)
        h = F.gelu(h @ sd[b + "mlp.fc1.weight"].T + sd[b + "mlp.fc1.bias"])
        t = t + h @ sd[b + "mlp.fc2.weight"].T + sd[b + "mlp.fc2.bias"]
    return _ln(t, sd, p + "norm", 1e-6)


def _vit_keys(p: str, width: int, depth: int, patch: int, grid: int) -> dict[str, tuple[int, ...]]:
    """Key names and shapes of a timm / DINO ViT, written out from the published layout."""
    keys: dict[str, tuple[int, ...]] = {
        p + "cls_token": (1, 1, width),
        p + "pos_embed": (1, 1 + grid * grid, width),
        p + "patch_embed.proj.weight": (width, 3, patch, patch),
        p + "patch_embed.proj.bias": (width,),
        p + "norm.weight": (width,),
        p + "norm.bias": (width,),
    }
    for i in range(depth):
        b = f"{p}blocks.{i}."
        keys.update({
            b + "norm1.weight": (width,), b + "norm1.bias": (width,),
            b + "attn.qkv.weight": (3 * width, width), b + "attn.qkv.bias": (3 * width,),
            b + "attn.proj.weight": (width, width), b + "attn.proj.bias": (width,),
            b + "norm2.weight": (width,), b + "norm2.bias": (width,),
            b + "mlp.fc1.weight": (4 * width, width), b + "mlp.fc1.bias": (4 * width,),
            b + "mlp.fc2.weight": (width, 4 * width), b + "mlp.fc2.bias": (width,),
        })  # fmt: skip
    return keys


def _random_state(shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, s in shapes.items():
        t = torch.randn(s, generator=g) * 0.2
        if k.endswith(("norm1.weight", "norm2.weight", "norm.weight", "ln_q.weight", "ln_k.weight")) or "ln_" in k and k.endswith(".weight"):
            t = 1.0 + 0.1 * torch.randn(s, generator=g)
        out[k] = t
    return out


def _pos_timm(pos: torch.Tensor, gh: int, gw: int) -> torch.Tensor:
    n = pos.shape[1] - 1
    g = int(round(math.sqrt(n)))
    if g == gh == gw:
        return pos
    grid = pos[:, 1:].reshape(1, g, g, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(gh, gw), mode="bicubic", antialias=True, align_corners=False)
    return torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, gh * gw, -1)], dim=1)


def _pos_dino(pos: torch.Tensor, gh: int, gw: int) -> torch.Tensor:
    n = pos.shape[1] - 1
    g = int(round(math.sqrt(n)))
    if g == gh == gw:
        return pos
    grid = pos[:, 1:].reshape(1, g, g, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, scale_factor=((gh + 0.1) / g, (gw + 0.1) / g), mode="bicubic")
    assert grid.shape[-2:] == (gh, gw)
    return torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, gh * gw, -1)], dim=1)


# ------------------------------------------------------------------ CONCH image tower


CONCH_TINY = {"width": 64, "depth": 2, "heads": 4, "input_size": 64, "pos_grid": 4, "embed_dim": 32, "pool_heads": 4}


def _conch_state(width=64, depth=2, patch=16, grid=4, embed=32, caption_q=5, text_w=32, text_layers=1) -> dict:
    """A random CONCH ``pytorch_model.bin`` in the original key layout (visual + text + decoder + logit_scale)."""
    shapes = _vit_keys("visual.trunk.", width, depth, patch, grid)
    shapes.update({
        "visual.attn_pool_contrast.query": (1, embed),
        "visual.attn_pool_contrast.attn.q_proj_weight": (embed, embed),
        "visual.attn_pool_contrast.attn.k_proj_weight": (embed, width),
        "visual.attn_pool_contrast.attn.v_proj_weight": (embed, width),
        "visual.attn_pool_contrast.attn.in_proj_bias": (3 * embed,),
        "visual.attn_pool_contrast.attn.out_proj.weight": (embed, embed),
        "visual.attn_pool_contrast.attn.out_proj.bias": (embed,),
        "visual.attn_pool_contrast.ln_q.weight": (embed,), "visual.attn_pool_contrast.ln_q.bias": (embed,),
        "visual.attn_pool_contrast.ln_k.weight": (width,), "visual.attn_pool_contrast.ln_k.bias": (width,),
        "visual.ln_contrast.weight": (embed,), "visual.ln_contrast.bias": (embed,),
        "visual.proj_contrast": (embed, embed),
        "visual.attn_pool_caption.query": (caption_q, width),
        "visual.attn_pool_caption.attn.in_proj_weight": (3 * width, width),
        "visual.attn_pool_caption.attn.in_proj_bias": (3 * width,),
        "visual.attn_pool_caption.attn.out_proj.weight": (width, width),
        "visual.attn_pool_caption.attn.out_proj.bias": (width,),
        "visual.attn_pool_caption.ln_q.weight": (width,), "visual.attn_pool_caption.ln_q.bias": (width,),
        "visual.attn_pool_caption.ln_k.weight": (width,), "visual.attn_pool_caption.ln_k.bias": (width,),
        "visual.ln_caption.weight": (width,), "visual.ln_caption.bias": (width,),
        "logit_scale": (),
        "text.cls_emb": (text_w,),
        "text_decoder.ln_final.weight": (text_w,),
    })  # fmt: skip
    shapes.update(_conch_text_keys("text.", vocab=50, width=text_w, layers=text_layers, ctx=12, embed=embed))
    return _random_state(shapes, seed=11)


def _ref_conch_image(sd: dict, x: torch.Tensor, depth=2, heads=4, pool_heads=4) -> torch.Tensor:
    tokens = _ref_vit_tokens(sd, "visual.trunk.", x, depth, heads, 16, _pos_timm)
    p = "visual.attn_pool_contrast."
    q = _ln(sd[p + "query"], sd, p + "ln_q", 1e-5).unsqueeze(0).expand(x.shape[0], -1, -1)
    k = _ln(tokens, sd, p + "ln_k", 1e-5)
    pooled = _mha(q, k, sd[p + "attn.q_proj_weight"], sd[p + "attn.k_proj_weight"], sd[p + "attn.v_proj_weight"],
                  sd[p + "attn.in_proj_bias"], sd[p + "attn.out_proj.weight"], sd[p + "attn.out_proj.bias"], pool_heads)
    return _ln(pooled[:, 0], sd, "visual.ln_contrast", 1e-5)


@pytest.mark.parametrize("input_size", [64, 96])  # 96 px: 6x6 grid, position table resampled from 4x4 (timm)
def test_conch_checkpoint_loads_every_tensor_and_matches_functional_forward(tmp_path: Path, input_size: int) -> None:
    sd = _conch_state()
    path = tmp_path / "pytorch_model.bin"
    torch.save({"state_dict": {"module." + k: v for k, v in sd.items()}}, path)  # wrapped + DDP prefix variant
    enc = create_encoder("conch_vit_b16", checkpoint=path, **{**CONCH_TINY, "input_size": input_size})
    own = enc.state_dict()
    for k, v in sd.items():
        if k.startswith("visual.") and not k.startswith(("visual.attn_pool_caption", "visual.ln_caption")):
            torch.testing.assert_close(own[k[len("visual."):]], v, rtol=0, atol=0)
    assert len(own) == sum(1 for k in sd if k.startswith("visual.") and "caption" not in k)
    imgs = _images(2, side=input_size)
    x = enc.preprocess(imgs)
    with torch.no_grad():
        got = enc(x)
        want = _ref_conch_image(sd, x)
    assert got.shape == (2, 32)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # project=True applies proj_contrast (CONCH's contrastive embedding before normalisation)
    proj = create_encoder("conch_vit_b16", checkpoint=path, **CONCH_TINY, project=True)
    with torch.no_grad():
        x64 = proj.preprocess(_images(2, side=64))
        torch.testing.assert_close(proj(x64), _ref_conch_image(sd, x64) @ sd["visual.proj_contrast"], rtol=1e-4, atol=1e-4)


def test_conch_missing_or_unexpected_keys_fail_naming_the_file(tmp_path: Path) -> None:
    sd = _conch_state()
    missing = dict(sd)
    del missing["visual.trunk.blocks.1.mlp.fc2.bias"]
    p1 = tmp_path / "missing.bin"
    torch.save(missing, p1)
    with pytest.raises(EncoderError, match=r"missing.bin: 1 weight\(s\).*trunk.blocks.1.mlp.fc2.bias"):
        create_encoder("conch_vit_b16", checkpoint=p1, **CONCH_TINY)
    extra = dict(sd)
    extra["visual.trunk.blocks.2.norm1.weight"] = torch.ones(64)  # a deeper checkpoint than the config
    p2 = tmp_path / "extra.safetensors"
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in extra.items()}, str(p2))
    with pytest.raises(EncoderError, match="extra.safetensors: 1 checkpoint key.*blocks.2.norm1.weight"):
        create_encoder("conch_vit_b16", checkpoint=p2, **CONCH_TINY)
    ok = tmp_path / "ok.bin"
    torch.save(sd, ok)
    with pytest.raises(EncoderError, match=r"ok.bin: visual.trunk.pos_embed -> trunk.pos_embed: shape \(1, 17, 64\)"):
        create_encoder("conch_vit_b16", checkpoint=ok, **{**CONCH_TINY, "pos_grid": 5})


# ------------------------------------------------------------------ HIPT ViT-256 (DINO teacher)


def test_hipt_teacher_checkpoint_loads_and_matches_dino_forward(tmp_path: Path) -> None:
    width, depth, heads, grid = 48, 2, 3, 3
    sd = _random_state(_vit_keys("", width, depth, 16, grid), seed=5)
    head = {"head.mlp.0.weight": torch.randn(8, width), "head.last_layer.weight_g": torch.randn(4, 1)}
    teacher = {f"module.backbone.{k}": v for k, v in sd.items()} | {f"module.{k}": v for k, v in head.items()}
    path = tmp_path / "vit256_small_dino.pth"
    torch.save({"teacher": teacher, "student": {"junk": torch.zeros(1)}, "epoch": 3}, path)
    enc = create_encoder("hipt_vit256", checkpoint=path, width=width, depth=depth, heads=heads, pos_grid=grid, input_size=64)
    own = enc.state_dict()
    assert len(own) == len(sd)
    for k, v in sd.items():
        torch.testing.assert_close(own["vit." + k], v, rtol=0, atol=0)
    imgs = _images(2, side=64)  # 64 px -> 4x4 grid: the 3x3 table is interpolated as DINO does
    x = enc.preprocess(imgs)
    np.testing.assert_allclose(x.numpy(), (imgs.transpose(0, 3, 1, 2) / 255.0 - 0.5) / 0.5, atol=1e-6)
    with torch.no_grad():
        got = enc(x)
        want = _ref_vit_tokens(sd, "", x, depth, heads, 16, _pos_dino)[:, 0]
    assert got.shape == (2, width)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # a bare state dict with a missing weight fails
    del teacher["module.backbone.norm.bias"]
    torch.save({"teacher": teacher}, path)
    with pytest.raises(EncoderError, match=r"vit256_small_dino.pth: 1 weight\(s\).*vit.norm.bias"):
        create_encoder("hipt_vit256", checkpoint=path, width=width, depth=depth, heads=heads, pos_grid=grid, input_size=64)


def test_dino_interpolation_is_dino_not_timm() -> None:
    from hwsi.features.encoders.vit import interpolate_pos_dino, interpolate_pos_timm

    pos = torch.randn(1, 1 + 14 * 14, 8)
    d = interpolate_pos_dino(pos, 16, 16)
    t = interpolate_pos_timm(pos, 16, 16)
    assert d.shape == t.shape == (1, 257, 8)
    torch.testing.assert_close(d, _pos_dino(pos, 16, 16))
    torch.testing.assert_close(d[:, :1], pos[:, :1])
    assert not torch.allclose(d, t)  # the +0.1 scale factor and no antialias differ from timm's resample
    assert interpolate_pos_dino(pos, 14, 14) is pos


# ------------------------------------------------------------------ loader details


def test_load_foreign_state_dict_reports_and_refuses_duplicates() -> None:
    model = torch.nn.Linear(3, 2)
    sd = {"a.weight": torch.ones(2, 3), "a.bias": torch.zeros(2), "junk": torch.zeros(1), "skip": torch.zeros(1)}
    rep = load_foreign_state_dict(
        model, sd, lambda k: None if k == "skip" else k.removeprefix("a."), strict=False, source="f.bin"
    )
    assert rep.loaded == ["bias", "weight"] and rep.unexpected == ["junk"] and rep.ignored == ["skip"]
    assert torch.equal(model.weight, torch.ones(2, 3))
    with pytest.raises(EncoderError, match="f.bin: 1 checkpoint key"):
        load_foreign_state_dict(model, sd, lambda k: None if k == "skip" else k.removeprefix("a."), source="f.bin")
    with pytest.raises(EncoderError, match="both map to"):
        load_foreign_state_dict(model, {"w1": torch.ones(2, 3), "w2": torch.ones(2, 3), "b": torch.zeros(2)},
                                lambda k: "weight" if k.startswith("w") else "bias")


def test_read_state_dict_never_unpickles_code(tmp_path: Path) -> None:
    p = tmp_path / "evil.pth"
    torch.save({"state_dict": {"w": torch.ones(1)}, "obj": Path("x")}, p)  # an arbitrary object in the pickle
    with pytest.raises(EncoderError, match="evil.pth: cannot read checkpoint"):
        read_state_dict(p)
    ok = tmp_path / "ok.pth"
    torch.save({"model": {"w": torch.ones(1)}, "epoch": 1}, ok)
    assert list(read_state_dict(ok)) == ["w"]


# ------------------------------------------------------------------ CONCH text tower


def _conch_text_keys(p: str, vocab: int, width: int, layers: int, ctx: int, embed: int) -> dict[str, tuple[int, ...]]:
    keys: dict[str, tuple[int, ...]] = {
        p + "token_embedding.weight": (vocab, width),
        p + "positional_embedding": (ctx, width),
        p + "cls_emb": (width,),
        p + "ln_final.weight": (width,), p + "ln_final.bias": (width,),
        p + "text_projection": (width, embed),
    }  # fmt: skip
    for i in range(layers):
        b = f"{p}transformer.resblocks.{i}."
        keys.update({
            b + "ln_1.weight": (width,), b + "ln_1.bias": (width,),
            b + "attn.in_proj_weight": (3 * width, width), b + "attn.in_proj_bias": (3 * width,),
            b + "attn.out_proj.weight": (width, width), b + "attn.out_proj.bias": (width,),
            b + "ln_2.weight": (width,), b + "ln_2.bias": (width,),
            b + "mlp.c_fc.weight": (4 * width, width), b + "mlp.c_fc.bias": (4 * width,),
            b + "mlp.c_proj.weight": (width, 4 * width), b + "mlp.c_proj.bias": (width,),
        })  # fmt: skip
    return keys


def _ref_conch_text(sd: dict, ids: torch.Tensor, layers: int, heads: int, pad_id: int = 0) -> torch.Tensor:
    """CONCH TextTransformer.forward with embed_cls, written out: causal mask + CoCa's cls pad mask."""
    n, length = ids.shape
    s = length + 1
    x = sd["text.token_embedding.weight"][ids]
    x = torch.cat([x, sd["text.cls_emb"].reshape(1, 1, -1).repeat(n, 1, 1)], dim=1)
    causal = torch.empty(s, s).fill_(float("-inf")).triu_(1)
    cls_mask = (ids != pad_id).unsqueeze(1)
    cls_mask = F.pad(cls_mask, (1, 0, cls_mask.shape[2], 0), value=1.0)
    add = torch.zeros(cls_mask.shape).masked_fill_(~cls_mask, float("-inf"))
    mask = causal[None] + add
    x = x + sd["text.positional_embedding"][:s]
    for i in range(layers):
        b = f"text.transformer.resblocks.{i}."
        h = _ln(x, sd, b + "ln_1", 1e-5)
        wq, wk, wv = sd[b + "attn.in_proj_weight"].chunk(3)
        x = x + _mha(h, h, wq, wk, wv, sd[b + "attn.in_proj_bias"], sd[b + "attn.out_proj.weight"], sd[b + "attn.out_proj.bias"], heads, mask)
        h = _ln(x, sd, b + "ln_2", 1e-5)
        x = x + F.gelu(h @ sd[b + "mlp.c_fc.weight"].T + sd[b + "mlp.c_fc.bias"]) @ sd[b + "mlp.c_proj.weight"].T + sd[b + "mlp.c_proj.bias"]
    return _ln(x[:, -1], sd, "text.ln_final", 1e-5) @ sd["text.text_projection"]


def _byte_bpe_tokenizer(path: Path) -> Path:
    """A small byte-level BPE tokenizer with CONCH's special tokens (<pad> = 0), trained here."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<start_of_text>", "<end_of_text>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["glandular tumour with atypical nuclei", "normal stroma and lymphocytes"] * 20, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<start_of_text> $A <end_of_text>", special_tokens=[("<start_of_text>", 1), ("<end_of_text>", 2)]
    )
    tok.save(str(path))
    return path


def test_conch_text_checkpoint_and_tokenizer(tmp_path: Path) -> None:
    vocab, width, layers, heads, ctx, embed = 300, 32, 2, 4, 16, 24
    sd = _random_state(_conch_text_keys("text.", vocab, width, layers, ctx, embed), seed=3)
    sd |= {"visual.trunk.cls_token": torch.zeros(1, 1, 8), "logit_scale": torch.tensor(1.0)}
    ckpt = tmp_path / "pytorch_model.bin"
    torch.save(sd, ckpt)
    _byte_bpe_tokenizer(tmp_path / "tokenizer.json")  # found next to the checkpoint
    enc = create_text_encoder(
        "conch_text", checkpoint=ckpt, vocab_size=vocab, width=width, layers=layers, heads=heads, context_length=ctx, embed_dim=embed
    )
    own = enc.state_dict()
    assert len(own) == sum(1 for k in sd if k.startswith("text."))
    for k, v in sd.items():
        if k.startswith("text."):
            torch.testing.assert_close(own[k[5:]], v, rtol=0, atol=0)
    texts = ["glandular tumour", "normal stroma and lymphocytes with atypical glandular tumour nuclei everywhere"]
    tokens = enc.tokenize(texts)
    ids = tokens["input_ids"]
    assert ids.shape == (2, ctx - 1)
    assert ids[0, 0] == 1 and (ids[0] == 0).any()  # <start_of_text>, padded with <pad> = 0
    assert not (ids[1] == 0).any()  # long text truncated to 15 tokens
    with torch.no_grad():
        got = enc.encode_tensor(texts)
        want = _ref_conch_text(sd, ids, layers, heads)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(enc.encode(texts, batch_size=1), want.numpy(), rtol=1e-4, atol=1e-4)
    # our own format round-trips a text encoder too (config incl. the tokenizer path)
    own_dir = save_encoder(enc, tmp_path / "conch_text_own")
    again = create_text_encoder("conch_text", checkpoint=own_dir)
    np.testing.assert_array_equal(again.encode(texts), enc.encode(texts))
    # without a tokenizer: a clear error
    bare = create_text_encoder("conch_text", **encoder_entry("conch_text", "text").tiny)
    with pytest.raises(EncoderError, match="tokenizer"):
        bare.encode(["x"])


def test_small_patch_encoder_takes_any_number_of_stages() -> None:
    """The demo builds it with three stages (PipelineConfig.encoder_channels); the typed reader accepts that."""
    import torch

    enc = create_encoder("hwsi_small_patch", input_size=16, channels=(8, 16, 16))
    assert len(enc.stages) == 3
    assert enc(torch.rand(2, 3, 16, 16)).shape[0] == 2
