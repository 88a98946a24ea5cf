"""hwsi.model.llm: tiny Qwen2 + offline BPE tokenizer saved and reloaded through the real-model path."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hwsi.errors import ConfigError
from hwsi.model.llm import IMAGE_TOKEN, build_tiny_llm, load_llm

CORPUS = [
    "The slide shows invasive ductal carcinoma with high nuclear grade.",
    "Glands are well formed; no necrosis is seen. Mitoses are rare.",
    "What is the diagnosis? Answer: benign breast tissue.",
] * 5


def test_tiny_llm_save_reload_same_logits(tmp_path: Path) -> None:
    out = build_tiny_llm(tmp_path / "tiny", CORPUS, vocab_size=300, hidden=32, layers=2, heads=4, kv_heads=2)
    model, tok = load_llm(out)
    model2, tok2 = load_llm(out)
    msgs = [{"role": "user", "content": f"{IMAGE_TOKEN}\nWhat is the grade?"}, {"role": "assistant", "content": "High."}]
    text = tok.apply_chat_template(msgs, tokenize=False)
    assert text == "<|im_start|>user\n<image>\nWhat is the grade?<|im_end|>\n<|im_start|>assistant\nHigh.<|im_end|>\n"
    ids = tok(text, return_tensors="pt").input_ids
    assert IMAGE_TOKEN in tok.convert_ids_to_tokens(ids[0].tolist())  # one special token, not split
    assert tok.decode(ids[0]) == text and tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    # the saved weights are the seeded random init: rebuilding it in memory gives the reloaded logits
    from transformers import Qwen2ForCausalLM

    torch.manual_seed(0)
    fresh = Qwen2ForCausalLM(model.config).eval()
    with torch.no_grad():
        ref = fresh(ids).logits
        torch.testing.assert_close(model(ids).logits, ref)
        torch.testing.assert_close(model2(ids).logits, ref)
    assert model.config.model_type == "qwen2" and model.config.hidden_size == 32
    assert tok2(text).input_ids == ids[0].tolist()


def test_load_llm_refuses_non_model_folder(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config.json"):
        load_llm(tmp_path)
