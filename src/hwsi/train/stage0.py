"""Stage 0 (tiny runs only; NOT in the paper, docs/design.md §5): pretrain the tiny stand-in LLM.

No pretrained LLM exists offline and a frozen random LLM cannot write reports, so a tiny Qwen2 (``build_tiny_llm``,
tokenizer trained on the TRAIN split's text) is pretrained on the train split's records in the same chat format as
stages 2–3, with the slide's ground-truth findings written as words in the ``<image>`` slot (``data.facts``). Never
val/test text. It stands in for Qwen's pretraining: real runs set ``model.llm_path`` and skip it.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import torch
from torch import nn

from hwsi.errors import ConfigError
from hwsi.model.hierarchy import HierarchicalEncoder, HierarchyConfig
from hwsi.model.llm import build_tiny_llm, load_llm
from hwsi.model.mllm import MLLMHWSI, MLLMConfig
from hwsi.model.projectors import ProjectorConfig, Projectors
from hwsi.train.config import TrainConfig
from hwsi.train.data import ChatSample, findings_text, load_train_text, permute_options, store_ids
from hwsi.train.engine import Engine, TrainError, seed_everything
from hwsi.train.processes import process_state
from hwsi.train.stage_common import StageResult, finish_stage, resolve_dims

log = logging.getLogger(__name__)


class FindingsLM(nn.Module):
    """Stage-0 module: the LLM on chat records with the ground-truth findings as words in the ``<image>`` slot.

    The findings' token embeddings take the place of the visual tokens in
    :meth:`hwsi.model.mllm.MLLMHWSI.build_inputs`, so the chat format and the answer-only labels are exactly
    those of stages 2–3 (the hierarchy/projectors of the wrapped MLLMHWSI are not used and not trained).
    """

    def __init__(self, mllm) -> None:
        super().__init__()
        self.mllm = mllm

    def build_inputs(self, findings: list[str], conversations: list[list[dict[str, str]]]):
        """MLLMInputs with each findings text's token embeddings spliced at ``<image>``."""
        m = self.mllm
        return m.build_inputs([m._embed_ids(m._ids(f)) for f in findings], conversations)

    def forward(self, findings: list[str], conversations: list[list[dict[str, str]]]):
        m = self.mllm
        x = self.build_inputs(findings, conversations)
        return m.llm(inputs_embeds=x.inputs_embeds, attention_mask=x.attention_mask, labels=x.labels)


def findings_model(llm: nn.Module, tokenizer, max_length: int = 0) -> FindingsLM:
    """Stage 0's module around ``llm``: every LLM weight trains, nothing else exists to train."""
    width = llm.get_input_embeddings().weight.shape[1]
    text_only = MLLMHWSI(HierarchicalEncoder(HierarchyConfig.tiny()),
                         Projectors({}, ProjectorConfig(hidden=1, llm_dim=width, markers=False)), llm, tokenizer,
                         cfg=MLLMConfig(max_length=max_length))
    model = FindingsLM(text_only)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in llm.parameters():
        p.requires_grad_(True)
    return model


def stage0_corpus(samples: list[ChatSample], findings: dict[str, str]) -> list[str]:
    """The TRAIN split's text (turns without ``<image>``, plus findings) the tiny tokenizer is trained on."""
    corpus = [m["content"].replace("<image>", " ").strip() for s in samples for m in s.messages]
    corpus += list(findings.values()) + ["system", "user", "assistant"]
    return [c for c in corpus if c]


def run_stage0(cfg: TrainConfig, job: Path, out: Path, resume: bool, stop_after: int | None,
            progress: bool) -> StageResult:
    if cfg.model.llm_path:
        raise ConfigError("stage 0 pretrains the tiny stand-in LLM; this config names a real LLM "
                          f"(model.llm_path={cfg.model.llm_path!r}), so skip stage 0")
    if not cfg.data.facts:
        raise ConfigError("stage 0 needs data.facts (json slide_id -> ground-truth findings)")
    stores = store_ids(job, cfg.data)
    text = load_train_text(job, cfg.data, stores, need_stores=False)
    findings = {sid: findings_text(f) for sid, f in text.facts.items() if isinstance(f, dict)}
    # ROI records (docs/roi.md "Training records") are about part of a slide: its findings would be the wrong words
    whole = [s for s in text.samples if s.roi is None]
    samples = [s for s in whole if findings.get(s.slide_id)]
    if not samples:
        raise TrainError("stage 0: no train record has findings in data.facts")
    n_records = len(samples)
    samples = permute_options(samples, cfg.data.option_permutations, cfg.seed, cfg.data.closed_text_answers)
    if n_records < len(whole):
        log.warning("stage 0: %d of %d records have no findings and are skipped", len(whole) - n_records, len(whole))
    stage_dir = out / "stage0"
    init_dir = stage_dir / "llm_init"
    state = process_state(cfg.device, cfg.precision)
    with state.main_process_first():  # several processes: the main one builds the initial LLM, all then load it
        if state.is_main_process and not (resume and (init_dir / "config.json").is_file()):
            t = cfg.tiny_llm
            build_tiny_llm(init_dir, stage0_corpus(samples, findings), vocab_size=t.vocab_size, hidden=t.hidden,
                           layers=t.layers, heads=t.heads, kv_heads=t.kv_heads, max_positions=t.max_positions,
                           seed=cfg.seed)
    llm, tok = load_llm(init_dir)
    cfg = resolve_dims(cfg, None, llm_dim=llm.get_input_embeddings().weight.shape[1])
    seed_everything(cfg.seed)
    model = findings_model(llm, tok, cfg.model.max_length)
    engine = Engine(stage_dir, cfg.stage0, cfg.seed, cfg.precision, progress, "stage0", device=cfg.device,
                    dtype="float32", log_with=cfg.log_with)

    def step(m: nn.Module, batch: list[ChatSample]) -> tuple[torch.Tensor, dict[str, float]]:
        return m([findings[s.slide_id] for s in batch], [s.messages for s in batch]).loss, {}

    fit = engine.fit(model, samples, step, resume=resume, stop_after=stop_after)
    output = stage_dir / "llm"
    if fit.finished and engine.is_main:
        tmp = stage_dir / "llm.tmp"
        engine.unwrap(model).mllm.llm.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if output.exists():
            shutil.rmtree(output)
        tmp.replace(output)
    return finish_stage(0, out, fit, len(samples), output, {"vocab": len(tok)}, engine.is_main)
