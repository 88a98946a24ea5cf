"""Reading other projects' checkpoints safely and mapping their key names onto ours.

* :func:`read_state_dict` opens ``.safetensors`` with safetensors and anything else with
  ``torch.load(weights_only=True)`` (no pickle code runs), and unwraps ``state_dict`` / ``teacher`` / ``model``.
  Full DINO training checkpoints (HIPT's ``vit256_small_dino.pth``: ``student``, ``teacher``, ``optimizer``,
  ``epoch``, ``dino_loss``, ``fp16_scaler`` and ``args``, an ``argparse.Namespace``) load with exactly one global
  allowed beyond torch's defaults: :data:`ALLOWED_GLOBALS`.
* :func:`check_not_lfs_pointer` / :func:`check_folder_not_lfs_pointers`: a Git LFS pointer (what a clone without
  ``git lfs`` holds in place of the weights) is one line saying so, for every checkpoint file or model folder hwsi
  reads. Other unreadable files (truncated, not a checkpoint) are one line too, without torch's colour codes.
* :func:`load_foreign_state_dict` renames keys with a ``key_map_fn`` (foreign name -> our name, or ``None`` for a
  key we deliberately ignore, e.g. DINO's projection head) and fails on any key of the model that the checkpoint
  does not provide: no silently missing weights.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from hwsi.features.encoders.base import EncoderError

KeyMap = Callable[[str], str | None]

#: Globals a checkpoint may hold beyond torch's weights-only defaults (tensors, containers, numbers, strings):
#: ``argparse.Namespace``, the ``args`` of DINO's ``main_dino.py`` (and HIPT's copies) saved with the weights.
ALLOWED_GLOBALS: tuple[type, ...] = (argparse.Namespace,)

#: First line of every Git LFS pointer file (https://github.com/git-lfs/git-lfs/blob/main/docs/spec.md).
LFS_POINTER_MAGIC = b"version https://git-lfs.github.com/spec/v1"
_LFS_POINTER_MAX_BYTES = 1024  # the spec's pointers are ~130 bytes; git-lfs refuses ones over 1024
_ANSI_RE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_GLOBAL_RE = re.compile(r"GLOBAL ([\w.]+)")


def lfs_pointer_reason(path: str | Path) -> str | None:
    """Why ``path`` is not the weights when it is a Git LFS pointer file, else None (reads at most 1 KiB)."""
    p = Path(path)
    try:
        size = p.stat().st_size
        if size > _LFS_POINTER_MAX_BYTES:
            return None
        with p.open("rb") as f:
            head = f.read(_LFS_POINTER_MAX_BYTES)
    except OSError:
        return None
    if not head.startswith(LFS_POINTER_MAGIC):
        return None
    fields = dict(line.split(" ", 1) for line in head.decode("utf-8", "replace").splitlines() if " " in line)
    oid = fields.get("oid", "?").strip()
    oid = oid if len(oid) <= 23 else oid[:23] + "..."
    real = fields.get("size", "").strip()
    real_text = f"; the real file is {int(real):,} bytes" if real.isdigit() else ""
    return (f"this is a Git LFS pointer ({size} bytes, oid {oid}{real_text}), not the weights: run `git lfs pull` "
            "in the clone it comes from (or download the file itself)")


def check_not_lfs_pointer(path: str | Path, error: Callable[[str, Path], Exception] | None = None) -> None:
    """Raise (an :class:`EncoderError` unless ``error(reason, path)`` builds another) when ``path`` is a Git LFS
    pointer."""
    reason = lfs_pointer_reason(path)
    if reason is not None:
        p = Path(path)
        raise error(reason, p) if error is not None else EncoderError(reason, p)


def check_folder_not_lfs_pointers(folder: str | Path, error: Callable[[str, Path], Exception] | None = None) -> None:
    """:func:`check_not_lfs_pointer` on every file of a model folder (Hugging Face layout, subfolders included)."""
    for p in sorted(Path(folder).rglob("*")):
        if p.is_file() and not p.name.startswith("."):
            check_not_lfs_pointer(p, error)


def _unreadable_reason(exc: Exception, path: Path) -> str:
    """One line for a file torch or safetensors cannot read: the global a pickle needs, or a truncated file."""
    text = " ".join(_ANSI_RE.sub("", str(exc)).split())
    text = text.split(". This is an internal miniz error")[0]  # torch's advice on corrupt files follows
    needed = _GLOBAL_RE.search(text)
    if needed and "weights only" in text.lower():
        allowed = ", ".join(f"{t.__module__}.{t.__qualname__}" for t in ALLOWED_GLOBALS)
        return (f"cannot read checkpoint: its pickle needs {needed.group(1)}, which hwsi does not unpickle "
                f"(allowed beyond tensors and containers: {allowed}); save the state dict alone "
                "(torch.save(model.state_dict(), ...)) or as .safetensors")
    size = path.stat().st_size
    if size == 0:
        return "cannot read checkpoint: the file is empty (0 bytes)"
    with path.open("rb") as f:
        head = f.read(12)
    zipped = head.startswith(b"PK")
    low = text.lower()
    if "weightsunpickler error:" in low:  # keep torch's reason, not its advice to drop weights_only
        text = text[low.index("weightsunpickler error:") + len("weightsunpickler error:"):]
        text = text.split("Check the documentation")[0].strip()
        low = text.lower()
    if not zipped and path.suffix != ".safetensors" and (
            isinstance(exc, KeyError) or "invalid load key" in low or "unsupported operand" in low):
        return (f"cannot read checkpoint: not a PyTorch checkpoint (neither torch.save's zip format nor a pickle; "
                f"it starts with {head!r})")
    cut = ("central directory", "ran out of input", "unexpected eof", "not fully covered", "incomplete metadata")
    if any(s in low for s in cut) or (zipped and "zip archive" in low):
        return (f"cannot read checkpoint: the file is incomplete ({size:,} bytes; an interrupted download or "
                f"copy?) ({type(exc).__name__}: {text[:160]})")
    return f"cannot read checkpoint ({type(exc).__name__}: {text[:300]})"


@dataclass
class LoadReport:
    """What :func:`load_foreign_state_dict` did: loaded our-key names, ignored and unexpected foreign keys."""

    loaded: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (
            f"loaded {len(self.loaded)} tensors, ignored {len(self.ignored)}, "
            f"unexpected {len(self.unexpected)}, missing {len(self.missing)}"
        )


def read_state_dict(path: str | Path, unwrap: tuple[str, ...] = ("state_dict", "model")) -> dict[str, torch.Tensor]:
    """Read a checkpoint file into a flat ``{name: tensor}`` dict without executing pickled code.

    ``unwrap`` names top-level keys that hold the real state dict (the first one present is used). A Git LFS
    pointer, a truncated file, or a pickle needing a global outside :data:`ALLOWED_GLOBALS` is an
    :class:`EncoderError` of one line naming the file.
    """
    p = Path(path)
    if not p.is_file():
        raise EncoderError("checkpoint file not found", p)
    check_not_lfs_pointer(p)
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: object = load_file(str(p))
        else:
            with torch.serialization.safe_globals(list(ALLOWED_GLOBALS)):
                obj = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError... on bad files
        raise EncoderError(_unreadable_reason(exc, p), p) from exc
    if isinstance(obj, Mapping):
        for key in unwrap:
            if key in obj and isinstance(obj[key], Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping):
        raise EncoderError(f"checkpoint holds a {type(obj).__name__}, not a state dict", p)
    out = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not out:
        raise EncoderError(f"checkpoint has no tensors (top-level keys: {sorted(map(str, obj))[:10]})", p)
    return out


def load_foreign_state_dict(
    model: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    key_map_fn: KeyMap,
    strict: bool = True,
    source: str | Path | None = None,
) -> LoadReport:
    """Copy ``state_dict`` into ``model`` after renaming each key with ``key_map_fn``.

    * a model key that no checkpoint key maps to is ALWAYS an error (listing the missing keys);
    * a checkpoint key that maps to a name the model does not have is an error when ``strict`` (default),
      else it is only reported; keys mapped to ``None`` are deliberately ignored and reported as such;
    * a shape mismatch or two checkpoint keys mapping to one model key is always an error.

    ``source`` (the file) is named in errors. Returns a :class:`LoadReport`.
    """
    own = model.state_dict()
    report = LoadReport()
    mapped: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    for fk, tensor in state_dict.items():
        ok = key_map_fn(fk)
        if ok is None:
            report.ignored.append(fk)
            continue
        if ok not in own:
            report.unexpected.append(fk)
            continue
        if ok in mapped:
            raise EncoderError(f"checkpoint keys {origin[ok]!r} and {fk!r} both map to {ok!r}", source)
        if tuple(tensor.shape) != tuple(own[ok].shape):
            raise EncoderError(
                f"{fk} -> {ok}: shape {tuple(tensor.shape)} in checkpoint, {tuple(own[ok].shape)} in the model "
                "(wrong encoder size/config for this checkpoint?)",
                source,
            )
        mapped[ok] = tensor
        origin[ok] = fk
    report.missing = sorted(set(own) - set(mapped))
    if report.missing:
        raise EncoderError(
            f"{len(report.missing)} weight(s) of the model are not in the checkpoint: {report.missing[:12]}"
            f"{' ...' if len(report.missing) > 12 else ''} ({report.summary()})",
            source,
        )
    if strict and report.unexpected:
        raise EncoderError(
            f"{len(report.unexpected)} checkpoint key(s) have no place in the model: {report.unexpected[:12]}"
            f"{' ...' if len(report.unexpected) > 12 else ''}",
            source,
        )
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in mapped.items()}, strict=True)
    report.loaded = sorted(mapped)
    return report
