"""Loading a Hugging Face causal LM from a local folder, and building the tiny offline stand-in.

``load_llm(path, dtype)`` -> (model, tokenizer): any HF causal LM saved with ``save_pretrained`` (Qwen2.5-7B-Instruct
for real runs), loaded with ``local_files_only`` — nothing is ever downloaded.

``build_tiny_llm(out_dir, corpus, ...)`` writes a tiny random ``Qwen2ForCausalLM`` plus a byte-level BPE tokenizer
trained offline on ``corpus`` (``tokenizers``), wrapped in ``PreTrainedTokenizerFast`` with a ChatML
``chat_template`` and the special tokens ``<|endoftext|>`` (pad), ``<|im_start|>``, ``<|im_end|>`` (eos) and the
``<image>`` placeholder; it is saved in HF format so it loads through the very same ``load_llm`` path as Qwen.
"""

from __future__ import annotations

from pathlib import Path

import torch

from hwsi.errors import ConfigError
from hwsi.features.encoders.checkpoints import check_folder_not_lfs_pointers

IMAGE_TOKEN = "<image>"
PAD_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = [PAD_TOKEN, IM_START, IM_END, IMAGE_TOKEN]

# ChatML as in Qwen2.5 (without Qwen's default system prompt): <|im_start|>role\ncontent<|im_end|>\n ...
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def load_llm(path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """(model, tokenizer) from a local HF folder; the tokenizer must carry a chat template.

    The weights are read in ``dtype`` (bf16 for Qwen2.5-7B: 15 GB instead of 30) with ``low_cpu_mem_usage`` — built
    on the meta device, each tensor read once (transformers 5 always does this and ignores the flag; 4.x needs
    it) — and placed straight onto ``device`` (``device_map``: a CUDA device never sees a float32 copy on the host).
    ``device`` comes from :func:`hwsi.devices.resolve_placement` (docs/devices.md)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not (path / "config.json").is_file():
        raise ConfigError(f"{path}: not a Hugging Face model folder (no config.json); give a local path")
    check_folder_not_lfs_pointers(path, lambda reason, p: ConfigError(f"{p}: {reason}"))
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(f"{path}: the tokenizer has no chat_template (an -Instruct/chat model is needed)")
    target = torch.device(device)
    placement = {} if target.type == "cpu" else {"device_map": {"": str(target)}}
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, low_cpu_mem_usage=True, local_files_only=True,
                                                 **placement)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def train_bpe_tokenizer(corpus: list[str], vocab_size: int = 512):
    """Byte-level BPE trained on ``corpus`` with the chat special tokens, as a PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=1, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=IM_END, pad_token=PAD_TOKEN,
        additional_special_tokens=[IM_START, IMAGE_TOKEN],
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


def build_tiny_llm(
    out_dir: str | Path,
    corpus: list[str],
    vocab_size: int = 512,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int | None = None,
    max_positions: int = 8192,
    seed: int = 0,
) -> Path:
    """Write a tiny random Qwen2 causal LM + trained tokenizer to ``out_dir`` (HF format); returns the folder."""
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = train_bpe_tokenizer(corpus, vocab_size)
    cfg = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate or 4 * hidden,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions, tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(cfg)
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, do_sample=False
    )
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
