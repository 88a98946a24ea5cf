"""MLLM-HWSI assembly (paper §3.4–3.5): visual prefix, splicing at ``<image>``, answer-only labels, LM loss.

    Z = [z_c, z_p, z_r, z_WSI, z_text],   z_c = A_c(c_ij), z_p = A_p(f_ij), z_r = A_r(r_i), z_WSI = A_WSI(f_WSI)

Visual prefix of one slide (scales switched off in the hierarchy are left out)::

    <cells> z_c(1,1) … z_c(n_r,k) </cells> <patches> z_p(1,1) … </patches> <regions> z_r(1) … </regions> <slide> z_WSI </slide>

(region-major, then patch order; only real patches/regions) — n_r·k·2 + n_r + 1 tokens plus 8 markers. The
markers are the learned vectors of :class:`hwsi.model.projectors.Projectors`. The prefix replaces the ``<image>``
placeholder of the chat-templated conversation (the text is split at the placeholder string, so any tokenizer
works — Qwen's has no ``<image>`` token) and the whole sequence goes to the LLM as ``inputs_embeds``.

Training API (used by ``hwsi.train``)::

    model = MLLMHWSI(hierarchy, projectors, llm, tokenizer, heads=None, cfg=MLLMConfig())
    visual = model.visual_tokens(batch)                    # list of (n_i, H) per slide
    x = model.build_inputs(visual, conversations)          # MLLMInputs: inputs_embeds, attention_mask, labels
    out = model(batch, conversations)                      # HF CausalLMOutput with .loss (answer tokens only)
    texts = model.generate(batch, questions)               # greedy, deterministic

``conversations``: per slide a list of messages, either ``{"role", "content"}`` or LLaVA ``{"from", "value"}``
(human→user, gpt→assistant). Labels keep ONLY the assistant answers of every turn (each answer's text plus the
template's end-of-turn tokens, so the model learns to stop); prompts, template headers and visual tokens are -100.

Multi-turn chat about one slide with the visual prefix encoded once (KV cache): :class:`hwsi.model.chat.ChatSession`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from hwsi.config import NonNegInt, PositiveInt
from hwsi.model.heads import AlignmentHeads
from hwsi.model.hierarchy import HierarchicalEncoder, HierarchyConfig, HierarchyOutput
from hwsi.model.inputs import SlideBatch
from hwsi.model.llm import load_llm
from hwsi.model.projectors import ProjectorConfig, Projectors

log = logging.getLogger(__name__)

ROLE_MAP = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


@dataclass
class MLLMConfig:
    hierarchy: HierarchyConfig = field(default_factory=HierarchyConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    llm_path: str = ""  # local HF folder (Qwen2.5-7B-Instruct, or a tiny one from build_tiny_llm)
    text_dim: NonNegInt = 0  # stage-1 alignment heads' width (text encoder space); 0 = no heads
    max_regions: PositiveInt = 64  # region cap (ranked by SPF relevance); token budget n_r·k·2 + n_r + 1
    k: PositiveInt = 16  # SPF top-k patches per region
    max_cells: NonNegInt = 64
    image_token: str = "<image>"
    ignore_index: int = -100
    max_length: NonNegInt = 0  # truncate sequences longer than this (0 = no limit)


@dataclass
class MLLMInputs:
    inputs_embeds: torch.Tensor  # (B, L, H)
    attention_mask: torch.Tensor  # (B, L) long
    labels: torch.Tensor  # (B, L) long, ignore_index outside answers
    n_visual: list[int]  # visual tokens (incl. markers) per sample
    n_text: list[int]  # text tokens per sample


def normalize_messages(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    """LLaVA ``from/value`` or ``role/content`` -> ``role/content`` with roles user/assistant/system."""
    out = []
    for m in messages:
        role = m.get("role", m.get("from"))
        content = m.get("content", m.get("value"))
        if role not in ROLE_MAP or content is None:
            raise ValueError(f"message {m!r}: expected role/content or from/value with a known role")
        out.append({"role": ROLE_MAP[role], "content": str(content)})
    return out


def ensure_image(messages: list[dict[str, str]], image_token: str) -> list[dict[str, str]]:
    """Exactly one ``<image>``: kept where it is, else prepended to the first user turn."""
    n = sum(m["content"].count(image_token) for m in messages)
    if n > 1:
        raise ValueError(f"conversation has {n} {image_token} placeholders; one slide = one placeholder")
    if n == 1:
        return messages
    out = [dict(m) for m in messages]
    first = next(i for i, m in enumerate(out) if m["role"] == "user")
    out[first]["content"] = f"{image_token}\n{out[first]['content']}"
    return out


class MLLMHWSI(nn.Module):
    """Hierarchy + projectors (+ optional stage-1 heads) + a Hugging Face causal LM."""

    def __init__(
        self,
        hierarchy: HierarchicalEncoder,
        projectors: Projectors,
        llm: nn.Module,
        tokenizer,
        heads: AlignmentHeads | None = None,
        cfg: MLLMConfig | None = None,
    ) -> None:
        super().__init__()
        self.cfg = cfg or MLLMConfig(hierarchy=hierarchy.cfg, projector=projectors.cfg)
        self.hierarchy = hierarchy
        self.projectors = projectors
        self.heads = heads
        self.llm = llm
        self.tokenizer = tokenizer
        width = llm.get_input_embeddings().weight.shape[1]
        if projectors.cfg.llm_dim != width:
            raise ValueError(f"projector llm_dim {projectors.cfg.llm_dim} != LLM embedding width {width}")

    @classmethod
    def from_config(cls, cfg: MLLMConfig, llm: nn.Module | None = None, tokenizer=None) -> "MLLMHWSI":
        """Build every part from ``cfg``; the LLM is loaded from ``cfg.llm_path`` unless given."""
        if llm is None:
            llm, tokenizer = load_llm(cfg.llm_path)
        hierarchy = HierarchicalEncoder(cfg.hierarchy)
        projectors = Projectors(cfg.hierarchy.dims(), cfg.projector)
        heads = AlignmentHeads(cfg.hierarchy.dims(), cfg.text_dim) if cfg.text_dim else None
        return cls(hierarchy, projectors, llm, tokenizer, heads, cfg)

    # ------------------------------------------------------------------ visual prefix
    @property
    def embed_dtype(self) -> torch.dtype:
        # via parameters(), not .weight: under DeepSpeed ZeRO-3 reading .weight gathers the whole matrix
        return next(self.llm.get_input_embeddings().parameters()).dtype

    def project(self, h: HierarchyOutput, region_token_mask: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Projected, marker-wrapped visual tokens per slide, in paper order [z_c, z_p, z_r, z_WSI].

        ``region_token_mask`` (B, R) bool: the regions whose z_r is kept (default: every real region); an ROI keeps
        the slide's other regions for z_WSI only (:mod:`hwsi.model.roi`)."""
        out = []
        for b in range(h.patch_mask.shape[0]):
            pm, rm = h.patch_mask[b], h.region_mask[b]
            rt = rm if region_token_mask is None else rm & region_token_mask[b].to(rm.device)
            segs = []
            for scale, tok in (("cells", h.cell_tokens), ("patches", h.patch_tokens),
                               ("regions", h.region_tokens), ("slide", h.slide_token)):
                if tok is None:
                    continue
                x = tok[b]
                pos = torch.arange(rm.shape[0], device=x.device)
                if scale in ("cells", "patches"):
                    keep = pm & rm[:, None]
                    x, region = x[keep], pos[:, None].expand_as(keep)[keep]
                elif scale == "regions":
                    x, region = x[rt], pos[rt]
                else:
                    x, region = x[None], None
                y = self.projectors(scale, x)
                if region is not None:
                    y = self.projectors.add_region_identity(y, region)
                if scale == "regions" and h.region_pos is not None:
                    y = self.projectors.add_region_position(y, h.region_pos[b][rt])
                segs.append(self.projectors.wrap(scale, y))
            out.append(torch.cat(segs, dim=0).to(self.embed_dtype))
        return out

    def visual_tokens(self, batch: SlideBatch) -> list[torch.Tensor]:
        return self.project(self.hierarchy(batch))

    # ------------------------------------------------------------------ text + splicing
    def _render(self, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    def segments(self, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> list[tuple[str, bool]]:
        """The rendered conversation cut into (text, is_answer) pieces whose concatenation is the full render."""
        segs: list[tuple[str, bool]] = []
        prev = ""
        for i, m in enumerate(messages):
            full = self._render(messages[: i + 1])
            if m["role"] == "assistant":
                head = self._render(messages[:i], add_generation_prompt=True)
                if not (head.startswith(prev) and full.startswith(head)):
                    raise ValueError("chat template is not prefix-stable; cannot locate the answer tokens")
                segs += [(head[len(prev):], False), (full[len(head):], True)]
            else:
                if not full.startswith(prev):
                    raise ValueError("chat template is not prefix-stable")
                segs.append((full[len(prev):], False))
            prev = full
        if add_generation_prompt:
            segs.append((self._render(messages, add_generation_prompt=True)[len(prev):], False))
        return [(t, a) for t, a in segs if t]

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False).input_ids if text else []

    def _embed_ids(self, ids: list[int], device: torch.device | None = None) -> torch.Tensor:
        emb = self.llm.get_input_embeddings()
        where = next(emb.parameters()).device if device is None else device
        return emb(torch.tensor(ids, dtype=torch.long, device=where))

    def build_inputs(
        self,
        visual: list[torch.Tensor],
        conversations: list[list[dict[str, str]]],
        add_generation_prompt: bool = False,
        padding_side: str = "right",
    ) -> MLLMInputs:
        """Splice each slide's visual tokens at its ``<image>`` and pad the batch (see module docstring)."""
        if len(visual) != len(conversations):
            raise ValueError(f"{len(visual)} visual prefixes for {len(conversations)} conversations")
        img, ign = self.cfg.image_token, self.cfg.ignore_index
        # every text piece of the batch (and the pad token) goes through the embedding in ONE call: under DeepSpeed
        # ZeRO-3 each call of a module is a collective, so their number must not depend on the conversations
        all_ids: list[int] = []
        rows_ids: list[tuple[list[torch.Tensor | tuple[int, int]], list[int]]] = []
        n_vis, n_txt = [], []
        for vis, conv in zip(visual, conversations):
            msgs = ensure_image(normalize_messages(conv), img)
            pieces: list[torch.Tensor | tuple[int, int]] = []
            labels: list[int] = []
            text_count = 0
            for text, is_answer in self.segments(msgs, add_generation_prompt):
                parts = text.split(img)
                for j, part in enumerate(parts):
                    ids = self._ids(part)
                    pieces.append((len(all_ids), len(all_ids) + len(ids)))
                    all_ids += ids
                    labels += ids if is_answer else [ign] * len(ids)
                    text_count += len(ids)
                    if j < len(parts) - 1:
                        pieces.append(vis)
                        labels += [ign] * vis.shape[0]
            rows_ids.append((pieces, labels))
            n_vis.append(int(vis.shape[0]))
            n_txt.append(text_count)
        dev = visual[0].device
        text_emb = self._embed_ids(all_ids + [self.tokenizer.pad_token_id], dev)
        pad_vec = text_emb[-1]
        rows: list[tuple[torch.Tensor, list[int]]] = []
        for pieces, labels in rows_ids:
            emb = torch.cat([p if isinstance(p, torch.Tensor) else text_emb[p[0]:p[1]] for p in pieces], dim=0)
            if self.cfg.max_length and emb.shape[0] > self.cfg.max_length:
                log.warning("sequence of %d tokens truncated to max_length %d", emb.shape[0], self.cfg.max_length)
                emb, labels = emb[: self.cfg.max_length], labels[: self.cfg.max_length]
            rows.append((emb, labels))
        log.debug("MLLM inputs: visual tokens %s, text tokens %s", n_vis, n_txt)
        length = max(e.shape[0] for e, _ in rows)
        h = rows[0][0].shape[1]
        embeds = pad_vec.expand(len(rows), length, h).clone()
        attn = torch.zeros(len(rows), length, dtype=torch.long, device=dev)
        labs = torch.full((len(rows), length), ign, dtype=torch.long, device=dev)
        for i, (e, lab) in enumerate(rows):
            n = e.shape[0]
            sl = slice(0, n) if padding_side == "right" else slice(length - n, length)
            embeds[i, sl] = e
            attn[i, sl] = 1
            labs[i, sl] = torch.tensor(lab, dtype=torch.long, device=dev)
        return MLLMInputs(embeds, attn, labs, n_vis, n_txt)

    def forward(self, batch: SlideBatch | HierarchyOutput, conversations: list[list[dict[str, str]]],
                region_token_mask: torch.Tensor | None = None):
        """LM loss on the answers given the visual prefix (stages 2 and 3). ``batch`` may be the frozen hierarchy's
        output for the batch already (stages 2 and 3 cache it per slide: hwsi.train.stage_lm);
        ``region_token_mask`` (B, R) as in :meth:`project` (ROI samples: hwsi.train.roi_samples)."""
        h = batch if isinstance(batch, HierarchyOutput) else self.hierarchy(batch)
        x = self.build_inputs(self.project(h, region_token_mask), conversations)
        return self.llm(inputs_embeds=x.inputs_embeds, attention_mask=x.attention_mask, labels=x.labels)

    @torch.no_grad()
    def generate(self, batch: SlideBatch, questions: list[str | list[dict[str, str]]], max_new_tokens: int = 128,
                 **gen_kwargs) -> list[str]:
        """Greedy answers (deterministic unless ``gen_kwargs`` ask for sampling) for one question per slide."""
        convs = [[{"role": "user", "content": q}] if isinstance(q, str) else q for q in questions]
        x = self.build_inputs(self.visual_tokens(batch), convs, add_generation_prompt=True, padding_side="left")
        gen_kwargs.setdefault("do_sample", False)
        out = self.llm.generate(inputs_embeds=x.inputs_embeds, attention_mask=x.attention_mask,
                                max_new_tokens=max_new_tokens, pad_token_id=self.tokenizer.pad_token_id,
                                eos_token_id=self.tokenizer.eos_token_id, **gen_kwargs)
        return [t.strip() for t in self.tokenizer.batch_decode(out, skip_special_tokens=True)]


__all__ = ["ROLE_MAP", "MLLMConfig", "MLLMHWSI", "MLLMInputs", "ensure_image", "normalize_messages"]
