"""Which share of a batch this process works on: ``--shard i/N``, or what the launcher put in the environment.

Sources, in order (the first that applies wins; the log says which one it was):

1. ``--shard i/N`` given on the command line (``0 <= i < N``);
2. torchrun (``WORLD_SIZE`` and ``RANK``; ``LOCAL_RANK`` picks the GPU, :func:`local_rank`), combined with a Slurm
   job array when both are set (an array task per node, torchrun inside it: shard ``task * WORLD_SIZE + RANK`` of
   ``COUNT * WORLD_SIZE``);
3. a Slurm job array (``SLURM_ARRAY_TASK_ID`` and ``SLURM_ARRAY_TASK_COUNT``; the index counts from
   ``SLURM_ARRAY_TASK_MIN`` in steps of ``SLURM_ARRAY_TASK_STEP`` when those are set, so ``--array=1-8`` and
   ``--array=0-14:2`` both give shards 0..N-1);
4. none: shard 0/1, the whole batch (exactly a run without sharding).

A malformed value (``--shard 2/2``, ``RANK=x``) is ONE error line naming the option or variable (docs/cluster.md).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import typer

from hwsi.errors import ConfigError

ShardSource = Literal["--shard", "torchrun", "slurm-array", "torchrun+slurm-array", "none"]

#: Seconds without a heartbeat after which a slide's claim is stale (hwsi.batch.claims). Ten minutes: far above the
#: heartbeat period (at most 60 s) and NFS attribute caching (``actimeo`` up to 60 s), so a live worker is never
#: taken for dead, and short beside a 10k-slide job (a dead node's slide waits at most this long).
DEFAULT_CLAIM_TIMEOUT_S = 600.0

SHARD_HELP = ("This worker's share i/N of the slides (0 <= i < N); default: from torchrun (RANK/WORLD_SIZE) or a "
              "Slurm job array (SLURM_ARRAY_TASK_ID/COUNT), else the whole job. Workers that finish early take "
              "what others left.")
CLAIM_TIMEOUT_HELP = ("Seconds without a heartbeat after which another worker's claim on a slide is stale and "
                      "taken over (a dead or hung worker).")

_SHARD_RE = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` of ``count`` (0-based), and what set it."""

    index: int = 0
    count: int = 1
    source: ShardSource = "none"

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    def describe(self) -> str:
        """``shard 1/2 (from torchrun)`` — the line a worker logs."""
        return f"shard {self} (from {self.source})" if self.source != "none" else "shard 0/1 (no sharding)"


def parse_shard(text: str, where: str = "--shard") -> Shard:
    """``"i/N"`` as a :class:`Shard`; a ConfigError naming ``where`` when it is not two integers with 0 <= i < N."""
    m = _SHARD_RE.match(text or "")
    if m is None:
        raise ConfigError(f"{where}: expected i/N (this worker's index i of N workers, e.g. 0/4), got {text!r}")
    index, count = int(m.group(1)), int(m.group(2))
    if count < 1 or not 0 <= index < count:
        raise ConfigError(f"{where}: expected i/N with N >= 1 and 0 <= i < N, got {text!r}")
    return Shard(index, count, "--shard")


def shard_option(value: str | None) -> str | None:
    """typer callback of ``--shard``: checks ``i/N`` (a usage error, exit 2, when it is not)."""
    if value is not None:
        try:
            parse_shard(value)
        except ConfigError as exc:
            raise typer.BadParameter(str(exc).removeprefix("--shard: ")) from exc
    return value


def _env_int(env: Mapping[str, str], name: str, minimum: int) -> int | None:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return None
    try:
        v = int(raw.strip())
    except ValueError:
        raise ConfigError(f"environment variable {name}={raw!r}: not an integer") from None
    if v < minimum:
        raise ConfigError(f"environment variable {name}={raw!r}: must be >= {minimum}")
    return v


def _torchrun(env: Mapping[str, str]) -> tuple[int, int] | None:
    world = _env_int(env, "WORLD_SIZE", 1)
    rank = _env_int(env, "RANK", 0)
    if world is None and rank is None:
        return None
    if world is None or rank is None:
        missing = "WORLD_SIZE" if world is None else "RANK"
        raise ConfigError(f"environment variable {missing} is not set but {'RANK' if world is None else 'WORLD_SIZE'}"
                          f" is (a torchrun launch sets both)")
    if rank >= world:
        raise ConfigError(f"environment variables RANK={rank} and WORLD_SIZE={world}: RANK must be < WORLD_SIZE")
    return rank, world


def _slurm_array(env: Mapping[str, str]) -> tuple[int, int] | None:
    task = _env_int(env, "SLURM_ARRAY_TASK_ID", 0)
    if task is None:
        return None
    count = _env_int(env, "SLURM_ARRAY_TASK_COUNT", 1)
    if count is None:
        raise ConfigError("environment variable SLURM_ARRAY_TASK_COUNT is not set but SLURM_ARRAY_TASK_ID is")
    first = _env_int(env, "SLURM_ARRAY_TASK_MIN", 0) or 0
    step = _env_int(env, "SLURM_ARRAY_TASK_STEP", 1) or 1
    offset = task - first
    if offset < 0 or offset % step or offset // step >= count:
        raise ConfigError(f"environment variables SLURM_ARRAY_TASK_ID={task}, SLURM_ARRAY_TASK_MIN={first}, "
                          f"SLURM_ARRAY_TASK_STEP={step}, SLURM_ARRAY_TASK_COUNT={count}: the task is not one of "
                          f"the array's {count} (give --shard i/N)")
    return offset // step, count


def shard_from_env(env: Mapping[str, str] | None = None) -> Shard:
    """The shard the launcher's environment gives (torchrun, a Slurm job array, both, or none: 0/1)."""
    env = os.environ if env is None else env
    tr, sl = _torchrun(env), _slurm_array(env)
    if tr and sl:
        return Shard(sl[0] * tr[1] + tr[0], sl[1] * tr[1], "torchrun+slurm-array")
    if tr:
        return Shard(tr[0], tr[1], "torchrun")
    if sl:
        return Shard(sl[0], sl[1], "slurm-array")
    return Shard()


def resolve_shard(option: str | None, env: Mapping[str, str] | None = None) -> Shard:
    """``--shard`` when given (it wins over the environment), else :func:`shard_from_env`."""
    return parse_shard(option) if option is not None else shard_from_env(env)


def local_rank(env: Mapping[str, str] | None = None) -> int:
    """This process's index on its node (torchrun's ``LOCAL_RANK``; 0 when not launched by torchrun): the GPU a
    worker should use is ``cuda:<local_rank()>`` (:func:`local_cuda_device`)."""
    v = _env_int(os.environ if env is None else env, "LOCAL_RANK", 0)
    return v or 0


def local_cuda_device(env: Mapping[str, str] | None = None) -> str:
    """``"cuda:<LOCAL_RANK>"``: the device of a torchrun worker that runs on CUDA (one GPU per local rank)."""
    return f"cuda:{local_rank(env)}"
