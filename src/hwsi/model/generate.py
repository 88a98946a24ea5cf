"""Batched greedy generation for an :class:`~hwsi.model.mllm.MLLMHWSI`: many questions about many slides, the visual
prefix of each slide prefilled ONCE and its KV cache shared by every question about it (docs/generation.md).

    answers = greedy_answers(model, visual, conversations, max_new_tokens=64, batch_size=16)

``visual``: per conversation the slide's visual tokens (``model.visual_tokens`` rows; pass the SAME tensor object
for questions about the same slide, that is what is shared). Each conversation is split at its ``<image>`` into a
prefix (template text before it + the visual tokens) and a suffix (the rest of the prompt up to the assistant
header), tokenized exactly as :meth:`~hwsi.model.mllm.MLLMHWSI.build_inputs` does. Then, per batch of rows:

1. every distinct prefix is forwarded once (batch 1) and its per-layer keys/values kept;
2. the batch cache is those keys/values LEFT-padded to the longest prefix and repeated per question;
3. the suffixes are LEFT-padded to the longest one (pads between prefix and suffix), with an attention mask that
   hides every pad and position ids that count only real tokens, so each row sees exactly its unbatched sequence;
4. greedy decoding, one token per row per forward; a row that emits EOS (or reaches ``max_new_tokens``) leaves the
   batch (its cache rows are dropped).

``batch_size=1`` runs the same arithmetic one question at a time (no padding anywhere): the reference of the
equality test (tests/test_generate_batched.py). Texts are decoded like ``MLLMHWSI.generate``:
special tokens skipped, stripped.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from hwsi.errors import ConfigError
from hwsi.model.mllm import ensure_image, normalize_messages

Messages = list[dict[str, str]]


@dataclass
class PromptRow:
    """One question split for prefix sharing: ``key`` identifies the shared prefix (slide + text before ``<image>``)."""

    key: tuple[int, tuple[int, ...]]
    prefix: torch.Tensor  # (P, H) embeddings: template text before <image> + visual tokens
    suffix: torch.Tensor  # (S, H) embeddings: the prompt after <image> (S >= 1)


def split_prompt(model, visual: torch.Tensor, conversation: Messages | str) -> tuple[list[int], list[int]]:
    """Token ids before and after the ``<image>`` of one conversation rendered with the generation prompt, the
    pieces tokenized as :meth:`~hwsi.model.mllm.MLLMHWSI.build_inputs` tokenizes them."""
    img = model.cfg.image_token
    msgs = [{"role": "user", "content": conversation}] if isinstance(conversation, str) else conversation
    msgs = ensure_image(normalize_messages(msgs), img)
    before: list[int] = []
    after: list[int] = []
    seen = False
    for text, _ in model.segments(msgs, add_generation_prompt=True):
        parts = text.split(img)
        for j, part in enumerate(parts):
            (after if seen else before).extend(model._ids(part))
            if j < len(parts) - 1:
                seen = True
    return before, after


def prompt_rows(model, visual: Sequence[torch.Tensor], conversations: Sequence[Messages | str]) -> list[PromptRow]:
    """:class:`PromptRow` per conversation; rows whose slide tensor and pre-image text agree share a key."""
    if len(visual) != len(conversations):
        raise ValueError(f"{len(visual)} visual prefixes for {len(conversations)} conversations")
    slot: dict[int, int] = {}
    rows = []
    max_len = model.cfg.max_length
    for vis, conv in zip(visual, conversations):
        before, after = split_prompt(model, vis, conv)
        prefix = torch.cat([model._embed_ids(before), vis], dim=0)
        suffix = model._embed_ids(after)
        key = (slot.setdefault(id(vis), len(slot)), tuple(before))
        if max_len and prefix.shape[0] + suffix.shape[0] > max_len:  # build_inputs' truncation, same cut
            full = torch.cat([prefix, suffix], dim=0)[:max_len]
            if max_len > prefix.shape[0]:
                suffix = full[prefix.shape[0]:]
            else:
                prefix, suffix, key = full[:-1], full[-1:], (-1 - len(rows), ())
        if suffix.shape[0] == 0:  # nothing after <image>: the last prefix token is forwarded as the suffix
            prefix, suffix, key = prefix[:-1], prefix[-1:], (-1 - len(rows), ())
        rows.append(PromptRow(key, prefix, suffix))
    return rows


def _prefix_kv(llm, prefix: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-layer (keys, values), each (1, kv_heads, P, head_dim), of one prefix forwarded alone."""
    from transformers import DynamicCache

    kinds = set(getattr(llm.config, "layer_types", None) or ["full_attention"])
    if kinds != {"full_attention"} or getattr(llm.config, "use_sliding_window", False):
        raise ConfigError(f"{getattr(llm.config, '_name_or_path', '') or 'the LLM'}: sliding-window attention layers; "
                          "batched generation (hwsi.model.generate) supports full-attention LLMs only")
    cache = DynamicCache(config=llm.config)
    if prefix.shape[0]:
        llm(inputs_embeds=prefix[None], cache=cache, use_cache=True, logits_to_keep=1)
    layers = cache.layers
    return [(getattr(layer, "keys", None), getattr(layer, "values", None)) for layer in layers]


def _left_pad(x: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    n = length - x.shape[dim]
    if n == 0:
        return x
    shape = list(x.shape)
    shape[dim] = n
    return torch.cat([x.new_zeros(shape), x], dim=dim)


@torch.no_grad()
def _generate_batch(llm, rows: Sequence[PromptRow], kv_of: dict, eos_id: int | None, pad_embed: torch.Tensor,
                    max_new_tokens: int) -> list[list[int]]:
    """Greedy token ids for ``rows`` decoded together (``kv_of``: key -> prefix keys/values, filled on demand)."""
    from transformers import DynamicCache

    dev = pad_embed.device
    for r in rows:
        if r.key not in kv_of:
            kv_of[r.key] = _prefix_kv(llm, r.prefix)
    p_len = [r.prefix.shape[0] for r in rows]
    s_len = [r.suffix.shape[0] for r in rows]
    p_max, s_max = max(p_len), max(s_len)
    n_layers = len(kv_of[rows[0].key])
    layers = []
    for li in range(n_layers):
        ks, vs = [], []
        for r in rows:
            k, v = kv_of[r.key][li]
            if k is None or k.numel() == 0:  # empty prefix
                shape = (1, llm.config.num_key_value_heads, 0, getattr(llm.config, "head_dim", None)
                         or llm.config.hidden_size // llm.config.num_attention_heads)
                k = v = pad_embed.new_zeros(shape)
            ks.append(_left_pad(k, p_max, 2))
            vs.append(_left_pad(v, p_max, 2))
        layers.append((torch.cat(ks, dim=0), torch.cat(vs, dim=0)))
    cache = DynamicCache(ddp_cache_data=layers, config=llm.config) if p_max else DynamicCache(config=llm.config)
    b = len(rows)
    embeds = pad_embed.expand(b, s_max, pad_embed.shape[0]).clone()
    mask = torch.zeros(b, p_max + s_max, dtype=torch.long, device=dev)
    pos = torch.zeros(b, s_max, dtype=torch.long, device=dev)
    for i, r in enumerate(rows):
        embeds[i, s_max - s_len[i]:] = r.suffix
        mask[i, p_max - p_len[i]: p_max] = 1
        mask[i, p_max + s_max - s_len[i]:] = 1
        pos[i, s_max - s_len[i]:] = torch.arange(p_len[i], p_len[i] + s_len[i], device=dev)
    logits = llm(inputs_embeds=embeds, attention_mask=mask, position_ids=pos, cache=cache, use_cache=True,
                 logits_to_keep=1).logits[:, -1]
    out: list[list[int]] = [[] for _ in rows]
    alive = list(range(b))
    nxt_pos = pos[:, -1:] + 1
    for step in range(max_new_tokens):
        nxt = logits.argmax(-1)
        keep = []
        for j, i in enumerate(alive):
            t = int(nxt[j])
            if t == eos_id:
                continue
            out[i].append(t)
            keep.append(j)
        if not keep or step + 1 == max_new_tokens:
            break
        if len(keep) < len(alive):
            idx = torch.tensor(keep, device=dev)
            cache.batch_select_indices(idx)
            mask, nxt_pos, nxt = mask[idx], nxt_pos[idx], nxt[idx]
            alive = [alive[j] for j in keep]
        mask = torch.cat([mask, mask.new_ones(len(alive), 1)], dim=1)
        logits = llm(input_ids=nxt[:, None], attention_mask=mask, position_ids=nxt_pos, cache=cache,
                     use_cache=True).logits[:, -1]
        nxt_pos = nxt_pos + 1
    return out


def greedy_token_ids(model, visual: Sequence[torch.Tensor], conversations: Sequence[Messages | str],
                     max_new_tokens: int = 128, batch_size: int = 16,
                     eos_token_id: int | None = None) -> list[list[int]]:
    """Greedy answer token ids (EOS excluded) per conversation; see the module docstring. ``eos_token_id``:
    default the tokenizer's."""
    rows = prompt_rows(model, visual, conversations)
    # questions about the same slide go into the same batch (their prefix is forwarded once)
    order = sorted(range(len(rows)), key=lambda i: (rows[i].key[0], i))
    tok = model.tokenizer
    pad_embed = model._embed_ids([tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id])[0]
    out: list[list[int]] = [[] for _ in rows]
    kv_of: dict = {}
    size = max(1, batch_size)
    for s in range(0, len(order), size):
        chunk = order[s: s + size]
        eos = tok.eos_token_id if eos_token_id is None else eos_token_id
        ids = _generate_batch(model.llm, [rows[i] for i in chunk], kv_of, eos, pad_embed, max_new_tokens)
        for i, a in zip(chunk, ids):
            out[i] = a
        later = {rows[i].key for i in order[s + size:]}
        for k in [k for k in kv_of if k not in later]:  # free prefixes no later batch needs
            del kv_of[k]
    return out


def greedy_answers(model, visual: Sequence[torch.Tensor], conversations: Sequence[Messages | str],
                   max_new_tokens: int = 128, batch_size: int = 16) -> list[str]:
    """Greedy answer texts (special tokens skipped, stripped) per conversation; see the module docstring."""
    ids = greedy_token_ids(model, visual, conversations, max_new_tokens, batch_size)
    return [model.tokenizer.decode(a, skip_special_tokens=True).strip() for a in ids]


__all__ = ["PromptRow", "greedy_answers", "greedy_token_ids", "prompt_rows", "split_prompt"]
