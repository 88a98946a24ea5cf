"""The training stages of MLLM-HWSI (paper §3.6, §4) and the Python API ``run_stage``.

    result = run_stage(stage, cfg, job, out, resume=False)   # -> StageResult(metrics, checkpoint, losses, ...)

Run folder ``out`` (one per experiment; every stage writes ``out/config.yaml`` with the dims it resolved)::

    cache/inputs-<hash>/<slide>.pt   SlideInputs per slide;  cache/text-<encoder>.pt  frozen text embeddings
    stage0/llm/                      the pretrained tiny LLM (HF folder; tiny runs only)
    stage1/final/alignment.safetensors   hierarchy (CCAF, ViT-4K, ViT_WSI) + alignment heads (+ text layers)
    stage2/final/projectors.safetensors
    stage3/final/projectors.safetensors, stage3/final/lora/   (peft adapter)
    stageN/metrics.csv, stageN/checkpoints/, stageN/result.json
    bundle/                          what the stores were made with (hwsi.train.bundle; stages 1–3)

One module per stage: :mod:`hwsi.train.stage0` (the tiny stand-in LLM; tiny runs only, NOT in the paper),
:mod:`hwsi.train.stage1` (hierarchical alignment, Eq. 6–9), :mod:`hwsi.train.stage_lm` (stages 2 and 3 from one
template: projectors, then projectors + LoRA). What they share is in :mod:`hwsi.train.stage_common`.
"""

from __future__ import annotations

import copy
import functools
import json
import logging
from pathlib import Path

import torch

from hwsi.devices import resolve_placement
from hwsi.errors import ConfigError
from hwsi.train.bundle import record_bundle
from hwsi.train.config import TrainConfig
from hwsi.train.data import store_ids
from hwsi.train.engine import seed_everything
from hwsi.train.processes import process_state
from hwsi.train.stage0 import run_stage0
from hwsi.train.stage1 import run_stage1
from hwsi.train.stage_common import StageResult
from hwsi.train.stage_lm import run_lm_stage

log = logging.getLogger(__name__)

__all__ = ["StageResult", "record_run_bundle", "run_stage"]


def run_stage(stage: int, cfg: TrainConfig, job: str | Path, out: str | Path, resume: bool = False,
              stop_after: int | None = None, progress: bool = True) -> StageResult:
    """Run training stage 0–3 of ``cfg`` on job folder ``job`` into run folder ``out`` (module docstring).

    ``resume``: continue from the stage's last checkpoint (a finished stage is not retrained).
    ``stop_after``: interrupt after this many optimizer steps in total (checkpointed; resume later).
    """
    cfg = copy.deepcopy(cfg)
    cfg.validate()
    resolve_placement(cfg.device, cfg.llm_dtype, "device")  # no CUDA, float16 on the CPU: one line, before any work
    job, out = Path(job), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    fn = {0: run_stage0, 1: run_stage1, 2: functools.partial(run_lm_stage, 2),
          3: functools.partial(run_lm_stage, 3)}.get(stage)
    if fn is None:
        raise ConfigError(f"stage must be 0, 1, 2 or 3, got {stage}")
    if cfg.backend == "deepspeed" and stage < 2:
        raise ConfigError(f"backend: deepspeed drives stages 2 and 3 (ZeRO-3 over the LLM); run stage {stage} with "
                          "backend accelerate (docs/cluster.md \"DeepSpeed ZeRO-3\")")
    state = process_state(cfg.device, cfg.precision)  # several processes: the main one writes the bundle first,
    with state.main_process_first():  # the others then only check the stores against it
        record_run_bundle(stage, cfg, job, out, fresh=stage == 1 and not resume and state.is_main_process)
    stage_dir = out / f"stage{stage}"
    done = stage_dir / "result.json"
    if resume and done.is_file():
        saved = json.loads(done.read_text())
        log.info("stage %d already finished in %s; nothing to do", stage, stage_dir)
        return StageResult(stage, saved["metrics"], None, Path(saved["output"]), saved.get("losses", []), True)
    done.unlink(missing_ok=True)
    seed_everything(cfg.seed)
    before = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        return fn(cfg, job, out, resume, stop_after, progress)
    finally:
        torch.set_num_threads(before)  # the caller's setting again (tests, the demo's later steps)


def record_run_bundle(stage: int, cfg: TrainConfig, job: Path, out: Path, fresh: bool = False) -> None:
    """Stages 1–3: ``RUN/bundle`` records how the job's stores were made (:mod:`hwsi.train.bundle`), also when a
    finished stage is resumed (so runs trained before it existed get one); a job made another way than the run's
    earlier stages is a ConfigError (``fresh``: stage 1 from scratch replaces it). Stage 0 reads no features."""
    if stage in (1, 2, 3):
        stores = store_ids(job, cfg.data)
        if stores:
            record_bundle(job, stores, out, replace=fresh)
