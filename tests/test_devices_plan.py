"""`hwsi plan` (hwsi.train.plan): the paper's model built on the meta device, its parameter counts against the
published Qwen2.5-7B figure and hand-computed LoRA / projector sizes, visual tokens and ZeRO-3 memory."""

from __future__ import annotations

import pytest

from hwsi.cli import main
from hwsi.train.config import load_train_config
from hwsi.train.plan import GIB, build_plan, visual_tokens

H, L, V, I, KV = 3584, 28, 152064, 18944, 4 * 128  # Qwen2.5-7B-Instruct: hidden, layers, vocab, MLP, k/v width


@pytest.fixture(scope="module")
def plan():
    return build_plan(load_train_config("paper"), regions=64, gpus=4)


def test_qwen25_7b_has_its_published_size(plan) -> None:
    per_layer = (H * H + H) + 2 * (H * KV + KV) + H * H + 3 * H * I + 2 * H  # q (bias), k, v (bias), o, MLP, norms
    hand = 2 * V * H + L * per_layer + H  # untied embeddings + lm_head, the layers, the final norm
    assert plan.params["llm"] == hand == 7_615_616_512
    assert round(plan.params["llm"] / 1e9, 2) == 7.62  # the model card's "7.61B" / the issue's ≈ 7.62 B
    assert plan.llm_source.startswith("Qwen2.5-7B-Instruct")  # /models/... is not on this machine


def test_lora_and_projector_sizes_by_hand(plan) -> None:
    r = 128  # paper: LoRA rank 128, alpha 256, on every attention and MLP projection
    per_layer = r * ((H + H) + 2 * (H + KV) + (H + H) + 2 * (H + I) + (I + H))
    assert plan.params["lora"] == L * per_layer == 322_961_408
    dims = {"cells": 784, "patches": 512, "regions": 192, "slide": 192}  # CCAF out, CONCH, ViT-4K, ViT_WSI
    hidden = 1024
    mlps = sum(d * hidden + hidden + hidden * H + H for d in dims.values())
    assert plan.params["projectors"] == mlps + 4 * 2 * H + 64 * H  # + begin/end markers, 64 region embeddings


def test_visual_tokens_and_zero3_memory(plan) -> None:
    assert plan.visual_tokens == 64 * 16 * 2 + 64 + 1 + 4 * 2  # k cells + k patches per region, regions, slide, markers
    assert visual_tokens(load_train_config("paper").model, 10) == 10 * 32 + 10 + 1 + 8
    s3 = plan.stages[2]
    assert s3.trained == {"projectors": plan.params["projectors"], "lora": plan.params["lora"]}
    frozen = plan.params["llm"] + plan.params["hierarchy"]
    assert s3.gib["weights"] == pytest.approx(frozen * 2 / 4 / GIB)  # bf16 weights sharded over 4 GPUs
    assert s3.gib["optimizer"] == pytest.approx(s3.n_trained * 16 / 4 / GIB)  # fp32 master + grad + Adam m, v
    assert s3.gib["activations"] == pytest.approx(34 * 4096 * 4 * H * L / GIB)  # micro-batch 4 at 4096 tokens
    one_gpu = build_plan(load_train_config("paper"), regions=64, gpus=1)
    assert one_gpu.stages[2].gib["weights"] == pytest.approx(4 * s3.gib["weights"])


def test_cli_prints_the_plan(capsys) -> None:
    assert main(["plan", "--config", "paper", "--regions", "10", "--gpus", "2"]) == 0
    out = capsys.readouterr().out
    assert "llm             7.616 B" in out and "lora           322.96 M" in out
    assert "visual tokens per slide at 10 regions: 339" in out and "over 2 GPU(s)" in out
    assert main(["plan", "--config", "paper", "--gpus", "0"]) == 2
