"""Training data through a torch ``DataLoader``: worker processes and prefetch, in the engine's exact order.

:func:`step_loader` turns the engine's data order (:mod:`hwsi.train.engine`: epoch permutation, micro-batch slices
across processes) into a ``DataLoader`` over :class:`StepBatchSampler`, which yields THIS process's micro-batch index
lists step by step from the (resumed) start step, so micro-batch ``k`` of step ``s`` is the same list whether the
loader runs in the main process (``num_workers 0``) or in workers. ``load`` (picklable: it is sent to the workers)
turns one micro-batch's items into what the step function gets (stage 1: slide ids -> the collated
:class:`~hwsi.model.inputs.SlideBatch`, read from the slide cache's ``.pt`` files, :class:`hwsi.train.data.CachedSlides`).

Random streams: a ``DataLoader`` draws its workers' base seed from torch's GLOBAL generator at every ``iter()``
unless it has its own ``generator`` — which would shift every later dropout mask and so change the losses when the
loader is switched on. Here it always has one, seeded from the run seed and the start step, so the loader consumes
nothing of the global streams (tests/test_train_loader.py checks the state and the losses).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

Load = Callable[[list[Any]], Any]


class StepBatchSampler:
    """The micro-batch index lists of steps ``start .. total - 1``: ``plan(step)`` gives one step's lists."""

    def __init__(self, plan: Callable[[int], list[list[int]]], start: int, total: int, per_step: int) -> None:
        self.plan, self.start, self.total, self.per_step = plan, start, total, per_step

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.start, self.total):
            yield from self.plan(step)

    def __len__(self) -> int:
        return max(0, self.total - self.start) * self.per_step


class _Items(Dataset):
    """The engine's items by index (what the batch sampler's lists index)."""

    def __init__(self, items: Sequence[Any]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Any:
        return self.items[i]


def loader_generator(seed: int, start: int) -> torch.Generator:
    """The loader's own generator (worker base seeds), from the run seed and the start step."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, start, 15]).generate_state(1)[0]))


def step_loader(items: Sequence[Any], sampler: StepBatchSampler, load: Load, seed: int, num_workers: int = 0,
                prefetch_factor: int = 2, pin_memory: bool = False) -> DataLoader:
    """A ``DataLoader`` yielding ``load([items[i] for i in micro])`` for each list of ``sampler`` (module docstring);
    ``num_workers`` 0 loads in this process, else that many workers keep ``prefetch_factor`` micro-batches each
    ready ahead."""
    kw: dict[str, Any] = {"prefetch_factor": prefetch_factor} if num_workers > 0 else {}
    return DataLoader(_Items(items), batch_sampler=sampler, collate_fn=load, num_workers=num_workers,
                      pin_memory=pin_memory, generator=loader_generator(seed, sampler.start), **kw)
