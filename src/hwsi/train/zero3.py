"""DeepSpeed ZeRO-3 driven directly (``TrainConfig.backend: deepspeed``; docs/cluster.md "DeepSpeed ZeRO-3").

The one training loop (:class:`hwsi.train.engine.Engine`) has two backends:

* ``accelerate`` (default): ``Accelerator.prepare``; on GPUs ``accelerate launch --use_deepspeed
  --deepspeed_config_file ...`` makes that a DeepSpeed run too (accelerate fills the config's ``auto`` values).
* ``deepspeed``: the Engine hands the model and its AdamW to ``deepspeed.initialize`` itself, with the JSON of
  ``TrainConfig.deepspeed_config`` completed by :func:`deepspeed_settings`. This is the path that runs ZeRO-3 on
  CPU processes (torchrun, gloo; or one process, no launcher): there accelerate ignores DeepSpeed
  (``ACCELERATE_USE_CPU``). Under torchrun on GPUs it is the same code (not run here: no GPU).

What this module owns: the completed config, ``initialize``, the sharded checkpoint folder
(``step_NNNNNNN/deepspeed/state/``: per process R ``zero_pp_rank_R_mp_rank_00_model_states.pt`` and
``zero_pp_rank_R_mp_rank_00_optim_states.pt`` — its shard of the trainable weights' fp32 copy and AdamW state —
in DeepSpeed's own format, plus DeepSpeed's ``zero_to_fp32.py``) and :func:`gathered`, which
rebuilds ZeRO-3-partitioned parameters in full on every process for the final save.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from torch import nn

from hwsi.config import shipped_file
from hwsi.errors import ConfigError
from hwsi.train.config import OptimConfig

CHECKPOINT_DIR = "deepspeed"  # inside step_NNNNNNN/
CHECKPOINT_TAG = "state"


def deepspeed_settings(path: str | Path, stage: OptimConfig, accumulation: int, processes: int,
                       precision: str) -> dict[str, Any]:
    """The DeepSpeed config of ``path`` (a JSON file, or a shipped one by file name: ``deepspeed_zero3.json``) with
    what accelerate would fill in: the batch sizes, accumulation and clipping of ``stage``, bf16/fp16 from the run's
    ``precision``; remaining ``"auto"`` values of ``zero_optimization`` are left to DeepSpeed's defaults."""
    if importlib.util.find_spec("deepspeed") is None:
        raise ConfigError("backend: deepspeed needs the deepspeed package: pip install 'hwsi[deepspeed]' "
                          "(deepspeed==0.19.8)")
    p = Path(path)
    if not p.is_file() and len(p.parts) == 1 and shipped_file(p.name).is_file():
        p = shipped_file(p.name)
    try:
        cfg = json.loads(p.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{p}: not a readable DeepSpeed JSON config (deepspeed_config): {exc}") from None
    if not isinstance(cfg, dict) or "zero_optimization" not in cfg:
        raise ConfigError(f"{p}: a DeepSpeed config needs a zero_optimization section (deepspeed_config)")
    cfg = {k: copy.deepcopy(v) for k, v in cfg.items() if not k.startswith("_")}
    cfg["zero_optimization"] = {k: v for k, v in cfg["zero_optimization"].items() if v != "auto"}
    cfg.update(train_micro_batch_size_per_gpu=stage.micro_batch_size, gradient_accumulation_steps=accumulation,
               train_batch_size=stage.micro_batch_size * accumulation * processes,
               gradient_clipping=float(stage.max_grad_norm), zero_allow_untested_optimizer=True)
    cfg["bf16"] = {"enabled": precision == "bf16"}
    cfg["fp16"] = {"enabled": precision == "fp16"}
    cfg.setdefault("steps_per_print", 10**9)
    return cfg


def initialize(model: nn.Module, optimizer: Any, settings: dict[str, Any]) -> tuple[Any, Any]:
    """``deepspeed.initialize`` on the process group already formed (accelerate's; one process: a group of one
    made here): the engine
    (a module whose ``.module`` is ``model``, its parameters partitioned in place) and the ZeRO optimizer."""
    import deepspeed
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():  # one process without a launcher: a process group of one (in memory)
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", store=dist.HashStore(), rank=0,
                                world_size=1)
        os.environ.setdefault("LOCAL_RANK", "0")  # deepspeed.initialize insists on it (a launcher sets it)
    engine, zero_optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=settings,
                                                       dist_init_required=False)
    return engine, zero_optimizer


def save(engine: Any, folder: Path) -> None:
    """Every process writes its shard of the trainable weights and optimizer state under ``folder`` (collective)."""
    engine.save_checkpoint(str(folder / CHECKPOINT_DIR), tag=CHECKPOINT_TAG, save_latest=False,
                           exclude_frozen_parameters=True)


def load(engine: Any, folder: Path) -> None:
    """Restore what :func:`save` wrote (frozen weights are not in the checkpoint: they stay as built)."""
    where = folder / CHECKPOINT_DIR
    if not (where / CHECKPOINT_TAG).is_dir():
        raise ConfigError(f"{folder}: no DeepSpeed checkpoint ({CHECKPOINT_DIR}/{CHECKPOINT_TAG}); written by "
                          "backend accelerate? resume with the backend that wrote it")
    path, _ = engine.load_checkpoint(str(where), tag=CHECKPOINT_TAG, load_module_strict=False,
                                     load_optimizer_states=True, load_lr_scheduler_states=False)
    if path is None:
        raise ConfigError(f"{where}: DeepSpeed could not load the checkpoint")


@contextlib.contextmanager
def gathered(module: nn.Module, select: Callable[[str], bool]) -> Iterator[nn.Module]:
    """``module`` with the parameters whose names ``select`` accepts whole on every process (ZeRO-3 keeps only a
    shard per process; a collective: every process enters it); without ZeRO-3 partitioning: ``module`` as is."""
    params = [p for n, p in module.named_parameters() if select(n) and hasattr(p, "ds_id")]
    if not params:
        yield module
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        yield module
