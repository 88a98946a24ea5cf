"""A training run's state on disk: engine checkpoints, the RNG states they carry, ``metrics.csv``.

Checkpoints (``stage_dir/checkpoints/step_NNNNNNN/``, written to ``*.tmp`` then renamed; ``checkpoints/last`` names
the newest; the oldest beyond ``keep`` are deleted) hold the TRAINABLE weights only (``requires_grad``,
:func:`trainable_state`), optimizer and scheduler state, the RNG states (python, numpy, torch, CUDA) of every process
(:func:`rng_state`) and the step (``state.json``). Under DeepSpeed the model/optimizer part goes through
``Accelerator.save_state`` (sharded ZeRO-3 files) or, for ``backend="deepspeed"``, :mod:`hwsi.train.zero3`
(``step_NNNNNNN/deepspeed/``). :func:`save_checkpoint` and :func:`load_checkpoint` are collectives: every process
calls them (each writes and reads its own RNG file). :class:`MetricsLog` is ``metrics.csv`` (losses written with
``repr`` so they round-trip exactly; truncated to a checkpoint's step on resume).

The loop that writes them is :class:`hwsi.train.engine.Engine` (its module docstring: data order, resumption).
"""

from __future__ import annotations

import csv
import json
import logging
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from hwsi.errors import HwsiError
from hwsi.train import zero3

log = logging.getLogger(__name__)


class TrainError(HwsiError):
    """A training run cannot start or continue (missing checkpoint, mismatched weights, no data)."""


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that require grad, detached on CPU (what checkpoints and stage outputs hold)."""
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: nn.Module, state: dict[str, torch.Tensor], where: str = "") -> None:
    """Copy ``state`` into ``model``'s parameters; every trainable parameter must be present, nothing unknown."""
    params = dict(model.named_parameters())
    unknown = sorted(set(state) - set(params))
    missing = sorted(n for n, p in params.items() if p.requires_grad and n not in state)
    if unknown or missing:
        raise TrainError(f"{where}: weights do not match the model (unknown {unknown[:5]}, missing {missing[:5]})")
    with torch.no_grad():
        for n, v in state.items():
            if params[n].shape != v.shape:
                raise TrainError(f"{where}: {n} has shape {tuple(v.shape)}, the model {tuple(params[n].shape)}")
            params[n].copy_(v.to(params[n].dtype))


class MetricsLog:
    """``metrics.csv``: one row per logged optimizer step; header fixed by the first row."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fields: list[str] | None = None
        if path.is_file():
            with path.open(newline="") as f:
                self._fields = next(csv.reader(f), None)

    def rows(self) -> list[dict[str, str]]:
        if not self.path.is_file():
            return []
        with self.path.open(newline="") as f:
            return list(csv.DictReader(f))

    def truncate(self, step: int) -> None:
        """Drop rows after ``step`` (logged past the checkpoint a run resumes from); atomic rewrite."""
        if not self.path.is_file() or not self._fields:
            return
        keep = [r for r in self.rows() if int(r["step"]) <= step]
        tmp = self.path.with_name(self.path.name + ".tmp")
        with tmp.open("w", newline="") as f:
            w = csv.DictWriter(f, self._fields)
            w.writeheader()
            w.writerows(keep)
        tmp.replace(self.path)

    def reset(self) -> None:
        self.path.unlink(missing_ok=True)
        self._fields = None

    def append(self, row: dict[str, Any]) -> None:
        new = self._fields is None
        if new:
            self._fields = list(row)
        with self.path.open("a", newline="") as f:
            w = csv.DictWriter(f, self._fields, extrasaction="ignore")
            if new:
                w.writeheader()
            w.writerow({k: (repr(v) if isinstance(v, float) else v) for k, v in row.items()})


def last_checkpoint(root: Path) -> Path | None:
    """The checkpoint ``root/last`` names, when it is complete (has its ``state.json``)."""
    ptr = root / "last"
    if not ptr.is_file():
        return None
    path = root / ptr.read_text().strip()
    return path if (path / "state.json").is_file() else None


def save_checkpoint(acc: Any, root: Path, model: nn.Module, optimizer: Any, scheduler: Any, step: int,
                    seed: int, extra: dict[str, Any], keep: int, deepspeed: bool = False) -> Path:
    """Write ``root/step_NNNNNNN`` (module docstring) from every process; ``extra``: what ``state.json`` holds
    besides the step, the seed and the process count; ``deepspeed``: the model is a ``deepspeed.initialize``
    engine."""
    from accelerate.utils import DistributedType

    is_main = acc.is_main_process
    name = f"step_{step:07d}"
    final = root / name
    tmp = root / (name + ".tmp")
    if is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    acc.wait_for_everyone()
    if deepspeed:
        zero3.save(model, tmp)
    elif acc.distributed_type == DistributedType.DEEPSPEED:
        acc.save_state(str(tmp / "accelerate"))
    elif is_main:
        torch.save(trainable_state(acc.unwrap_model(model)), tmp / "trainable.pt")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(rng_state(), tmp / f"rng_{acc.process_index}.pt")
    acc.wait_for_everyone()
    if is_main:
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        state = {"step": step, "seed": seed, "processes": acc.num_processes, **extra}
        (tmp / "state.json").write_text(json.dumps(state, indent=1))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        ptr_tmp = root / "last.tmp"
        ptr_tmp.write_text(name)
        os.replace(ptr_tmp, root / "last")
        done = sorted(p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))
        for old in done[: max(0, len(done) - max(1, keep))]:
            shutil.rmtree(old, ignore_errors=True)
    acc.wait_for_everyone()
    return final


def load_checkpoint(acc: Any, path: Path, model: nn.Module, optimizer: Any, scheduler: Any,
                    deepspeed: bool = False, name: str = "train") -> int:
    """Restore what :func:`save_checkpoint` wrote into ``model``, ``optimizer``, ``scheduler`` and this process's
    RNGs; returns the step. A checkpoint of the other backend is a TrainError / ConfigError naming it."""
    from accelerate.utils import DistributedType

    state = json.loads((path / "state.json").read_text())
    if state.get("processes", 1) != acc.num_processes:
        log.warning("%s: checkpoint written by %d processes, resuming with %d: data order per process changes",
                    name, state.get("processes"), acc.num_processes)
    if deepspeed:
        zero3.load(model, path)
    elif acc.distributed_type == DistributedType.DEEPSPEED:
        acc.load_state(str(path / "accelerate"))
    else:
        if not (path / "trainable.pt").is_file():
            raise TrainError(f"{path}: no trainable.pt (a checkpoint of backend deepspeed?): resume with the "
                             "backend that wrote it")
        load_trainable_state(acc.unwrap_model(model), torch.load(path / "trainable.pt", weights_only=True),
                             str(path))
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=False))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
    rng = path / f"rng_{acc.process_index}.pt"
    if rng.is_file():
        set_rng_state(torch.load(rng, weights_only=False))
    return int(state["step"])
