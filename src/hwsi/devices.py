"""Where a network runs and in which dtype: ONE resolver for every command that runs one (docs/devices.md).

    p = resolve_placement("auto", "bfloat16")   # Placement(device="cuda:0" | "cpu", dtype="bfloat16", ...)
    model.to(p.torch_device)                    # p.torch_dtype -> torch.bfloat16
    json_record["placement"] = p.record()       # {"device": "cpu", "dtype": "bfloat16", "requested": "auto"}

``--device``: ``cpu``, ``cuda`` (the current CUDA device: ``cuda:LOCAL_RANK`` under torchrun), ``cuda:N`` or
``auto`` (CUDA when there is one, else the CPU). ``--dtype``: ``float32``, ``bfloat16`` or ``float16`` — the dtype
the network's weights are held and computed in (``hwsi extract``: the encoders; ``train``/``eval``/``ask``/``serve``:
the LLM, while the hierarchy and projectors keep float32 master weights). float16 runs on CUDA only; bfloat16 runs
on the CPU (fast where the CPU has AVX-512 BF16) and on CUDA devices that support it.

Bad values are a :class:`~hwsi.errors.ConfigError` (one line, exit 2), e.g. ``--device cuda: no CUDA device on this
machine (torch 2.13.0 sees none); use --device cpu or auto``. torch is imported inside the functions that need it,
so ``hwsi --help`` never loads it.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any, Literal, get_args

import typer

from hwsi.errors import ConfigError

DtypeName = Literal["float32", "bfloat16", "float16"]
DTYPE_NAMES: tuple[str, ...] = get_args(DtypeName)
DEVICE_HELP = "cpu, cuda, cuda:N or auto"
_DEVICE_RE = re.compile(r"^(cpu|auto|cuda|cuda:\d+)$")


@dataclass(frozen=True)
class Placement:
    """A resolved device (``cpu`` or ``cuda:N``) and dtype; ``requested`` is the ``--device`` value given."""

    device: str
    dtype: DtypeName
    requested: str = ""

    @property
    def torch_device(self) -> Any:
        import torch

        return torch.device(self.device)

    @property
    def torch_dtype(self) -> Any:
        return torch_dtype(self.dtype)

    @property
    def is_cuda(self) -> bool:
        return self.device.startswith("cuda")

    def record(self) -> dict[str, str]:
        """What outputs record: the resolved device and dtype, and the ``--device`` asked for."""
        return {"device": self.device, "dtype": self.dtype, "requested": self.requested or self.device}

    def describe(self) -> str:
        return f"{self.device} {self.dtype}"


def torch_dtype(name: str) -> Any:
    """``"bfloat16"`` -> ``torch.bfloat16`` (a name outside :data:`DTYPE_NAMES` is a ConfigError)."""
    import torch

    check_dtype_name(name)
    return getattr(torch, name)


def check_device_spec(spec: str, what: str = "--device") -> str:
    """``spec`` if it is one of cpu, cuda, cuda:N, auto (nothing about this machine is checked)."""
    s = str(spec).strip().lower()
    if not _DEVICE_RE.match(s):
        raise ConfigError(f"{what} must be {DEVICE_HELP}, got {spec!r}")
    return s


def check_dtype_name(name: str, what: str = "--dtype", allowed: tuple[str, ...] = DTYPE_NAMES) -> str:
    if name not in allowed:
        raise ConfigError(f"{what} must be {', '.join(allowed)}, got {name!r}")
    return name


def _cuda_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def resolve_placement(device: str = "cpu", dtype: str = "float32", what: str = "--device") -> Placement:
    """Check ``device`` and ``dtype`` against this machine and resolve ``auto`` / ``cuda`` to one device.

    ``cuda`` and ``auto`` take ``cuda:LOCAL_RANK`` when torchrun / accelerate set ``LOCAL_RANK`` (one GPU per
    process), else the current CUDA device."""
    import torch

    spec = check_device_spec(device, what)
    check_dtype_name(dtype)
    n = _cuda_count()
    if spec == "auto":
        spec = "cuda" if n else "cpu"
    if spec.startswith("cuda"):
        if n == 0:
            built = "built without CUDA" if torch.version.cuda is None else "sees none"
            raise ConfigError(f"{what} {device}: no CUDA device on this machine (torch {torch.__version__} {built}); "
                              f"use {what} cpu or auto")
        if spec == "cuda":
            local = os.environ.get("LOCAL_RANK", "")
            index = int(local) if local.isdigit() else torch.cuda.current_device()
        else:
            index = int(spec.split(":", 1)[1])
        if index >= n:
            raise ConfigError(f"{what} cuda:{index}: this machine has {n} CUDA device(s) (cuda:0..cuda:{n - 1})")
        spec = f"cuda:{index}"
        if dtype == "bfloat16" and not torch.cuda.is_bf16_supported():
            raise ConfigError(f"--dtype bfloat16: {torch.cuda.get_device_name(index)} ({spec}) does not support "
                              "bfloat16; use --dtype float16 or float32")
    elif dtype == "float16":
        raise ConfigError("--dtype float16 is not supported on the CPU (half-precision kernels are missing or slow "
                          "there); on the CPU use --dtype bfloat16 or float32, float16 needs --device cuda")
    return Placement(spec, dtype, str(device))  # type: ignore[arg-type]


# ---- CLI options (typer); the value is checked again when resolved, against the machine ------------------------
def _device_value(value: str | None) -> str | None:
    if value is not None and not _DEVICE_RE.match(value.strip().lower()):
        raise typer.BadParameter(f"must be {DEVICE_HELP}, got {value!r}")
    return None if value is None else value.strip().lower()


def choice_check(allowed: tuple[str, ...]):
    """A typer callback accepting one of ``allowed`` (or the option left unset)."""

    def check(value: str | None) -> str | None:
        if value is not None and value not in allowed:
            raise typer.BadParameter(f"must be {', '.join(allowed)}, got {value!r}")
        return value

    return check


def device_option(default: str | None, help_extra: str = "") -> Any:
    """``--device`` (cpu, cuda, cuda:N, auto); ``default`` None = the run's configured one."""
    return typer.Option(default, "--device", callback=_device_value, help=f"Device: {DEVICE_HELP} (CUDA when there is one, else the CPU).{help_extra}")


def dtype_option(default: str | None, help_extra: str = "") -> Any:
    """``--dtype`` (float32, bfloat16, float16); ``default`` None = the run's configured one."""
    return typer.Option(default, "--dtype", callback=choice_check(DTYPE_NAMES),
                        help=f"Weights' dtype: float32, bfloat16 or float16 (CUDA only).{help_extra}")



def accelerator_kwargs(device: str, precision: str = "no", what: str = "device") -> dict[str, Any]:
    """Keyword arguments of ``accelerate.Accelerator`` that put a training process on ``device`` (the run config's
    ``device``). ``auto`` and ``cuda`` leave the choice to accelerate (``cuda:LOCAL_RANK``, or the CPU without CUDA);
    ``cpu`` forces the CPU where CUDA exists; ``cuda:N`` pins a single-process run to GPU N. ``precision`` (the
    config's accelerate ``mixed_precision``) ``fp16`` needs CUDA."""
    import torch

    place = resolve_placement(device, "float32", what)
    if precision == "fp16" and not place.is_cuda:
        raise ConfigError("precision: fp16 mixed precision needs CUDA; on the CPU use precision bf16 or no")
    if place.is_cuda and check_device_spec(device, what).startswith("cuda:"):
        world = int(os.environ.get("WORLD_SIZE", "1") or 1)
        if world > 1:
            raise ConfigError(f"{what} {device} names one GPU but {world} processes run (WORLD_SIZE): use {what} "
                              "cuda or auto, each process takes cuda:LOCAL_RANK")
        torch.cuda.set_device(place.torch_device)
    return {"cpu": True} if place.device == "cpu" and _cuda_count() else {}
