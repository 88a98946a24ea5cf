"""The training loop shared by every stage: accelerate from one CPU process to many GPUs, exact resumption.

``Engine(stage_dir, optim_cfg, seed, precision).fit(model, items, step_fn, resume=...)`` runs AdamW with a warmup +
cosine/linear/constant schedule over ``items`` (anything indexable: slides, conversations), calling
``step_fn(model, micro_batch_items) -> (loss, {term: value})`` for each micro-batch — or, given a picklable
``load`` (list of items -> batch), ``step_fn(model, load(micro_batch_items))`` with ``load`` run by a torch
DataLoader (``num_workers`` worker processes, ``prefetch_factor``; :mod:`hwsi.train.loader`) in exactly this order.

Data order. Epoch ``e`` visits ``items`` in the permutation drawn from ``torch.Generator`` seeded with
``(seed, e)`` — independent of every other random stream — so the data-order position is just the optimizer step
(epoch = step // steps_per_epoch, offset = step % steps_per_epoch). Each global batch of ``batch_size`` indices is
cut into ``accumulation`` consecutive micro-steps (gradient accumulation via ``Accelerator.accumulate``), and each
micro-step's slice across the processes: micro-step k of W processes with micro-batch M covers the batch's items
``[k·M·W, (k+1)·M·W)``, process r the M of them from ``k·M·W + r·M``. So W processes with micro-batch M see, at each
micro-step, exactly the items one process with micro-batch M·W sees at that micro-step (what an in-batch term
gathered across processes needs, :func:`hwsi.model.losses.slide_report_loss`), and the SET of micro-batches of one
process with micro-batch M and W× the accumulation (what a token-mean LM loss needs). A last partial batch of an
epoch is dropped, so every optimizer step sees the same number of items. Fewer items than ``batch_size``: the batch
shrinks to the largest multiple of ``micro_batch_size × processes`` that fits (logged).

Several processes (docs/cluster.md "Training on several processes"): the logged loss and terms are the means over
processes (equal shares, so the mean over the global batch); ``stage_dir/processes.json`` (main process, atomic)
records the accelerate state of the session (``num_processes``, ``WORLD_SIZE``, distributed type) and, per process,
its pid, host and the item indices of its first steps, so a test can prove the ranks saw different shards.
:func:`hwsi.train.processes.process_state` creates the process group before a stage's data preparation.

Checkpoints (:mod:`hwsi.train.checkpoints`: ``stage_dir/checkpoints/step_NNNNNNN/``, atomic) hold the trainable
weights, optimizer and scheduler state, the RNG states of every process and the step. ``fit(resume=True)`` restores
all of it and truncates ``metrics.csv`` to the checkpoint's step, so a stopped and resumed CPU run logs exactly the
losses of an uninterrupted one.

Backends (the seam of docs/cluster.md "DeepSpeed ZeRO-3"): ``backend="accelerate"`` prepares the model with the
``Accelerator`` (one CPU process, DDP, or DeepSpeed under ``accelerate launch --use_deepspeed``);
``backend="deepspeed"`` hands it to ``deepspeed.initialize`` directly (:mod:`hwsi.train.zero3`; how ZeRO-3 runs on
CPU processes, where accelerate ignores DeepSpeed). The loop, data order, schedule, metrics, RNG states and
``processes.json`` are the same; only the micro-step (``engine.backward`` + ``engine.step``, which accumulates,
clips and steps at the boundary) and the checkpoint's model/optimizer part (``step_NNNNNNN/deepspeed/``) differ.

Metrics: ``stage_dir/metrics.csv`` (step, epoch, loss, lr, the step function's terms, seconds; losses written
with ``repr`` so they round-trip exactly), the same scalars to accelerate's tracker ``log_with`` (tensorboard, wandb,
mlflow, offline, under ``stage_dir``; :mod:`hwsi.train.tracking`), and a tqdm progress bar.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from hwsi.train import tracking, zero3
from hwsi.train.checkpoints import (  # noqa: F401  (TrainError, MetricsLog: re-exported, the stages import them here)
    MetricsLog,
    TrainError,
    last_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from hwsi.train.config import OptimConfig
from hwsi.train.loader import Load, StepBatchSampler, step_loader
from hwsi.train.processes import RECORDED_STEPS, accelerate_kwargs, process_state, write_processes_record

log = logging.getLogger(__name__)

StepFn = Callable[[nn.Module, Any], tuple[torch.Tensor, dict[str, float]]]  # micro-batch items, or load()'s


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_order(seed: int, epoch: int, n: int) -> list[int]:
    """The permutation of ``range(n)`` visited in ``epoch`` (its own generator: resumable from the step alone)."""
    g = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0]))
    return torch.randperm(n, generator=g).tolist()


def lr_lambda(kind: str, warmup: int, total: int) -> Callable[[int], float]:
    """Multiplier of the base lr at scheduler step ``s``: linear warmup, then cosine/linear decay to 0 or constant."""

    def f(s: int) -> float:
        if warmup and s < warmup:
            return (s + 1) / warmup
        if kind == "constant" or total <= warmup:
            return 1.0
        p = min(1.0, (s - warmup) / max(1, total - warmup))
        return 0.5 * (1.0 + math.cos(math.pi * p)) if kind == "cosine" else 1.0 - p

    return f


@dataclass
class FitResult:
    """What :meth:`Engine.fit` did."""

    steps: int  # optimizer steps done in total (including before a resume)
    total_steps: int
    finished: bool
    losses: list[float]  # loss of every logged step from metrics.csv (all sessions of the run)
    last_checkpoint: Path | None
    seconds: float
    rows: list[dict[str, str]] = field(default_factory=list)
    placement: dict[str, str] = field(default_factory=dict)  # Engine.placement: device, dtype, mixed_precision


class Engine:
    """One stage's optimisation loop (see the module docstring)."""

    def __init__(self, stage_dir: str | Path, cfg: OptimConfig, seed: int, precision: str = "no",
                 progress: bool = True, name: str = "train", device: str = "auto", dtype: str = "float32",
                 backend: str = "accelerate", deepspeed_config: str = "deepspeed_zero3.json",
                 log_with: str = "none") -> None:
        from accelerate import Accelerator

        self.dir = Path(stage_dir)
        self.cfg = cfg
        self.seed = seed
        self.name = name
        self.progress = progress
        self.accum = cfg.accumulation(process_state(device, precision).num_processes)
        self.log_with = log_with
        self.accelerator = Accelerator(mixed_precision=precision, gradient_accumulation_steps=self.accum,
                                       **accelerate_kwargs(device, precision),
                                       **tracking.accelerator_tracking(log_with, self.dir))
        # what result.json records (docs/devices.md): the resolved device, the weights' dtype, the autocast
        self.placement = {"device": str(self.accelerator.device), "dtype": dtype, "mixed_precision": precision,
                          "requested": device, "backend": backend}
        self.deepspeed: dict[str, Any] | None = None  # backend "deepspeed": the completed DeepSpeed config
        if backend == "deepspeed":
            self.deepspeed = zero3.deepspeed_settings(deepspeed_config, cfg, self.accum,
                                                      self.accelerator.num_processes, precision)
        elif backend != "accelerate":
            raise TrainError(f"{name}: backend must be accelerate or deepspeed, got {backend!r}")
        self.dir.mkdir(parents=True, exist_ok=True)
        self.ckpt_root = self.dir / "checkpoints"
        self.metrics = MetricsLog(self.dir / "metrics.csv")

    # ------------------------------------------------------------------ plan
    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def batch_plan(self, n: int) -> tuple[int, int]:
        """(global batch size actually used, optimizer steps per epoch) for ``n`` items."""
        if n < 1:
            raise TrainError(f"{self.name}: no training items")
        unit = self.cfg.micro_batch_size * self.accelerator.num_processes
        b = self.cfg.batch_size
        if n < b:
            b = max(unit, (n // unit) * unit)
            if n < unit:
                raise TrainError(f"{self.name}: {n} items, fewer than one micro-batch per process ({unit})")
            log.warning("%s: %d items < batch_size %d; using batches of %d", self.name, n, self.cfg.batch_size, b)
            if b < self.accum * self.accelerator.num_processes:
                raise TrainError(f"{self.name}: {n} items, fewer than accumulation {self.accum} × "
                                 f"{self.accelerator.num_processes} process(es): lower batch_size")
        return b, n // b

    def total_steps(self, n: int) -> int:
        _, per_epoch = self.batch_plan(n)
        return self.cfg.max_steps or self.cfg.epochs * per_epoch

    def _micro_batches(self, idx: list[int]) -> list[list[int]]:
        """This process's micro-batches of a global batch: micro-step k's slice, this process's part of it
        (module docstring; one process: consecutive micro-batches)."""
        world, rank = self.accelerator.num_processes, self.accelerator.process_index
        m = max(1, len(idx) // world // self.accum)
        return [idx[(k * world + rank) * m:(k * world + rank + 1) * m] for k in range(self.accum)]

    # ------------------------------------------------------------------ checkpoints
    def last_checkpoint(self) -> Path | None:
        return last_checkpoint(self.ckpt_root)

    def _save(self, model: nn.Module, optimizer, scheduler, step: int, extra: dict[str, Any]) -> Path:
        return save_checkpoint(self.accelerator, self.ckpt_root, model, optimizer, scheduler, step, self.seed, extra,
                               self.cfg.keep_checkpoints, self.deepspeed is not None)

    def _load(self, path: Path, model: nn.Module, optimizer, scheduler) -> int:
        return load_checkpoint(self.accelerator, path, model, optimizer, scheduler, self.deepspeed is not None,
                               self.name)

    # ------------------------------------------------------------------ optimiser
    def _optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        decay, no_decay = [], []
        for n, p in model.named_parameters():
            if p.requires_grad:
                (decay if p.ndim >= 2 and self.cfg.weight_decay else no_decay).append(p)
        if not decay and not no_decay:
            raise TrainError(f"{self.name}: the model has no trainable parameters")
        groups = [{"params": g, "weight_decay": wd} for g, wd in ((decay, self.cfg.weight_decay), (no_decay, 0.0)) if g]
        return torch.optim.AdamW(groups, lr=self.cfg.lr, betas=tuple(self.cfg.betas))

    # ------------------------------------------------------------------ loop
    def fit(self, model: nn.Module, items: Sequence[Any], step_fn: StepFn, resume: bool = False,
            stop_after: int | None = None, extra_state: dict[str, Any] | None = None, load: Load | None = None,
            num_workers: int = 0, prefetch_factor: int = 2) -> FitResult:
        """Train ``model`` (its ``requires_grad`` parameters) on ``items``; see the module docstring.

        ``stop_after``: stop (with a checkpoint) once this many optimizer steps are done in total — an
        interruption, the schedule is still the full run's. ``load``: a picklable ``list of items -> batch``; given,
        the step function gets ``load(micro-batch items)`` from a DataLoader (:mod:`hwsi.train.loader`) with
        ``num_workers`` workers (0: in this process) and ``prefetch_factor``, else the items themselves.
        """
        t0 = time.perf_counter()
        acc = self.accelerator
        batch, per_epoch = self.batch_plan(len(items))
        total = self.cfg.max_steps or self.cfg.epochs * per_epoch
        warmup = int(self.cfg.warmup_ratio * total)
        optimizer = self._optimizer(model)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(self.cfg.scheduler, warmup, total))
        if self.deepspeed is not None:
            model, optimizer = zero3.initialize(model, optimizer, self.deepspeed)
        else:
            model, optimizer = acc.prepare(model, optimizer)
        step = 0
        ckpt = self.last_checkpoint() if resume else None
        if resume and ckpt is None:
            log.info("%s: --resume but no checkpoint in %s; starting from step 0", self.name, self.ckpt_root)
        if ckpt is not None:
            step = self._load(ckpt, model, optimizer, scheduler)
            if self.is_main:
                self.metrics.truncate(step)
            log.info("%s: resumed from %s (step %d/%d)", self.name, ckpt, step, total)
        elif self.is_main:
            self.metrics.reset()
            shutil.rmtree(self.ckpt_root, ignore_errors=True)
        acc.wait_for_everyone()
        self.metrics = MetricsLog(self.metrics.path)
        tracked = self.log_with != "none"
        if tracked:  # init_trackers and log run on the main process only (accelerate)
            acc.init_trackers(tracking.PROJECT, tracking.hyperparameters(self.cfg),
                              tracking.init_kwargs(self.log_with, self.dir, self.name))
        from tqdm.auto import tqdm

        bar = tqdm(total=total, initial=step, desc=self.name, unit="step",
                   disable=not (self.progress and self.is_main), dynamic_ncols=True)
        every = self.cfg.checkpoint_every or per_epoch
        last_ckpt = ckpt
        seen: list[list[int]] = []  # this process's items of the session's first steps (processes.json)
        start_step = step

        def plan(s: int) -> list[list[int]]:  # this process's micro-batches of optimizer step s
            e, pos = divmod(s, per_epoch)
            return self._micro_batches(epoch_order(self.seed, e, len(items))[pos * batch:(pos + 1) * batch])

        loaded = None
        if load is not None and step < total:
            loaded = iter(step_loader(items, StepBatchSampler(plan, step, total, self.accum), load, self.seed,
                                      num_workers, prefetch_factor, acc.device.type == "cuda"))
        model.train()
        while step < total:
            epoch = step // per_epoch
            losses: list[float] = []
            terms: dict[str, list[float]] = {}
            micro_batches = plan(step)
            if len(seen) < RECORDED_STEPS:
                seen.append([i for mb in micro_batches for i in mb])
            for micro in micro_batches:
                data = next(loaded) if loaded is not None else [items[i] for i in micro]
                loss, parts = self._micro_step(model, optimizer, step_fn, data, step)
                losses.append(float(loss.detach()))
                for k, v in parts.items():
                    terms.setdefault(k, []).append(float(v))
            lr = scheduler.get_last_lr()[0]
            scheduler.step()
            step += 1
            names = sorted(terms)  # one collective for the loss and every term, on every process
            mean_loss, *means = self._reduce([sum(losses) / len(losses)] + [sum(terms[k]) / len(terms[k])
                                                                             for k in names])
            bar.update(1)
            bar.set_postfix(loss=f"{mean_loss:.4f}")
            if self.is_main and (step % self.cfg.log_every == 0 or step == total):
                row = {"step": step, "epoch": epoch, "loss": mean_loss, "lr": float(lr), **dict(zip(names, means))}
                row["seconds"] = round(time.perf_counter() - t0, 3)
                self.metrics.append(row)
                if tracked:
                    acc.log({f"{self.name}/{k}": v for k, v in row.items() if k not in ("step", "epoch", "seconds")},
                            step=step)
            stopping = stop_after is not None and step >= stop_after
            if step % every == 0 or step == total or stopping:
                last_ckpt = self._save(model, optimizer, scheduler, step, extra_state or {})
            if stopping:
                break
        del loaded  # stops the workers (a stopped run leaves prefetched batches unused)
        bar.close()
        if tracked:  # not acc.end_training(): it also destroys the process group the next stage needs
            for tracker in acc.trackers:
                tracker.finish()
        # a collective: after it metrics.csv is complete for every process
        write_processes_record(acc, self.dir / "processes.json", start_step, seen,
                               {"accumulation": self.accum, "micro_batch_size": self.cfg.micro_batch_size,
                                "backend": self.placement["backend"],
                                "zero_stage": (self.deepspeed or {}).get("zero_optimization", {}).get("stage")})
        rows = self.metrics.rows()
        return FitResult(step, total, step >= total, [float(r["loss"]) for r in rows], last_ckpt,
                         time.perf_counter() - t0, rows, dict(self.placement))

    def _micro_step(self, model: nn.Module, optimizer, step_fn: StepFn, batch: Any,
                    step: int) -> tuple[torch.Tensor, dict[str, float]]:
        """Forward, backward and (at the accumulation boundary) clip + optimizer step of one micro-batch."""
        acc = self.accelerator
        ctx = contextlib.nullcontext() if self.deepspeed is not None else acc.accumulate(model)
        with ctx:
            loss, parts = step_fn(model, batch)
            if not torch.isfinite(loss):
                raise TrainError(f"{self.name}: non-finite loss {loss.item()} at step {step + 1}")
            if self.deepspeed is not None:  # DeepSpeed's engine: scales by the accumulation, clips, steps, zeroes
                model.backward(loss)
                model.step()
                return loss, parts
            acc.backward(loss)
            if acc.sync_gradients and self.cfg.max_grad_norm > 0:
                acc.clip_grad_norm_(model.parameters(), self.cfg.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return loss, parts

    def _reduce(self, values: list[float]) -> list[float]:
        """The mean over processes of each value (one all-reduce); one process: the values as they are."""
        if self.accelerator.num_processes == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.accelerator.device)
        return [float(x) for x in self.accelerator.reduce(t, reduction="mean")]

    def unwrap(self, model: nn.Module) -> nn.Module:
        if self.deepspeed is not None:  # the DeepSpeed engine, or the model itself
            return getattr(model, "module", model)
        return self.accelerator.unwrap_model(model)

    def gathered(self, model: nn.Module, select: Callable[[str], bool]):
        """Context: the unwrapped model with the parameters ``select`` names whole on every process (ZeRO-3, either
        backend; a collective, every process enters it) — what a stage's final save reads."""
        return zero3.gathered(self.unwrap(model), select)

