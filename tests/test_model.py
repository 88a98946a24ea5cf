"""hwsi.model: CCAF (Eq. 4), HIPT ViT-4K (+ checkpoint layout), ViT_WSI, hierarchy switches, heads, projectors."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from hwsi.errors import ConfigError
from hwsi.model.ccaf import CCAF, CCAFConfig
from hwsi.model.heads import AlignmentHeads
from hwsi.model.hierarchy import HierarchicalEncoder, HierarchyConfig
from hwsi.model.inputs import SlideInputs, collate_slides
from hwsi.model.projectors import ProjectorConfig, Projectors
from hwsi.model.slide_vit import SlideViT, SlideViTConfig
from hwsi.model.vit4k import ViT4K, ViT4KConfig, load_hipt_vit4k


def random_slide(r: int = 3, k: int = 4, g: int = 16, n: int = 5, dp: int = 16, din: int = 12, dc: int = 8,
                 seed: int = 0, slide_id: str = "s") -> SlideInputs:
    gen = torch.Generator().manual_seed(seed)
    patch_mask = torch.ones(r, k, dtype=torch.bool)
    patch_mask[-1, k // 2:] = False
    cell_mask = torch.rand(r, k, n, generator=gen) > 0.3
    cell_mask[0, 0] = False  # a patch without nuclei
    cell_mask &= patch_mask[..., None]
    return SlideInputs(
        slide_id=slide_id, patch_feats=torch.randn(r, k, dp, generator=gen), patch_mask=patch_mask,
        region_input=torch.randn(r, g, din, generator=gen), grid_mask=torch.rand(r, g, generator=gen) > 0.2,
        cell_feats=torch.randn(r, k, n, dc, generator=gen), cell_mask=cell_mask,
        region_coords=torch.stack([torch.arange(r) * 64, torch.zeros(r, dtype=torch.long)], 1),
        selected=torch.arange(k).repeat(r, 1), relevance=torch.rand(r, k, generator=gen),
        patch_coords=torch.zeros(r, k, 2, dtype=torch.long), region_index=torch.arange(r), region_size_level0=64.0,
    )


# ---------------------------------------------------------------- CCAF
def test_ccaf_padding_invariance_and_no_cells_token() -> None:
    torch.manual_seed(0)
    m = CCAF(CCAFConfig(in_dim=8, dim=16, depth=2, n_heads=2)).eval()
    cells = torch.randn(3, 5, 8)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]], dtype=torch.bool)
    out = m(cells, mask)
    assert out.shape == (3, 16)
    # padded nuclei do not matter: garbage in padding, or dropping it, leaves the token unchanged
    noisy = cells.clone()
    noisy[0, 3:] = 100.0
    torch.testing.assert_close(m(noisy, mask)[0], out[0])
    torch.testing.assert_close(m(cells[:1, :3], mask[:1, :3])[0], out[0])
    torch.testing.assert_close(out[2], m.no_cells.detach())
    # permutation invariance over nuclei (a set, no positions)
    perm = torch.tensor([4, 2, 0, 3, 1])
    torch.testing.assert_close(m(cells[1:2, perm], mask[1:2, perm])[0], out[1], atol=1e-5, rtol=1e-5)
    assert m(torch.zeros(2, 0, 8), torch.zeros(2, 0, dtype=torch.bool)).shape == (2, 16)


def test_ccaf_paper_defaults() -> None:
    cfg = CCAFConfig()
    assert (cfg.dim, cfg.depth, cfg.n_heads) == (784, 2, 2)


# ---------------------------------------------------------------- ViT-4K
def _functional_vit4k(sd: dict, x: torch.Tensor, heads: int) -> torch.Tensor:
    """Independent recomputation from a HIPT-layout state dict (no hwsi module code), unmasked."""
    b, g, _ = x.shape
    side = math.isqrt(g)
    t = F.gelu(F.linear(x, sd["phi.0.weight"], sd["phi.0.bias"]))
    d = t.shape[-1]
    t = torch.cat([sd["cls_token"].expand(b, 1, d), t], 1)
    pe = sd["pos_embed"]
    p = math.isqrt(pe.shape[1] - 1)
    if side != p:  # HIPT/DINO use the stored table as is when the grid matches
        grid = pe[:, 1:].reshape(1, p, p, d).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, scale_factor=((side + 0.1) / p, (side + 0.1) / p), mode="bicubic")
        pe = torch.cat([pe[:, :1], grid.permute(0, 2, 3, 1).reshape(1, side * side, d)], 1)
    t = t + pe
    i = 0
    while f"blocks.{i}.norm1.weight" in sd:
        pre = f"blocks.{i}."
        h = F.layer_norm(t, (d,), sd[pre + "norm1.weight"], sd[pre + "norm1.bias"], eps=1e-6)
        q, k, v = F.linear(h, sd[pre + "attn.qkv.weight"], sd[pre + "attn.qkv.bias"]).chunk(3, dim=-1)
        split = lambda z: z.reshape(b, -1, heads, d // heads).transpose(1, 2)  # noqa: E731
        q, k, v = split(q), split(k), split(v)
        a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // heads), -1) @ v
        t = t + F.linear(a.transpose(1, 2).reshape(b, -1, d), sd[pre + "attn.proj.weight"], sd[pre + "attn.proj.bias"])
        h = F.layer_norm(t, (d,), sd[pre + "norm2.weight"], sd[pre + "norm2.bias"], eps=1e-6)
        h = F.linear(F.gelu(F.linear(h, sd[pre + "mlp.fc1.weight"], sd[pre + "mlp.fc1.bias"])),
                     sd[pre + "mlp.fc2.weight"], sd[pre + "mlp.fc2.bias"])
        t = t + h
        i += 1
    return F.layer_norm(t, (d,), sd["norm.weight"], sd["norm.bias"], eps=1e-6)[:, 0]


def _hipt_layout_checkpoint(cfg: ViT4KConfig, seed: int) -> dict:
    """Random weights saved as HIPT's DINO teacher: {'teacher': {'backbone.*', 'head.*'}}."""
    torch.manual_seed(seed)
    src = ViT4K(cfg)
    with torch.no_grad():
        for prm in src.parameters():
            prm.add_(torch.randn_like(prm) * 0.1)
    teacher = {f"backbone.{k}": v.clone() for k, v in src.state_dict().items()}
    teacher["head.mlp.0.weight"] = torch.randn(4, cfg.dim)
    teacher["head.last_layer.weight_g"] = torch.randn(8, 1)
    return {"teacher": teacher, "student": {}}


@pytest.mark.parametrize("side", [4, 2, 3])
def test_vit4k_loads_hipt_layout_and_matches_functional(tmp_path: Path, side: int) -> None:
    cfg = ViT4KConfig(in_dim=12, dim=24, depth=2, n_heads=3, pos_grid=4)
    ck = _hipt_layout_checkpoint(cfg, seed=1)
    torch.save(ck, tmp_path / "vit4k_xs_dino.pth")
    model = load_hipt_vit4k(ViT4K(cfg), tmp_path / "vit4k_xs_dino.pth").eval()
    sd = {k.removeprefix("backbone."): v for k, v in ck["teacher"].items()}
    x = torch.randn(2, side * side, 12)
    with torch.no_grad():
        torch.testing.assert_close(model(x), _functional_vit4k(sd, x, heads=3), atol=1e-5, rtol=1e-4)


def test_vit4k_real_layout_keys_and_shapes() -> None:
    sd = ViT4K(ViT4KConfig()).state_dict()
    assert sd["pos_embed"].shape == (1, 197, 192) and sd["phi.0.weight"].shape == (192, 384)
    assert sd["blocks.5.attn.qkv.weight"].shape == (576, 192) and sd["blocks.5.mlp.fc1.weight"].shape == (768, 192)
    assert "blocks.6.norm1.weight" not in sd and "norm.weight" in sd


def test_vit4k_loader_fails_on_missing_or_bad_keys(tmp_path: Path) -> None:
    cfg = ViT4KConfig(in_dim=12, dim=24, depth=2, n_heads=3, pos_grid=4)
    ck = _hipt_layout_checkpoint(cfg, seed=0)
    del ck["teacher"]["backbone.blocks.1.mlp.fc2.bias"]
    torch.save(ck, tmp_path / "a.pth")
    with pytest.raises(ConfigError, match="blocks.1.mlp.fc2.bias"):
        load_hipt_vit4k(ViT4K(cfg), tmp_path / "a.pth")
    torch.save(_hipt_layout_checkpoint(cfg, 0), tmp_path / "b.pth")
    with pytest.raises(ConfigError, match="shape"):
        load_hipt_vit4k(ViT4K(ViT4KConfig(in_dim=10, dim=24, depth=2, n_heads=3, pos_grid=4)), tmp_path / "b.pth")
    # module.-prefixed plain state dicts load too
    torch.save({f"module.{k}": v for k, v in ViT4K(cfg).state_dict().items()}, tmp_path / "c.pth")
    load_hipt_vit4k(ViT4K(cfg), tmp_path / "c.pth")


def test_vit4k_grid_mask_equals_dropping_tokens() -> None:
    """Key-padding a non-tissue cell == removing its token (keeping the others' position embeddings)."""
    torch.manual_seed(0)
    m = ViT4K(ViT4KConfig(in_dim=12, dim=24, depth=2, n_heads=2, pos_grid=4)).eval()
    x = torch.randn(1, 16, 12)
    mask = torch.ones(1, 16, dtype=torch.bool)
    mask[0, [0, 5, 9]] = False
    with torch.no_grad():
        got = m(x, mask)
        tok = torch.cat([m.cls_token, m.phi(x)], 1) + m.pos_embed
        keep = torch.cat([torch.tensor([True]), mask[0]])
        tok = tok[:, keep]
        for blk in m.blocks:
            tok = blk(tok)
        torch.testing.assert_close(got, m.norm(tok[:, 0]), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(got, m(x))


# ---------------------------------------------------------------- ViT_WSI
def test_slide_vit_masks_padding_and_uses_positions() -> None:
    torch.manual_seed(0)
    m = SlideViT(SlideViTConfig(in_dim=24, dim=24, depth=1, n_heads=2)).eval()
    r = torch.randn(1, 4, 24)
    coords = torch.tensor([[[0, 0], [64, 0], [0, 64], [0, 0]]])
    mask = torch.tensor([[True, True, True, False]])
    with torch.no_grad():
        a = m(r, mask, coords, torch.tensor([64.0]))
        r2 = r.clone()
        r2[0, 3] = 50.0
        torch.testing.assert_close(m(r2, mask, coords, torch.tensor([64.0])), a)
        swapped = coords[:, [1, 0, 2, 3]]
        assert not torch.allclose(m(r, mask, swapped, torch.tensor([64.0])), a)
        # translation of the whole slide does not change positions
        torch.testing.assert_close(m(r, mask, coords + 640, torch.tensor([64.0])), a, atol=1e-5, rtol=1e-5)
    mean = SlideViT(SlideViTConfig(in_dim=24, dim=24, pooling="mean", use_pos=False)).eval()
    with torch.no_grad():
        torch.testing.assert_close(mean(r, mask), mean.norm(mean.embed(r[:, :3]).mean(1)))


# ---------------------------------------------------------------- hierarchy, heads, projectors
def test_hierarchy_shapes_masks_and_switches() -> None:
    torch.manual_seed(0)
    batch = collate_slides([random_slide(r=3), random_slide(r=2, seed=1)])
    enc = HierarchicalEncoder(HierarchyConfig.tiny()).eval()
    out = enc(batch)
    assert out.cell_tokens.shape == (2, 3, 4, 16) and out.patch_tokens.shape == (2, 3, 4, 16)
    assert out.region_tokens.shape == (2, 3, 24) and out.slide_token.shape == (2, 24)
    assert torch.equal(out.patch_tokens, batch.patch_feats)
    assert not out.region_mask[1, 2] and torch.all(out.region_tokens[1, 2] == 0)
    torch.testing.assert_close(out.cell_tokens[0, 0, 0], enc.ccaf.no_cells.detach())
    # the second slide alone gives the same tokens as inside the padded batch
    alone = enc(collate_slides([random_slide(r=2, seed=1)]))
    torch.testing.assert_close(alone.slide_token[0], out.slide_token[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(alone.region_tokens[0], out.region_tokens[1, :2], atol=1e-5, rtol=1e-5)
    only_slide = HierarchicalEncoder(HierarchyConfig.tiny(use_cells=False, use_patches=False, use_regions=False))
    o = only_slide(batch)
    assert o.cell_tokens is None and o.patch_tokens is None and o.region_tokens is None
    assert o.slide_token.shape == (2, 24) and only_slide.ccaf is None
    assert HierarchyConfig.tiny(use_regions=False).scales() == ("cells", "patches", "slide")
    with pytest.raises(ConfigError):
        HierarchicalEncoder(HierarchyConfig.tiny(use_cells=False, use_patches=False, use_regions=False,
                                                 use_slide=False))


def test_hierarchy_backprop_reaches_every_trainable_part() -> None:
    torch.manual_seed(0)
    cfg = HierarchyConfig.tiny()
    enc = HierarchicalEncoder(cfg)
    heads = AlignmentHeads(cfg.dims(), text_dim=10)
    z = heads(enc(collate_slides([random_slide()])))
    assert torch.allclose(z.patches.norm(dim=-1), torch.ones(1, 3, 4))
    (z.cells.sum() + z.regions.sum() + z.slide.sum()).backward()
    for name, p in enc.named_parameters():
        assert p.grad is not None, name


def test_projectors_and_markers() -> None:
    pr = Projectors({"cells": 16, "slide": 24}, ProjectorConfig(hidden=32, llm_dim=20))
    assert pr(  "cells", torch.randn(2, 5, 16)).shape == (2, 5, 20)
    assert isinstance(pr.mlps["slide"][1], torch.nn.GELU) and len(pr.mlps["slide"]) == 3
    w = pr.wrap("slide", torch.zeros(1, 20))
    assert w.shape == (3, 20) and torch.equal(w[0], pr.markers["slide"][0].detach())
    assert Projectors({"cells": 4}, ProjectorConfig(hidden=8, llm_dim=6, markers=False)).wrap(
        "cells", torch.ones(2, 6)).shape == (2, 6)
    d = ProjectorConfig()
    assert (d.hidden, d.llm_dim) == (1024, 3584)


@pytest.mark.parametrize("stem", ["conv", "neighbour"])
def test_vit4k_stem_is_identity_at_init_and_hipt_weights_load(tmp_path: Path, stem: str) -> None:
    """The arrangement stems start as the identity, so a HIPT checkpoint (no stem.* keys) reproduces HIPT."""
    base = ViT4KConfig(in_dim=12, dim=24, depth=2, n_heads=3, pos_grid=4)
    ck = _hipt_layout_checkpoint(base, seed=2)
    torch.save(ck, tmp_path / "vit4k_xs_dino.pth")
    cfg = ViT4KConfig(in_dim=12, dim=24, depth=2, n_heads=3, pos_grid=4, stem=stem)
    model = load_hipt_vit4k(ViT4K(cfg), tmp_path / "vit4k_xs_dino.pth").eval()
    assert any(k.startswith("stem.") for k in model.state_dict())
    sd = {k.removeprefix("backbone."): v for k, v in ck["teacher"].items()}
    x = torch.randn(2, 16, 12)
    with torch.no_grad():
        torch.testing.assert_close(model(x), _functional_vit4k(sd, x, heads=3), atol=1e-5, rtol=1e-4)


def test_vit4k_conv_stem_sees_neighbours_and_respects_the_tissue_mask() -> None:
    """With the conv stem a token depends on its grid neighbours (not on far cells); masked cells feed nothing."""
    from hwsi.model.vit4k import GridConvStem, neighbour_cosines

    torch.manual_seed(0)
    stem = GridConvStem(8, 1)
    for p in stem.projs:
        torch.nn.init.normal_(p.weight)
    x = torch.randn(1, 16, 8)
    y0 = stem(x, None)
    x1 = x.clone()
    x1[0, 5] += 1.0  # cell (1, 1): neighbours of (0..2, 0..2) change, (3, 3) does not
    y1 = stem(x1, None)
    changed = (y1 - y0).abs().sum(-1)[0] > 1e-6
    assert bool(changed[0]) and bool(changed[10]) and not bool(changed[15])
    mask = torch.ones(1, 16, dtype=torch.bool)
    mask[0, 5] = False
    # cell 5 is masked: its (changed) feature reaches no neighbour through the convolution
    torch.testing.assert_close(stem(x, mask)[0, 0], stem(x1, mask)[0, 0])
    cos = neighbour_cosines(x, mask)
    assert cos.shape == (1, 16, 8) and float(cos[0, 5].abs().sum()) == 0.0 and float(cos[0, 0, 0]) == 0.0


def test_hierarchy_output_split_collate_gives_the_same_visual_tokens() -> None:
    """Stages 2-3 cache the frozen hierarchy's output per slide (hwsi.train.stage_lm.FrozenHierarchyCache) and
    collate the cached slides into a batch: the projected visual tokens equal those of the batch encoded at once,
    also for slides with fewer regions / patches than the batch's largest."""
    import torch

    from hwsi.model.hierarchy import HierarchyOutput

    def out(r: int, k: int, seed: int) -> HierarchyOutput:
        g = torch.Generator().manual_seed(seed)
        pm = torch.rand(1, r, k, generator=g) > 0.3
        return HierarchyOutput(torch.randn(1, r, k, 5, generator=g), torch.randn(1, r, k, 6, generator=g),
                               torch.randn(1, r, 7, generator=g), torch.randn(1, 8, generator=g), pm,
                               torch.ones(1, r, dtype=torch.bool), pm & (torch.rand(1, r, k, generator=g) > 0.5))

    a, b = out(3, 4, 0), out(2, 2, 1)
    batch = HierarchyOutput.collate([a, b])
    assert batch.cell_tokens.shape == (2, 3, 4, 5) and batch.region_mask.tolist() == [[True] * 3, [True, True, False]]
    assert not batch.patch_mask[1, :, 2:].any() and not batch.patch_mask[1, 2].any()
    back = batch.split()
    for orig, got in zip((a, b), back, strict=True):
        r, k = orig.patch_mask.shape[1:]
        assert torch.equal(got.cell_tokens[:, :r, :k], orig.cell_tokens)
        assert torch.equal(got.patch_mask[:, :r, :k], orig.patch_mask)
        assert torch.equal(got.slide_token, orig.slide_token)
        assert got.cell_tokens.data_ptr() != batch.cell_tokens.data_ptr()  # copies: the cache never pins a batch
