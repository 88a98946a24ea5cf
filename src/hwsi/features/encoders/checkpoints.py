"""Reading other projects' checkpoints safely and mapping their key names onto ours.

* :func:`read_state_dict` opens ``.safetensors`` with safetensors and anything else with
  ``torch.load(weights_only=True)`` (no pickle code runs), and unwraps ``state_dict`` / ``teacher`` / ``model``.
* :func:`load_foreign_state_dict` renames keys with a ``key_map_fn`` (foreign name -> our name, or ``None`` for a
  key we deliberately ignore, e.g. DINO's projection head) and fails on any key of the model that the checkpoint
  does not provide: no silently missing weights.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from hwsi.features.encoders.base import EncoderError

KeyMap = Callable[[str], str | None]


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

    ``unwrap`` names top-level keys that hold the real state dict (the first one present is used).
    """
    p = Path(path)
    if not p.is_file():
        raise EncoderError("checkpoint file not found", p)
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: object = load_file(str(p))
        else:
            obj = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError... on bad files
        raise EncoderError(f"cannot read checkpoint ({type(exc).__name__}: {str(exc)[:300]})", p) from exc
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
