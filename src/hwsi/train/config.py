"""Training configuration: one dataclass tree, read from YAML with :func:`hwsi.config.load_config`.

Presets (shipped in the package, ``hwsi/configs/<name>.yaml``, read by name or path): ``tiny`` (CPU,
seconds–minutes, includes stage 0), ``demo`` (`make demo`'s) and ``paper`` (the paper's
hyper-parameters, §4 "Training and Implementation": stage 1 50 epochs, lr 1e-3, batch 64, τ 0.02, CCAF 2 blocks
2 heads out 784; stage 2 projectors only, batch 256; stage 3 lr 2e-5, batch 128, LoRA rank 128 α 256;
Qwen2.5-7B-Instruct from a local path, bf16)::

    cfg = load_train_config("tiny")           # or a path: load_train_config("my.yaml")
    run_stage(1, cfg, job, out)

Batch sizes are GLOBAL (slides / conversations per optimizer step, over all processes). Each process runs
micro-batches of ``micro_batch_size``; gradient accumulation is ``batch_size / (micro_batch_size × processes)``
and must be a whole number (checked by :meth:`OptimConfig.accumulation`). Paths in :class:`DataConfig` are relative
to the job folder unless absolute.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

from hwsi.config import (NonNegFloat, NonNegInt, PositiveFloat, PositiveInt, Range, load_config, preset_path,
                         save_config)
from hwsi.devices import check_device_spec
from hwsi.errors import ConfigError
from hwsi.model.losses import HCALossConfig
from hwsi.model.mllm import MLLMConfig

RecordsFormat = Literal["auto", "wsi-bench-train", "slidechat", "wsi-bench-test", "wsi-llava-test", "slidebench-json",
                        "slidebench-csv", "wsi-vqa", "histgen"]
Beta = Annotated[float, Range(0, 1, hi_open=True)]


@dataclass
class DataConfig:
    """Where a job's slides and text are, and which stored features feed the hierarchy."""

    stores: str = "stores"  # folder of <slide_id>.h5 (hwsi.store), relative to the job
    records: str = "text/train.json"  # TRAIN split records (any hwsi.data format)
    records_format: RecordsFormat = "auto"
    skip_bad_records: bool = False  # leave malformed records out (count and where logged) instead of failing
    reports: str = ""  # optional json slide_id -> report (restricted to slides of `records`); "" = longest answer
    captions: str = ""  # optional json slide_id -> caption (stage 2 also trains on captions when given)
    facts: str = ""  # json slide_id -> {name: value} ground-truth findings (stage 0 only; SynthPath facts.json)
    patch_encoder: str = "hwsi_small_patch"  # patches/<name>: the f_ij (Eq. 5)
    region_input: str = "hwsi_small_patch"  # patches/<name>: the ViT-4K input
    text_encoder: str = "minilm"  # stage-1 text tower (hwsi.features.encoders.create_text_encoder)
    memory_cache: NonNegInt = 512  # slides kept in RAM (LRU) on top of the .pt cache on disk
    # stages 0 and 3: each closed-ended train record (lettered options) is also seen N times with its options
    # re-ordered (hwsi.train.data.permute_options), so the LM picks options by text, not by a letter prior
    option_permutations: NonNegInt = 0
    # stages 0 and 3: closed-ended answers trained as the option text alone ("focal", not "C) focal"); the scorer
    # accepts either (hwsi.eval.vqa.parse_choice)
    closed_text_answers: bool = False
    # stage 2's data: "reports" = the records answered by a slide's report/caption (the paper); "all" = every train
    # record (short open answers and closed answers too, with option_permutations / closed_text_answers), so the
    # projectors learn to carry each finding the questions ask about
    stage2_records: Literal["reports", "all"] = "reports"
    # stage 3: each record answered by the slide's REPORT is seen N times per epoch. A report is 2 records of ~46 per
    # slide (with the option permutations) but the longest answer by far; a tiny LM tuned on that mix often answers
    # a report prompt with one open-answer sentence (docs/ablations.md, "Report facts")
    report_repeats: PositiveInt = 1
    # stages 2 and 3: records with an "roi" (a question about a rectangle of the slide) are answered from that ROI's
    # tokens (hwsi.train.roi_samples, docs/roi.md "Training records"); False leaves them out (whole slides only).
    # Their closed options come already shuffled per record: roi_option_permutations copies each (0 = none)
    roi_records: bool = True
    roi_option_permutations: NonNegInt = 0
    # stage 1: the slides of each micro-batch are read from the slide cache's .pt files and collated by a torch
    # DataLoader (hwsi.train.loader) in this many worker processes, each keeping prefetch_factor micro-batches ready
    # (0 = in the training process, as before; the losses are the same either way). Stages 0, 2 and 3 load in
    # process (docs/cluster.md "Data loading")
    num_workers: NonNegInt = 0
    prefetch_factor: PositiveInt = 2


@dataclass
class TinyLLMConfig:
    """Stage 0 builds this tiny Qwen2 + BPE tokenizer (hwsi.model.llm.build_tiny_llm) on the TRAIN split's text."""

    vocab_size: PositiveInt = 512
    hidden: PositiveInt = 64
    layers: PositiveInt = 2
    heads: PositiveInt = 4
    kv_heads: PositiveInt = 2
    max_positions: PositiveInt = 8192

    def validate(self) -> None:
        if self.hidden % self.heads or self.heads % self.kv_heads:
            raise ConfigError(f"hidden ({self.hidden}) must be a multiple of heads ({self.heads}) and heads of "
                              f"kv_heads ({self.kv_heads})")


@dataclass
class OptimConfig:
    """Optimiser, schedule, batching and checkpointing of one stage (AdamW + warmup + cosine/linear/constant)."""

    epochs: NonNegInt = 1
    max_steps: NonNegInt = 0  # optimizer steps; 0 = epochs × steps per epoch
    lr: PositiveFloat = 1e-3
    weight_decay: NonNegFloat = 0.0
    betas: tuple[Beta, Beta] = (0.9, 0.999)
    warmup_ratio: Annotated[float, Range(0, 1, hi_open=True)] = 0.0
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"  # after warmup
    batch_size: PositiveInt = 4  # global, per optimizer step
    micro_batch_size: PositiveInt = 4  # per process per forward
    max_grad_norm: NonNegFloat = 1.0  # 0 = no clipping
    checkpoint_every: NonNegInt = 0  # optimizer steps; 0 = at the end of every epoch
    keep_checkpoints: PositiveInt = 2
    log_every: PositiveInt = 1

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

    def validate(self, where: str = "") -> None:
        """Rules across fields (each field's type and range is checked by :func:`hwsi.config.from_dict`)."""
        at = f"{where}: " if where else ""
        if self.epochs < 1 and self.max_steps < 1:
            raise ConfigError(f"{at}set epochs >= 1 or max_steps >= 1, got epochs {self.epochs}, "
                              f"max_steps {self.max_steps}")
        try:
            self.accumulation(1)
        except ConfigError as exc:
            raise ConfigError(f"{at}{exc}") from None


@dataclass
class Stage1Config(OptimConfig):
    """Stage 1 (§3.6, Eq. 6–9): hierarchy + alignment heads (+ last text-encoder layers) under L_HCA."""

    loss: HCALossConfig = field(default_factory=HCALossConfig)
    text_finetune_layers: NonNegInt = 0  # last N transformer layers of the text encoder trained; 0 = frozen, cached
    max_words: PositiveInt = 64  # cap of text units per slide and granularity (loss.eq6 "v1")
    max_phrases: PositiveInt = 64
    max_sentences: PositiveInt = 32
    # reading v2 (loss.eq6 "pooled"): report clauses routed by keyword rules (hwsi.train.units); "" = the packaged
    # general default, else a YAML relative to the job (SynthPath: COHORT/unit_rules.yaml)
    unit_rules: str = ""
    max_units: PositiveInt = 32  # cap of clauses per slide and scale
    # candidates of one slide that state the SAME FACT as its own units are masked as negatives, by the train
    # slides' data.facts: "<scale>=<fact>[+<fact>]" (scale: cells, patches, regions, slide or report), e.g.
    # "cells=atypia"; a bank unit is masked for slide b when a slide whose report holds it agrees with b on
    # those facts. Empty: identical text only.
    same_fact: tuple[str, ...] = ()
    text_refresh_every: NonNegInt = 0  # live text tower: re-encode the whole bank every N steps (0 = once per epoch)


@dataclass
class Stage3Config(OptimConfig):
    """Stage 3 (§3.6): projectors + LoRA on the LLM (peft); answers of every turn are the targets."""

    lora_rank: PositiveInt = 8
    lora_alpha: PositiveInt = 16
    lora_dropout: Annotated[float, Range(0, 1, hi_open=True)] = 0.05
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    train_projectors: bool = True


@dataclass
class TrainConfig:
    """Everything a run needs; saved as ``RUN/config.yaml`` (dims resolved from the stores) by every stage."""

    seed: NonNegInt = 0
    # docs/devices.md: `device` is where every stage trains (auto = accelerate's choice: cuda:LOCAL_RANK, else the
    # CPU; `hwsi train --device` overrides it); `llm_dtype` the dtype the LLM's weights are loaded and kept in
    # (`--dtype`; the hierarchy and projectors keep float32 master weights); `precision` accelerate's autocast
    device: str = "auto"  # cpu | cuda | cuda:N | auto (hwsi.devices)
    precision: Literal["no", "bf16", "fp16"] = "no"  # accelerate mixed_precision
    llm_dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # dtype the LLM is loaded in
    # the training loop's backend (docs/cluster.md "DeepSpeed ZeRO-3"): accelerate (also DeepSpeed under `accelerate
    # launch --use_deepspeed`), or deepspeed = deepspeed.initialize driven by hwsi with `deepspeed_config` (ZeRO-3 on
    # CPU processes under torchrun; stages 2 and 3)
    backend: Literal["accelerate", "deepspeed"] = "accelerate"
    deepspeed_config: str = "deepspeed_zero3.json"  # a DeepSpeed JSON file, or a shipped one by file name
    # experiment tracking through accelerate's trackers, offline, under RUN/stageN (hwsi.train.tracking; `hwsi train
    # --log-with`); metrics.csv is always written
    log_with: Literal["none", "tensorboard", "wandb", "mlflow"] = "none"
    # torch's intra-op CPU threads while a stage trains (0 = torch's default, one per core); a tiny model's small
    # matmuls run faster on one thread than split across two cores (docs/machine-facts.md)
    threads: NonNegInt = 0
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
        """Rules across sections (see :meth:`OptimConfig.validate`)."""
        check_device_spec(self.device, "device")
        for n in range(4):
            self.stage(n).validate(f"stage{n}")


def load_train_config(path: str | Path) -> TrainConfig:
    """Read and validate a YAML file or a shipped preset by name (:func:`hwsi.config.preset_path`: an existing
    file wins): unknown keys, values of the wrong type or out of range are an error naming the file and the key
    (:func:`hwsi.config.from_dict`)."""
    return load_config(preset_path(path), TrainConfig)


def save_train_config(cfg: TrainConfig, path: str | Path) -> None:
    save_config(cfg, path)
