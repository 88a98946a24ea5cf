"""Training configuration: one dataclass tree, read from YAML with :func:`hwsi.config.load_config`.

Presets: ``configs/tiny.yaml`` (CPU, seconds–minutes, includes stage 0) and ``configs/paper.yaml`` (the paper's
hyper-parameters, §4 "Training and Implementation": stage 1 50 epochs, lr 1e-3, batch 64, τ 0.02, CCAF 2 blocks
2 heads out 784; stage 2 projectors only, batch 256; stage 3 lr 2e-5, batch 128, LoRA rank 128 α 256;
Qwen2.5-7B-Instruct from a local path, bf16)::

    cfg = load_train_config("configs/tiny.yaml")
    run_stage(1, cfg, job, out)

Batch sizes are GLOBAL (slides / conversations per optimizer step, over all processes). Each process runs
micro-batches of ``micro_batch_size``; gradient accumulation is ``batch_size / (micro_batch_size × processes)``
and must be a whole number (checked by :meth:`OptimConfig.accumulation`). Paths in :class:`DataConfig` are relative
to the job folder unless absolute.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from hwsi.config import load_config, save_config
from hwsi.errors import ConfigError
from hwsi.model.losses import HCALossConfig
from hwsi.model.mllm import MLLMConfig


@dataclass
class DataConfig:
    """Where a job's slides and text are, and which stored features feed the hierarchy."""

    stores: str = "stores"  # folder of <slide_id>.h5 (hwsi.store), relative to the job
    records: str = "text/train.json"  # TRAIN split records (any hwsi.train.records format)
    records_format: str = "auto"
    reports: str = ""  # optional json slide_id -> report (restricted to slides of `records`); "" = longest answer
    captions: str = ""  # optional json slide_id -> caption (stage 2 also trains on captions when given)
    facts: str = ""  # json slide_id -> {name: value} ground-truth findings (stage 0 only; SynthPath facts.json)
    patch_encoder: str = "hwsi_small_patch"  # patches/<name>: the f_ij (Eq. 5)
    region_input: str = "hwsi_small_patch"  # patches/<name>: the ViT-4K input
    text_encoder: str = "minilm"  # stage-1 text tower (hwsi.features.encoders.create_text_encoder)
    memory_cache: int = 512  # slides kept in RAM (LRU) on top of the .pt cache on disk
    # stages 0 and 3: each closed-ended train record (lettered options) is also seen N times with its options
    # re-ordered (hwsi.train.data.permute_options), so the LM picks options by text, not by a letter prior
    option_permutations: int = 0
    # stages 0 and 3: closed-ended answers trained as the option text alone ("focal", not "C) focal"); the scorer
    # accepts either (hwsi.eval.vqa.parse_choice)
    closed_text_answers: bool = False
    # stage 2's data: "reports" = the records answered by a slide's report/caption (the paper); "all" = every train
    # record (short open answers and closed answers too, with option_permutations / closed_text_answers), so the
    # projectors learn to carry each finding the questions ask about
    stage2_records: str = "reports"


@dataclass
class TinyLLMConfig:
    """Stage 0 builds this tiny Qwen2 + BPE tokenizer (hwsi.model.llm.build_tiny_llm) on the TRAIN split's text."""

    vocab_size: int = 512
    hidden: int = 64
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    max_positions: int = 8192


@dataclass
class OptimConfig:
    """Optimiser, schedule, batching and checkpointing of one stage (AdamW + warmup + cosine/linear/constant)."""

    epochs: int = 1
    max_steps: int = 0  # optimizer steps; 0 = epochs × steps per epoch
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_ratio: float = 0.0
    scheduler: str = "cosine"  # cosine | linear | constant (after warmup)
    batch_size: int = 4  # global, per optimizer step
    micro_batch_size: int = 4  # per process per forward
    max_grad_norm: float = 1.0  # 0 = no clipping
    checkpoint_every: int = 0  # optimizer steps; 0 = at the end of every epoch
    keep_checkpoints: int = 2
    log_every: int = 1

    def accumulation(self, processes: int = 1) -> int:
        per_step = self.micro_batch_size * processes
        if self.batch_size < 1 or self.micro_batch_size < 1:
            raise ConfigError(f"batch_size ({self.batch_size}) and micro_batch_size must be >= 1")
        if self.batch_size % per_step:
            raise ConfigError(
                f"batch_size {self.batch_size} is not a multiple of micro_batch_size {self.micro_batch_size} × "
                f"{processes} process(es)"
            )
        return self.batch_size // per_step

    def validate(self, where: str) -> None:
        if self.scheduler not in ("cosine", "linear", "constant"):
            raise ConfigError(f"{where}.scheduler must be cosine, linear or constant, got {self.scheduler!r}")
        if not (self.lr > 0 and self.lr < float("inf")):
            raise ConfigError(f"{where}.lr must be a positive number, got {self.lr}")
        if self.epochs < 1 and self.max_steps < 1:
            raise ConfigError(f"{where}: set epochs >= 1 or max_steps >= 1")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ConfigError(f"{where}.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        self.accumulation(1)


@dataclass
class Stage1Config(OptimConfig):
    """Stage 1 (§3.6, Eq. 6–9): hierarchy + alignment heads (+ last text-encoder layers) under L_HCA."""

    loss: HCALossConfig = field(default_factory=HCALossConfig)
    text_finetune_layers: int = 0  # last N transformer layers of the text encoder trained; 0 = frozen, cached
    max_words: int = 64  # cap of text units per slide and granularity (loss.eq6 "v1")
    max_phrases: int = 64
    max_sentences: int = 32
    # reading v2 (loss.eq6 "pooled"): report clauses routed by keyword rules (hwsi.train.units); "" = the packaged
    # general default, else a YAML relative to the job (SynthPath: COHORT/unit_rules.yaml)
    unit_rules: str = ""
    max_units: int = 32  # cap of clauses per slide and scale
    # candidates of one slide that state the SAME FACT as its own units are masked as negatives, by the train
    # slides' data.facts: "<scale>=<fact>[+<fact>]" (scale: cells, patches, regions, slide or report), e.g.
    # "cells=atypia"; a bank unit is masked for slide b when a slide whose report holds it agrees with b on
    # those facts. Empty: identical text only.
    same_fact: tuple[str, ...] = ()
    text_refresh_every: int = 0  # live text tower: re-encode the whole bank every N steps (0 = once per epoch)


@dataclass
class Stage3Config(OptimConfig):
    """Stage 3 (§3.6): projectors + LoRA on the LLM (peft); answers of every turn are the targets."""

    lora_rank: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    train_projectors: bool = True


@dataclass
class TrainConfig:
    """Everything a run needs; saved as ``RUN/config.yaml`` (dims resolved from the stores) by every stage."""

    seed: int = 0
    precision: str = "no"  # accelerate mixed_precision: no | bf16 | fp16
    llm_dtype: str = "float32"  # dtype the LLM is loaded in: float32 | bfloat16 | float16
    data: DataConfig = field(default_factory=DataConfig)
    model: MLLMConfig = field(default_factory=MLLMConfig)  # llm_path "" = the stage-0 LLM of this run
    tiny_llm: TinyLLMConfig = field(default_factory=TinyLLMConfig)
    stage0: OptimConfig = field(default_factory=lambda: OptimConfig(epochs=20, lr=3e-3))
    stage1: Stage1Config = field(default_factory=Stage1Config)
    stage2: OptimConfig = field(default_factory=OptimConfig)
    stage3: Stage3Config = field(default_factory=lambda: Stage3Config(lr=2e-5))

    def stage(self, n: int) -> OptimConfig:
        if n not in (0, 1, 2, 3):
            raise ConfigError(f"stage must be 0, 1, 2 or 3, got {n}")
        return getattr(self, f"stage{n}")

    def validate(self) -> None:
        if self.precision not in ("no", "bf16", "fp16"):
            raise ConfigError(f"precision must be no, bf16 or fp16, got {self.precision!r}")
        if self.llm_dtype not in ("float32", "bfloat16", "float16"):
            raise ConfigError(f"llm_dtype must be float32, bfloat16 or float16, got {self.llm_dtype!r}")
        if self.data.stage2_records not in ("reports", "all"):
            raise ConfigError(f"data.stage2_records must be reports or all, got {self.data.stage2_records!r}")
        for n in range(4):
            self.stage(n).validate(f"stage{n}")


def load_train_config(path: str | Path) -> TrainConfig:
    """Read and validate a YAML preset (unknown keys are an error naming the file and key)."""
    cfg = load_config(path, TrainConfig)
    cfg.validate()
    return cfg


def save_train_config(cfg: TrainConfig, path: str | Path) -> None:
    save_config(cfg, path)
