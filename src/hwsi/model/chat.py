"""Multi-turn chat about one slide with an :class:`~hwsi.model.mllm.MLLMHWSI`, the visual prefix prefilled once.

    chat = ChatSession(model, slide_inputs)                # encodes + prefills the visual prefix once (KV cache)
    for piece in chat.stream("What is the grade?"): ...    # forwards only the new tokens; greedy
    answer = chat.ask("And the stage?", on_token=print)    # multi-turn: continues the cache
    chat.reset()                                           # back to the cached prefix (new conversation)
    scores = chat.relevance(text_embedding)                # (R, k) evidence per selected patch
    answers = chat.ask_each(["Grade?", "Stage?"])          # independent one-turn answers, batched (no history)

The conversation is rendered with the same chat template and ``<image>`` splicing as training
(:meth:`hwsi.model.mllm.MLLMHWSI.build_inputs`); batched one-shot answers are :meth:`ChatSession.ask_each` (one
slide) and :func:`hwsi.model.generate.greedy_answers` (many slides; docs/generation.md).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import torch

from hwsi.model.generate import greedy_token_ids
from hwsi.model.inputs import SlideInputs, collate_slides

if TYPE_CHECKING:
    from hwsi.model.mllm import MLLMHWSI


class ChatSession:
    """Multi-turn chat about one slide with the visual prefix encoded and prefilled ONCE.

    The LLM's KV cache (``DynamicCache``) holds the template text before ``<image>`` plus the visual tokens; each
    question forwards only its new tokens (the rendered conversation's suffix not seen yet), then decodes greedily
    one token per forward. ``tokens_forwarded`` counts every token position passed to the LLM.

    Evidence: :meth:`relevance` returns, per selected patch, cos(t, z_p) between a question's text embedding t
    (from the stage-1 text encoder) and the patch's stage-1 aligned embedding z_p = norm(H_p f_ij) — the space
    Eq. 6 trains patches ↔ phrases in. It explains which patches match the question's wording; it is not an
    attribution of the LLM's answer. Coordinates of the patches: ``inputs.patch_coords``.

    ``region_token_mask`` (R,) bool keeps only those regions' z_r (an ROI: :func:`hwsi.model.roi.roi_slide_inputs`).
    """

    def __init__(self, model: MLLMHWSI, inputs: SlideInputs, system: str | None = None,
                 max_new_tokens: int = 256, region_token_mask: torch.Tensor | None = None) -> None:
        from transformers import DynamicCache

        self.model, self.inputs, self.max_new_tokens = model, inputs, max_new_tokens
        self.tok = model.tokenizer
        self.system = [{"role": "system", "content": system}] if system else []
        dev = model.llm.get_input_embeddings().weight.device
        with torch.no_grad():
            h = model.hierarchy(collate_slides([inputs]).to(dev))
            rtm = None if region_token_mask is None else region_token_mask.reshape(1, -1)
            visual = model.project(h, rtm)[0]  # an ROI's inputs + mask: hwsi.model.roi.RoiInputs
            self._z_patches = None
            if model.heads is not None and "patches" in model.heads.heads:
                self._z_patches = model.heads.embed("patches", inputs.patch_feats.to(dev))
            img = model.cfg.image_token
            probe = model._render(self.system + [{"role": "user", "content": f"{img}\nQ"}], add_generation_prompt=True)
            before = probe[: probe.index(img)]
            prefix = torch.cat([model._embed_ids(model._ids(before)), visual], dim=0)
            self.cache = DynamicCache()
            self.tokens_forwarded = 0
            self._forward(inputs_embeds=prefix[None])
        self.prefix_len = self.cache.get_seq_length()
        self.n_visual = int(visual.shape[0])
        self.visual = visual
        self._prefix_text = before + img
        self.reset()

    def _forward(self, input_ids: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        x = input_ids if input_ids is not None else inputs_embeds
        self.tokens_forwarded += int(x.shape[1])
        out = self.model.llm(input_ids=input_ids, inputs_embeds=inputs_embeds, cache=self.cache, use_cache=True)
        return out.logits[0, -1]

    def reset(self) -> None:
        """Forget the conversation; keep the cached visual prefix."""
        extra = self.cache.get_seq_length() - self.prefix_len
        if extra > 0:
            self.cache.crop(-extra)
        self.messages: list[dict[str, str]] = []
        self._consumed = self._prefix_text
        self._unfed: list[int] = []

    @torch.no_grad()
    def stream(self, question: str, max_new_tokens: int | None = None) -> Iterator[str]:
        """Yield the answer's text as it is decoded (greedy). The turn is recorded when the generator finishes."""
        img = self.model.cfg.image_token
        content = question if self.messages else f"{img}\n{question}"
        msgs = self.system + self.messages + [{"role": "user", "content": content}]
        full = self.model._render(msgs, add_generation_prompt=True)
        if not full.startswith(self._consumed):
            raise RuntimeError("chat template re-rendered the history differently; cannot continue the cache")
        new_ids = self._unfed + self.model._ids(full[len(self._consumed):])
        dev = self.model.llm.get_input_embeddings().weight.device
        logits = self._forward(input_ids=torch.tensor([new_ids], device=dev))
        answer: list[int] = []
        shown = ""
        self._unfed = []
        limit = max_new_tokens or self.max_new_tokens
        eos = self.tok.eos_token_id
        for step in range(limit):
            nxt = int(logits.argmax())
            if nxt == eos:
                break
            answer.append(nxt)
            text = self.tok.decode(answer, skip_special_tokens=False)
            if not text.endswith("\ufffd") and len(text) > len(shown):  # wait for complete UTF-8 characters
                yield text[len(shown):]
                shown = text
            if step + 1 < limit:
                logits = self._forward(input_ids=torch.tensor([[nxt]], device=dev))
            else:
                self._unfed = [nxt]
        text = self.tok.decode(answer, skip_special_tokens=False)
        if len(text) > len(shown):
            yield text[len(shown):]
        self.messages += [{"role": "user", "content": content}, {"role": "assistant", "content": text}]
        self._consumed = full + text

    def ask(self, question: str, on_token: Callable[[str], None] | None = None,
            max_new_tokens: int | None = None) -> str:
        """The whole answer; ``on_token`` receives each streamed piece."""
        pieces = []
        for piece in self.stream(question, max_new_tokens):
            pieces.append(piece)
            if on_token is not None:
                on_token(piece)
        return "".join(pieces)

    def ask_each(self, questions: list[str], max_new_tokens: int | None = None, batch_size: int = 16) -> list[str]:
        """Each question answered on its own (a fresh one-turn conversation with this session's system prompt, no
        history), ``batch_size`` at a time sharing the visual prefix (:func:`hwsi.model.generate.greedy_token_ids`);
        decoded as :meth:`stream` decodes (special tokens kept, not stripped). The session's conversation is
        untouched."""
        img = self.model.cfg.image_token
        convs = [self.system + [{"role": "user", "content": f"{img}\n{q}"}] for q in questions]
        ids = greedy_token_ids(self.model, [self.visual] * len(convs), convs,
                               max_new_tokens or self.max_new_tokens, batch_size)
        return [self.tok.decode(a, skip_special_tokens=False) for a in ids]

    @torch.no_grad()
    def relevance(self, text_embedding: torch.Tensor) -> torch.Tensor:
        """cos(t, z_p) per selected patch: (D,) -> (R, k), (Q, D) -> (Q, R, k); NaN at padding (see class doc)."""
        if self._z_patches is None:
            raise RuntimeError("relevance needs the stage-1 alignment heads (MLLMConfig.text_dim > 0)")
        t = torch.nn.functional.normalize(text_embedding.to(self._z_patches), dim=-1)
        scores = torch.einsum("rkd,...d->...rk", self._z_patches, t)
        mask = self.inputs.patch_mask.to(scores.device)
        return scores.masked_fill(~mask, float("nan")).cpu()
