"""Stage 2: projectors only (hierarchy from stage 1 frozen, LLM frozen); LM loss on the reports (and captions, when
``data.captions`` is set) of the train records, i.e. the records whose answer is the slide's report/caption; with
``data.stage2_records: all`` on every train record (as stage 3 sees them), so the projectors learn each finding.

Stage 3: projectors + LoRA (peft, ``stage3.lora_rank/alpha``) on the LLM; LM loss on the answers of every turn of
every train record (prompt tokens masked by :meth:`hwsi.model.mllm.MLLMHWSI.build_inputs`).

Both stages are ONE template, :func:`run_lm_stage`: the same data loading, model set-up (:func:`stage_model`),
LM step and engine; they differ only in their samples (:func:`lm_samples`), their trainable parameters and the
weights they save.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

from hwsi.errors import ConfigError
from hwsi.model.hierarchy import HierarchyOutput
from hwsi.model.inputs import collate_slides
from hwsi.model.llm import load_llm
from hwsi.model.mllm import MLLMHWSI
from hwsi.train.config import TrainConfig, load_train_config, save_train_config
from hwsi.train.data import ChatSample, SlideCache, TrainText, load_train_text, permute_options
from hwsi.train.engine import Engine, TrainError, seed_everything
from hwsi.train.processes import process_state
from hwsi.train.roi_samples import VisualInputs
from hwsi.train.stage_common import (
    ALIGNMENT_FILE,
    DTYPES,
    PROJECTORS_FILE,
    StageResult,
    finish_stage,
    load_part,
    load_safetensors,
    resolve_dims,
    save_safetensors,
    slide_cache,
)


def _saved_config(out: Path) -> TrainConfig | None:
    p = out / "config.yaml"
    return load_train_config(p) if p.is_file() else None


def llm_folder(cfg: TrainConfig, out: Path) -> Path:
    """The LLM of a run: ``model.llm_path`` or, when empty, the stage-0 LLM ``out/stage0/llm``."""
    p = Path(cfg.model.llm_path).expanduser() if cfg.model.llm_path else out / "stage0" / "llm"
    if not (p / "config.json").is_file():
        raise TrainError(f"{p}: no LLM there (set model.llm_path to a local HF folder, or run stage 0 for tiny runs)")
    return p


def build_model(cfg: TrainConfig, out: Path, stage: int, device: str = "cpu"):
    """MLLMHWSI with the LLM of the run (in ``cfg.llm_dtype``, loaded onto ``device``) and the stage-1 weights loaded
    (+ stage-2 projectors for stage 3); training loads on the CPU and lets accelerate place the model."""
    cfg = _dims_from_run(cfg, out)
    llm, tok = load_llm(llm_folder(cfg, out), dtype=DTYPES[cfg.llm_dtype], device=device)
    cfg = resolve_dims(cfg, None, llm_dim=llm.get_input_embeddings().weight.shape[1])
    seed_everything(cfg.seed)
    model = MLLMHWSI.from_config(cfg.model, llm, tok)
    align = load_safetensors(out / "stage1" / "final" / ALIGNMENT_FILE)
    load_part(model.hierarchy, align, "hierarchy.")
    if model.heads is not None:
        load_part(model.heads, align, "heads.")
    if stage >= 3:
        model.projectors.load_state_dict(load_safetensors(out / "stage2" / "final" / PROJECTORS_FILE))
    return model, cfg


def _dims_from_run(cfg: TrainConfig, out: Path) -> TrainConfig:
    """Dims left at 0 in ``cfg`` taken from the run's saved config (written by the stage that resolved them)."""
    saved = _saved_config(out)
    if saved is None:
        return cfg
    cfg = copy.deepcopy(cfg)
    h, hs = cfg.model.hierarchy, saved.model.hierarchy
    for obj, ref, key in ((h, hs, "patch_dim"), (h.ccaf, hs.ccaf, "in_dim"), (h.vit4k, hs.vit4k, "in_dim"),
                          (h.slide, hs.slide, "in_dim"), (cfg.model, saved.model, "text_dim")):
        if getattr(obj, key) == 0:
            setattr(obj, key, getattr(ref, key))
    return cfg


def _stage_cfg_from_run(cfg: TrainConfig, out: Path, cache: SlideCache, slides: list[str]) -> TrainConfig:
    saved = _saved_config(out)
    text_dim = saved.model.text_dim if saved is not None and saved.model.text_dim else None
    return resolve_dims(cfg, cache.get(slides[0]), text_dim=text_dim)


class FrozenHierarchyCache:
    """The frozen hierarchy's output per visual prefix (a slide, or an ROI of one), computed once and kept (LRU of
    ``size``).

    Stages 2 and 3 train the projectors (+ LoRA) on top of a hierarchy that is frozen and has no dropout, so its
    output for a slide (Eq. 3-5: c_ij, f_ij, r_i, f_WSI) is the same at every step. Computing it at every step was
    ~40 % of a stage-2/3 step on the demo (docs/training-profile.md). The projectors still run
    at every step: they train. When any hierarchy parameter requires grad the cache is not used.
    """

    def __init__(self, inputs: VisualInputs, device: torch.device, size: int) -> None:
        self.inputs, self.device, self.size = inputs, device, max(1, size)
        self.outputs: OrderedDict[str, HierarchyOutput] = OrderedDict()

    def batch(self, hierarchy: nn.Module, samples: list[ChatSample]) -> HierarchyOutput:
        keys = [s.visual_key for s in samples]
        missing = {s.visual_key: s for s in samples if s.visual_key not in self.outputs}
        if missing:
            with torch.no_grad():
                h = hierarchy(collate_slides([self.inputs.get(s)[0] for s in missing.values()]).to(self.device))
            for key, out in zip(missing, h.split(), strict=True):
                self.outputs[key] = out
        for key in keys:
            self.outputs.move_to_end(key)
        batch = HierarchyOutput.collate([self.outputs[k] for k in keys])
        while len(self.outputs) > max(self.size, len(set(keys))):
            self.outputs.popitem(last=False)
        return batch


def _lm_step(cache: SlideCache, device: torch.device, memory_slides: int, frozen_hierarchy: nn.Module):
    """The LM step; the frozen hierarchy's outputs come from ``frozen_hierarchy``, a copy of the model's made before
    training: each process computes only the slides it misses, so it must not be a ZeRO-3-partitioned module
    (whose every forward is a collective all processes must run together). ROI samples (records with ``roi``) are
    answered from the ROI's tokens (:mod:`hwsi.train.roi_samples`)."""
    inputs = VisualInputs(cache)
    frozen = FrozenHierarchyCache(inputs, device, memory_slides)

    def step(m: nn.Module, samples: list[ChatSample]) -> tuple[torch.Tensor, dict[str, float]]:
        if any(p.requires_grad for p in getattr(m, "module", m).hierarchy.parameters()):
            batch = collate_slides([inputs.get(s)[0] for s in samples]).to(device)
        else:
            batch = frozen.batch(frozen_hierarchy, samples)
        mask = inputs.region_token_mask(samples, batch.region_mask.shape[1])
        return m(batch, [s.messages for s in samples], region_token_mask=mask).loss, {}

    return step


def report_samples(text, use_captions: bool = True) -> list[ChatSample]:
    """Train samples whose (single) answer is the slide's report or caption (stage 2's data)."""
    targets: dict[str, set[str]] = {}
    for sid, r in text.reports.items():
        targets.setdefault(sid, set()).add(r.strip())
    if use_captions:
        for sid, c in text.captions.items():
            targets.setdefault(sid, set()).add(c.strip())
    out = []
    for s in text.samples:
        answers = [m["content"].strip() for m in s.messages if m["role"] == "assistant"]
        if len(answers) == 1 and answers[0] in targets.get(s.slide_id, ()):
            out.append(s)
    return out


def stage_model(stage: int, cfg: TrainConfig, out: Path):
    """The model of stage 2 or 3 with exactly its trainable parameters requiring grad.

    Stage 2: projectors only. Stage 3: LoRA on the LLM (+ projectors when ``stage3.train_projectors``); the base
    LLM, the hierarchy and the heads stay frozen in both.
    """
    model, cfg = build_model(cfg, out, stage)
    for p in model.parameters():
        p.requires_grad_(False)
    if stage == 3:
        seed_everything(cfg.seed + 3)
        add_lora(model, cfg.stage3)
        for n, p in model.llm.named_parameters():
            p.requires_grad_("lora_" in n)
    for p in model.projectors.parameters():
        p.requires_grad_(stage == 2 or cfg.stage3.train_projectors)
    return model, cfg


def add_lora(model, s3) -> None:
    """Wrap ``model.llm`` with peft LoRA (rank/α/dropout/targets of ``s3``); only LoRA weights train in the LLM."""
    from peft import LoraConfig, get_peft_model

    names = {n.rsplit(".", 1)[-1] for n, _ in model.llm.named_modules()}
    targets = [t for t in s3.lora_targets if t in names]
    if not targets:
        raise ConfigError(f"stage3.lora_targets {list(s3.lora_targets)} match no module of the LLM")
    lcfg = LoraConfig(r=s3.lora_rank, lora_alpha=s3.lora_alpha, lora_dropout=s3.lora_dropout,
                      target_modules=targets, task_type="CAUSAL_LM")
    model.llm = get_peft_model(model.llm, lcfg)


def lm_samples(stage: int, cfg: TrainConfig, text: TrainText) -> list[ChatSample]:
    """Stage 2: the report/caption records (``data.stage2_records: reports``) or every record (``all``, with its
    option permutations, as stage 3). Stage 3: every train record with its option permutations, the records
    answered by the slide's report ``data.report_repeats`` times. ROI records (``roi``) come last, with
    ``data.roi_option_permutations`` copies, or not at all when ``data.roi_records`` is False."""
    if stage == 2 and cfg.data.stage2_records == "reports":
        return report_samples(text)
    if stage == 2 and cfg.data.stage2_records != "all":
        raise ConfigError(f"data.stage2_records must be reports or all, got {cfg.data.stage2_records!r}")
    d = cfg.data
    whole = [s for s in text.samples if s.roi is None]
    samples = permute_options(whole, d.option_permutations, cfg.seed, d.closed_text_answers)
    if d.roi_records:  # questions about one ROI of a slide (hwsi.train.roi_samples), after the whole-slide ones
        roi = [s for s in text.samples if s.roi is not None]
        samples += permute_options(roi, d.roi_option_permutations, cfg.seed + 1, d.closed_text_answers)
    if stage == 3:
        samples += report_samples(text, use_captions=False) * (cfg.data.report_repeats - 1)
    return samples


def run_lm_stage(stage: int, cfg: TrainConfig, job: Path, out: Path, resume: bool, stop_after: int | None,
                 progress: bool) -> StageResult:
    """Stage 2 or 3 (module docstring): LM loss on the stage's samples; saves the projectors (+ LoRA for stage 3)."""
    if stage not in (2, 3):
        raise ConfigError(f"run_lm_stage runs stage 2 or 3, got {stage}")
    cache, stores = slide_cache(cfg, job, out)
    text = load_train_text(job, cfg.data, stores)
    samples = lm_samples(stage, cfg, text)
    if not samples:
        raise TrainError("stage 2: no train record answers with a slide's report/caption" if stage == 2
                         else "stage 3: no train records with a store")
    state = process_state(cfg.device, cfg.precision)  # several processes: each builds its share of the cache
    cache.prepare([s.slide_id for s in samples] if stage == 2 else text.slide_ids, progress, state.process_index,
                  state.num_processes, state.wait_for_everyone)
    cfg = _stage_cfg_from_run(cfg, out, cache, [samples[0].slide_id])
    model, cfg = stage_model(stage, cfg, out)
    save_train_config(cfg, out / "config.yaml")
    name = f"stage{stage}"
    engine = Engine(out / name, cfg.stage2 if stage == 2 else cfg.stage3, cfg.seed, cfg.precision, progress, name,
                    device=cfg.device, dtype=cfg.llm_dtype, backend=cfg.backend, deepspeed_config=cfg.deepspeed_config,
                    log_with=cfg.log_with)
    n_lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)  # before ZeRO-3 partitions them
    device = engine.accelerator.device
    frozen_hierarchy = copy.deepcopy(model.hierarchy).to(device)
    fit = engine.fit(model, samples, _lm_step(cache, device, cfg.data.memory_cache, frozen_hierarchy),
                     resume=resume, stop_after=stop_after)
    final = out / name / "final"
    if fit.finished:  # ZeRO-3: the shards gathered on every process, written by the main one
        with engine.gathered(model, lambda n: n.startswith("projectors.") or "lora_" in n) as m:
            if engine.is_main:
                save_safetensors(m.projectors.state_dict(), final / PROJECTORS_FILE)
                if stage == 3:
                    m.llm.save_pretrained(str(final / "lora"))
    if stage == 2:
        return finish_stage(2, out, fit, len(samples), final / PROJECTORS_FILE, {}, engine.is_main)
    return finish_stage(3, out, fit, len(samples), final, {"lora_params": n_lora}, engine.is_main)
