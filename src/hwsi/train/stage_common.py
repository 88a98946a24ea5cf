"""What every training stage shares: the run folder's file names, the stage result, weight files, dims.

A stage's final weights are safetensors files in ``RUN/stageN/final/`` (:data:`ALIGNMENT_FILE` for stage 1,
:data:`PROJECTORS_FILE` for stages 2–3); ``RUN/stageN/result.json`` marks a finished stage (:func:`finish_stage`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hwsi.errors import ConfigError
from hwsi.model.inputs import SlideInputs
from hwsi.train.config import TrainConfig
from hwsi.train.data import SlideCache, store_ids
from hwsi.train.engine import FitResult, TrainError

ALIGNMENT_FILE = "alignment.safetensors"
PROJECTORS_FILE = "projectors.safetensors"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class StageResult:
    """What one ``run_stage`` call did."""

    stage: int
    metrics: dict[str, Any]  # final_loss, first_loss, steps, total_steps, n_items, seconds, ...
    checkpoint: Path | None  # newest engine checkpoint (resume point)
    output: Path | None  # the stage's final weights (None until the stage finished)
    losses: list[float] = field(default_factory=list)  # loss of every logged step, all sessions of the run
    finished: bool = False


def finish_stage(stage: int, out: Path, fit: FitResult, n_items: int, output: Path | None, extra: dict[str, Any],
                 is_main: bool = True) -> StageResult:
    """The stage's result; a finished stage writes ``RUN/stageN/result.json`` (what ``resume`` returns later)."""
    metrics = {"steps": fit.steps, "total_steps": fit.total_steps, "n_items": n_items,
               "first_loss": fit.losses[0] if fit.losses else None,
               "final_loss": fit.losses[-1] if fit.losses else None, "seconds": round(fit.seconds, 3), **extra}
    res = StageResult(stage, metrics, fit.last_checkpoint, output if fit.finished else None, fit.losses, fit.finished)
    if fit.finished and is_main and output is not None:
        (out / f"stage{stage}" / "result.json").write_text(
            json.dumps({"metrics": metrics, "output": str(output), "losses": fit.losses,
                        "placement": fit.placement}, indent=1))
    return res


def save_safetensors(state: dict[str, torch.Tensor], path: Path) -> None:
    """Write ``state`` to ``path`` atomically (a temporary name, then renamed)."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(tmp))
    tmp.replace(path)


def load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a stage's weight file; a missing file names the stage to run first."""
    from safetensors.torch import load_file

    if not path.is_file():
        raise TrainError(f"{path}: missing (run the earlier training stage first)")
    return load_file(str(path))


def load_part(module: nn.Module, state: dict[str, torch.Tensor], prefix: str) -> None:
    """Load ``prefix``-ed weights into ``module``. Every key the module has must be there; keys of scales the module
    does not have are ignored (a stage 1 trained with every scale feeding a model with fewer: the "clean" Table 1
    protocol of ``hwsi ablate``)."""
    own = module.state_dict()
    part = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    missing = sorted(set(own) - set(part))
    if missing:
        raise TrainError(f"stage-1 weights lack {prefix}{missing[0]} (and {len(missing) - 1} more): trained with "
                         "another hierarchy configuration?")
    module.load_state_dict({k: part[k] for k in own}, strict=True)


# ------------------------------------------------------------------------------------------ shared set-up
def resolve_dims(cfg: TrainConfig, sample: SlideInputs | None, text_dim: int | None = None,
                 llm_dim: int | None = None) -> TrainConfig:
    """Fill dims left at 0 from the data (stored feature widths, text encoder, LLM); reject mismatches."""
    h = cfg.model.hierarchy
    if sample is not None:
        for name, have, attr in (("patch feature (data.patch_encoder)", sample.patch_feats.shape[-1], "patch_dim"),
                                 ("region input (data.region_input)", sample.region_input.shape[-1], "vit4k.in_dim"),
                                 ("cell embedding", sample.cell_feats.shape[-1], "ccaf.in_dim")):
            obj, key = (h, attr) if "." not in attr else (getattr(h, attr.split(".")[0]), attr.split(".")[1])
            want = getattr(obj, key)
            if want == 0:
                setattr(obj, key, int(have))
            elif want != have:
                raise ConfigError(f"model.hierarchy.{attr} = {want} but the stores' {name} width is {have} "
                                  "(set it to 0 to take it from the data)")
    if h.slide.in_dim == 0:
        h.slide.in_dim = h.vit4k.dim
    if text_dim is not None:
        if cfg.model.text_dim == 0:
            cfg.model.text_dim = int(text_dim)
        elif cfg.model.text_dim != text_dim:
            raise ConfigError(f"model.text_dim = {cfg.model.text_dim} but the text encoder is {text_dim}-d")
    if llm_dim is not None:
        if cfg.model.projector.llm_dim == 0:
            cfg.model.projector.llm_dim = int(llm_dim)
        elif cfg.model.projector.llm_dim != llm_dim:
            raise ConfigError(f"model.projector.llm_dim = {cfg.model.projector.llm_dim} but the LLM is {llm_dim} wide")
    return cfg


def slide_cache(cfg: TrainConfig, job: Path, out: Path) -> tuple[SlideCache, dict[str, Path]]:
    """The run's cache of SlideInputs (``RUN/cache``) over the job's stores, and those stores."""
    stores = store_ids(job, cfg.data)
    if not stores:
        raise TrainError(f"{job}: no stores in {cfg.data.stores!r} (run `hwsi tile` and `hwsi extract` first)")
    m = cfg.model
    return SlideCache(stores, out / "cache", cfg.data, m.max_regions, m.k, m.max_cells), stores
