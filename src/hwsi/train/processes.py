"""Training and evaluation on several processes (torchrun, accelerate launch, srun; docs/cluster.md "Training on
several processes"): the process group, the record of who trained on what, the small collectives the stages need.

* :func:`process_state` — accelerate's ``PartialState`` of this process, created once per process before a stage's
  data preparation (so the slide cache and the text bank can be built behind barriers), with
  :data:`PROCESS_GROUP_TIMEOUT`; a launch whose ``WORLD_SIZE`` accelerate does not see is a :class:`LaunchError`.
* :func:`write_processes_record` — ``RUN/stageN/processes.json``: accelerate's process count, ``WORLD_SIZE``, the
  distributed type and, per process, pid, host, device and the item indices of its first :data:`RECORDED_STEPS`
  steps (what a test needs to prove that 2 processes were 2 and saw different shards).
* :func:`union_over_processes` — the sorted union of every process's list of ids.
"""

from __future__ import annotations

import os
import socket
from datetime import timedelta
from pathlib import Path
from typing import Any

from hwsi.devices import accelerator_kwargs, resolve_placement
from hwsi.errors import HwsiError
from hwsi.utils.atomic import write_json_atomic

# how long a process waits at a barrier for the others (a stage's slide cache and text bank are built before
# training, shared out across the processes; a big cohort takes longer than torch's 30-minute default)
PROCESS_GROUP_TIMEOUT = timedelta(hours=4)
RECORDED_STEPS = 4  # processes.json: the item indices of this many first steps of a session, per process


class LaunchError(HwsiError):
    """The processes of a launch are not the ones accelerate sees (e.g. two independent copies)."""


def accelerate_kwargs(device: str, precision: str = "no") -> dict[str, Any]:
    """``accelerator_kwargs`` plus ``cpu=True`` whenever the run is on the CPU: accelerate's ``PartialState`` only
    forms a multi-CPU (gloo) process group under torchrun when told ``cpu`` (``ACCELERATE_USE_CPU`` reaches only
    the ``Accelerator``); without it every rank would be a separate one-process run."""
    kw = accelerator_kwargs(device, precision)
    if resolve_placement(device, "float32", "device").device == "cpu":
        kw["cpu"] = True
    return kw


def process_state(device: str = "auto", precision: str = "no") -> Any:
    """accelerate's ``PartialState`` of this process (the process group of torchrun / accelerate launch / srun,
    created on first use with :data:`PROCESS_GROUP_TIMEOUT`); one process without a launcher. The Engine's
    ``Accelerator`` reuses it. A launcher that set ``WORLD_SIZE`` to N but gave a state of another size (e.g. a
    state made earlier in the process as a single one) is a LaunchError."""
    from accelerate import PartialState

    state = PartialState(timeout=PROCESS_GROUP_TIMEOUT, **accelerate_kwargs(device, precision))
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if state.num_processes != world:
        raise LaunchError(f"WORLD_SIZE is {world} but accelerate runs {state.num_processes} process(es) "
                          f"({state.distributed_type}): on the CPU launch with torchrun (docs/cluster.md)")
    return state


def union_over_processes(ids: list[int], processes: int) -> list[int]:
    """The sorted union of every process's ``ids`` (all_gather_object); one process: ``ids``."""
    if processes == 1:
        return ids
    import torch.distributed as dist

    parts: list[Any] = [None] * processes
    dist.all_gather_object(parts, ids)
    return sorted({i for p in parts for i in p})


def write_processes_record(acc: Any, path: Path, start_step: int, seen: list[list[int]],
                           settings: dict[str, Any]) -> None:
    """Gather every process's record of this session (``seen``: its items of the first steps) and write ``path``
    from the main process, atomically (module docstring); ``settings``: the batching to record beside it."""
    from accelerate.utils import gather_object

    mine = {"rank": acc.process_index, "local_rank": acc.local_process_index, "pid": os.getpid(),
            "host": socket.gethostname(), "device": str(acc.device), "first_steps": seen}
    every = gather_object([mine]) if acc.num_processes > 1 else [mine]
    if acc.is_main_process:
        write_json_atomic(path, {
            "num_processes": acc.num_processes, "world_size_env": int(os.environ.get("WORLD_SIZE", "1") or 1),
            "distributed_type": str(acc.distributed_type), "start_step": start_step, **settings, "processes": every})
