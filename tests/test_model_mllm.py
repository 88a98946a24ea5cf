"""hwsi.model.mllm and hwsi.model.chat: visual prefix, splicing at <image>, answer-only labels, LM loss, cached ChatSession."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from hwsi.model.hierarchy import HierarchyConfig
from hwsi.model.inputs import collate_slides
from hwsi.model.llm import build_tiny_llm, load_llm
from hwsi.model.chat import ChatSession
from hwsi.model.mllm import MLLMConfig, MLLMHWSI
from hwsi.model.projectors import ProjectorConfig
from test_model import random_slide

CORPUS = ["The tumour shows high grade nuclei and gland formation.", "What is the diagnosis? Benign.",
          "Necrosis is present in several regions."] * 4
H = 32


@pytest.fixture(scope="module")
def llm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llm(tmp_path_factory.mktemp("llm") / "tiny", CORPUS, vocab_size=300, hidden=H, layers=2,
                          heads=4, kv_heads=2)


def make_model(llm_dir: Path, **switches: bool) -> MLLMHWSI:
    torch.manual_seed(0)
    llm, tok = load_llm(llm_dir)
    cfg = MLLMConfig(hierarchy=HierarchyConfig.tiny(**switches), projector=ProjectorConfig(hidden=24, llm_dim=H),
                     text_dim=10)
    return MLLMHWSI.from_config(cfg, llm, tok).eval()


CONV = [{"from": "human", "value": "<image>\nWhat is the grade?"}, {"from": "gpt", "value": "High grade."},
        {"from": "human", "value": "Any necrosis?"}, {"from": "gpt", "value": "Necrosis is present."}]


def test_build_inputs_splices_visual_and_labels_only_answers(llm_dir: Path) -> None:
    model = make_model(llm_dir)
    slide = random_slide(r=3, k=4)
    with torch.no_grad():
        vis = model.visual_tokens(collate_slides([slide]))
        x = model.build_inputs(vis, [CONV])
    n_patches = int(slide.patch_mask.sum())
    assert x.n_visual == [2 * n_patches + 3 + 1 + 8] and vis[0].shape == (x.n_visual[0], H)
    tok = model.tokenizer
    labels = x.labels[0][x.labels[0] != -100]
    assert tok.decode(labels) == "High grade.<|im_end|>\nNecrosis is present.<|im_end|>\n"
    before = tok("<|im_start|>user\n", add_special_tokens=False).input_ids
    start = len(before)
    torch.testing.assert_close(x.inputs_embeds[0, start:start + x.n_visual[0]], vis[0])
    torch.testing.assert_close(x.inputs_embeds[0, start], model.projectors.markers["cells"][0])
    torch.testing.assert_close(x.inputs_embeds[0, start + x.n_visual[0] - 1], model.projectors.markers["slide"][1])
    # text around the placeholder is the template's, token for token
    emb = model.llm.get_input_embeddings().weight
    ids = tok(model._render([{"role": "user", "content": "<image>\nWhat is the grade?"}]),
              add_special_tokens=False).input_ids
    after = ids[ids.index(tok.convert_tokens_to_ids("<image>")) + 1:]
    torch.testing.assert_close(x.inputs_embeds[0, start + x.n_visual[0]:start + x.n_visual[0] + len(after)],
                               emb[after])
    # a conversation without <image> gets it at the start of the first user turn
    y = model.build_inputs(vis, [[{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A."}]])
    torch.testing.assert_close(y.inputs_embeds[0, start:start + x.n_visual[0]], vis[0])
    with pytest.raises(ValueError, match="placeholders"):
        model.build_inputs(vis, [[{"role": "user", "content": "<image><image>"}]])


def test_scale_switches_change_the_visual_prefix(llm_dir: Path) -> None:
    slide = random_slide(r=3, k=4)
    n_p = int(slide.patch_mask.sum())
    with torch.no_grad():
        v = make_model(llm_dir, use_cells=False).visual_tokens(collate_slides([slide]))
        assert v[0].shape[0] == n_p + 3 + 1 + 6
        v = make_model(llm_dir, use_cells=False, use_patches=False, use_regions=False).visual_tokens(
            collate_slides([slide]))
        assert v[0].shape[0] == 1 + 2


def test_lm_loss_backprop_and_padding_independence(llm_dir: Path) -> None:
    model = make_model(llm_dir)
    a, b = random_slide(r=3, seed=0), random_slide(r=2, seed=1)
    conv_b = [{"role": "user", "content": "Diagnosis?"}, {"role": "assistant", "content": "Benign."}]
    out = model(collate_slides([a, b]), [CONV, conv_b])
    assert torch.isfinite(out.loss)
    out.loss.backward()
    for p in (model.projectors.markers["cells"], model.projectors.mlps["patches"][0].weight,
              model.hierarchy.ccaf.cls_token, model.hierarchy.vit4k.pos_embed, model.hierarchy.slide_vit.cls_token):
        assert p.grad is not None and p.grad.abs().sum() > 0
    with torch.no_grad():
        xb = model.build_inputs(model.visual_tokens(collate_slides([a, b])), [CONV, conv_b])
        xs = model.build_inputs(model.visual_tokens(collate_slides([b])), [conv_b])
        lb = model.llm(inputs_embeds=xb.inputs_embeds, attention_mask=xb.attention_mask).logits
        ls = model.llm(inputs_embeds=xs.inputs_embeds, attention_mask=xs.attention_mask).logits
        n = xs.inputs_embeds.shape[1]
        torch.testing.assert_close(lb[1, :n], ls[0], atol=1e-4, rtol=1e-4)


def _greedy_uncached(model: MLLMHWSI, slide, conv, n_new: int) -> list[int]:
    """Reference: recompute the whole sequence at every step, no cache."""
    with torch.no_grad():
        x = model.build_inputs(model.visual_tokens(collate_slides([slide])), [conv], add_generation_prompt=True)
        emb, out = x.inputs_embeds, []
        for _ in range(n_new):
            nxt = int(model.llm(inputs_embeds=emb).logits[0, -1].argmax())
            if nxt == model.tokenizer.eos_token_id:
                break
            out.append(nxt)
            emb = torch.cat([emb, model.llm.get_input_embeddings().weight[nxt][None, None]], 1)
    return out


def test_chat_session_caches_prefix_and_matches_uncached_greedy(llm_dir: Path) -> None:
    model = make_model(llm_dir)
    slide = random_slide(r=3, k=4)
    seen: list[int] = []

    def hook(_mod, _args, kwargs):
        x = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs.get("inputs_embeds")
        seen.append(int(x.shape[1]))

    handle = model.llm.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        chat = ChatSession(model, slide, max_new_tokens=5)
        assert seen == [chat.prefix_len] and chat.prefix_len == len(model._ids("<|im_start|>user\n")) + chat.n_visual
        pieces: list[str] = []
        a1 = chat.ask("What is the grade?", on_token=pieces.append)
        assert "".join(pieces) == a1
        q_ids = model._ids("\nWhat is the grade?<|im_end|>\n<|im_start|>assistant\n")
        assert seen[1] == len(q_ids) and all(s == 1 for s in seen[2:])  # never the prefix again
        n_after_1 = len(seen)
        a2 = chat.ask("Any necrosis?")
        assert max(seen[n_after_1:]) < chat.prefix_len
        assert chat.tokens_forwarded == sum(seen)
    finally:
        handle.remove()
    conv1 = [{"role": "user", "content": "<image>\nWhat is the grade?"}]
    assert model.tokenizer.decode(_greedy_uncached(model, slide, conv1, 5)) == a1
    conv2 = conv1 + [{"role": "assistant", "content": a1}, {"role": "user", "content": "Any necrosis?"}]
    assert model.tokenizer.decode(_greedy_uncached(model, slide, conv2, 5)) == a2
    # model.generate (HF generate over inputs_embeds) agrees with the session's greedy answer
    assert model.generate(collate_slides([slide]), ["What is the grade?"], max_new_tokens=5)[0] == a1.strip()
    chat.reset()
    assert chat.cache.get_seq_length() == chat.prefix_len
    assert chat.ask("What is the grade?") == a1


def test_relevance_is_cosine_with_aligned_patches(llm_dir: Path) -> None:
    model = make_model(llm_dir)
    slide = random_slide(r=3, k=4)
    chat = ChatSession(model, slide, max_new_tokens=1)
    t = torch.randn(10)
    s = chat.relevance(t)
    assert s.shape == (3, 4) and torch.isnan(s[~slide.patch_mask]).all()
    with torch.no_grad():
        zp = model.heads.heads["patches"](slide.patch_feats[0, 1])
    assert abs(float(s[0, 1]) - float(F.cosine_similarity(zp, t, dim=0))) < 1e-5
    assert chat.relevance(torch.randn(2, 10)).shape == (2, 3, 4)


def test_lora_wrapped_llm_trains_and_config_roundtrips(llm_dir: Path, tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model

    from hwsi.config import load_config, save_config

    model = make_model(llm_dir)
    model.llm = get_peft_model(model.llm, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    out = model(collate_slides([random_slide()]), [CONV])
    out.loss.backward()
    lora = [p for n, p in model.llm.named_parameters() if "lora_B" in n]
    assert lora and all(p.grad is not None for p in lora)
    chat = ChatSession(model, random_slide(), max_new_tokens=2)
    assert isinstance(chat.ask("Grade?"), str)
    save_config(model.cfg, tmp_path / "m.yaml")
    cfg = load_config(tmp_path / "m.yaml", MLLMConfig)
    assert cfg == model.cfg


def test_region_identity_embeddings_mark_each_regions_tokens(llm_dir: Path) -> None:
    """region_embed adds one learned vector per kept-region position to its cell, patch and region tokens."""
    plain = make_model(llm_dir)
    torch.manual_seed(0)
    llm, tok = load_llm(llm_dir)
    cfg = MLLMConfig(hierarchy=HierarchyConfig.tiny(), text_dim=10,
                     projector=ProjectorConfig(hidden=24, llm_dim=H, region_embed=2))
    model = MLLMHWSI.from_config(cfg, llm, tok).eval()
    model.load_state_dict(plain.state_dict(), strict=False)
    slide = random_slide(r=3, k=4)
    with torch.no_grad():
        a, b = plain.visual_tokens(collate_slides([slide]))[0], model.visual_tokens(collate_slides([slide]))[0]
    assert a.shape == b.shape  # no extra tokens
    e = model.projectors.region_embed.detach()
    pm = slide.patch_mask
    region_of_patch = torch.arange(3)[:, None].expand_as(pm)[pm]  # cell/patch tokens in order
    n = int(pm.sum())
    want_cells = e[region_of_patch.clamp(max=1)]
    torch.testing.assert_close(b[1:1 + n] - a[1:1 + n], want_cells)  # after the <cells> marker
    r0 = 1 + n + 2 + n + 2  # first region token: cells + markers, patches + markers, <regions>
    torch.testing.assert_close(b[r0:r0 + 3] - a[r0:r0 + 3], e[torch.tensor([0, 1, 1])])
    torch.testing.assert_close(b[-2], a[-2])  # the slide token carries no region


def test_region_positions_on_the_slide() -> None:
    """region_positions: each region's centre over the slide's level-0 size in [-1, 1]; the real regions' box when
    the size is unknown (0); padding regions 0."""
    from dataclasses import replace

    from hwsi.model.hierarchy import region_positions

    slide = replace(random_slide(r=3), region_coords=torch.tensor([[0, 0], [64, 0], [192, 64]]),
                    level0_size=torch.tensor([256, 128]))
    small = replace(random_slide(r=2), region_coords=torch.tensor([[0, 0], [128, 0]]))  # size unknown
    pos = region_positions(collate_slides([slide, small]))
    want = torch.tensor([[[-0.75, -0.5], [-0.25, -0.5], [0.75, 0.5]],  # centres (32, 32), (96, 32), (224, 96)
                         [[-1.0, 0.0], [1.0, 0.0], [0.0, 0.0]]])       # box of centres x 32..160, y 32..32; padding
    torch.testing.assert_close(pos, want)


def test_region_position_marks_only_the_region_tokens(llm_dir: Path) -> None:
    """region_position "slide" adds a learned map of each region's slide position to its z_r only: same tokens
    otherwise; two regions with the same features at different places differ; no parameter without regions."""
    from dataclasses import replace

    plain = make_model(llm_dir)
    torch.manual_seed(0)
    llm, tok = load_llm(llm_dir)
    cfg = MLLMConfig(hierarchy=HierarchyConfig.tiny(), text_dim=10,
                     projector=ProjectorConfig(hidden=24, llm_dim=H, region_position="slide"))
    model = MLLMHWSI.from_config(cfg, llm, tok).eval()
    model.load_state_dict(plain.state_dict(), strict=False)
    slide = random_slide(r=3, k=4)
    slide = replace(slide, region_input=slide.region_input[:1].expand(3, -1, -1).clone(),
                    grid_mask=slide.grid_mask[:1].expand(3, -1).clone(), level0_size=torch.tensor([256, 256]))
    with torch.no_grad():
        a, b = plain.visual_tokens(collate_slides([slide]))[0], model.visual_tokens(collate_slides([slide]))[0]
    assert a.shape == b.shape
    n = int(slide.patch_mask.sum())
    r0 = 1 + n + 2 + n + 2  # first region token
    torch.testing.assert_close(b[:r0], a[:r0])  # cells, patches and their markers untouched
    torch.testing.assert_close(b[r0 + 3:], a[r0 + 3:])  # </regions>, the slide token, its markers
    torch.testing.assert_close(a[r0], a[r0 + 1])  # same region features: same z_r without positions ...
    assert not torch.allclose(b[r0], b[r0 + 1])  # ... told apart by where they are
    no_regions = MLLMConfig(hierarchy=HierarchyConfig.tiny(use_regions=False), text_dim=10,
                            projector=ProjectorConfig(hidden=24, llm_dim=H, region_position="slide"))
    assert MLLMHWSI.from_config(no_regions, llm, tok).projectors.region_position is None
