"""Name -> builder registries of image and text encoders (timm / open_clip style).

A builder is ``factory(checkpoint: Path | None, **overrides) -> module``; ``overrides`` are fields of the
encoder's config dataclass (e.g. ``depth=2, width=64`` for a reduced variant with the same key layout). Builders
handle FOREIGN checkpoints themselves (CONCH ``pytorch_model.bin``, HIPT ``vit256_small_dino.pth``);
:func:`create_encoder` handles hwsi's OWN checkpoint folders (``encoder.json`` + ``model.safetensors``) for every
encoder: it rebuilds from the saved config and loads the weights strictly.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hwsi.features.encoders.base import (
    EncoderError,
    ImageEncoder,
    is_own_checkpoint,
    load_own_weights,
    read_own_meta,
)

_BUILTIN_MODULES = (
    "hwsi.features.encoders.conch",
    "hwsi.features.encoders.hipt",
    "hwsi.features.encoders.small",
    "hwsi.features.encoders.text",
)


@dataclass
class EncoderEntry:
    """One registered builder. ``tiny`` overrides give a reduced variant with the same key layout (tests)."""

    name: str
    factory: Callable[..., Any]
    kind: str  # "image" | "text"
    description: str = ""
    tiny: dict[str, Any] = field(default_factory=dict)


_IMAGE: dict[str, EncoderEntry] = {}
_TEXT: dict[str, EncoderEntry] = {}
_loaded = False


def _ensure_builtin() -> None:
    global _loaded
    if not _loaded:
        _loaded = True
        for mod in _BUILTIN_MODULES:
            importlib.import_module(mod)


def _register(table: dict[str, EncoderEntry], kind: str, name: str, description: str, tiny: dict[str, Any] | None):
    def deco(factory: Callable[..., Any]) -> Callable[..., Any]:
        if name in table and table[name].factory is not factory:
            raise EncoderError(f"{kind} encoder {name!r} is already registered")
        table[name] = EncoderEntry(name, factory, kind, description or (factory.__doc__ or "").strip().split("\n")[0], dict(tiny or {}))
        return factory

    return deco


def register_encoder(name: str, description: str = "", tiny: dict[str, Any] | None = None) -> Callable:
    """Decorator registering an image-encoder builder ``factory(checkpoint=None, **overrides)`` under ``name``."""
    if ":" in name:
        raise EncoderError(f"encoder names cannot contain ':' ({name!r})")
    return _register(_IMAGE, "image", name, description, tiny)


def register_text_encoder(name: str, description: str = "", tiny: dict[str, Any] | None = None) -> Callable:
    """Decorator registering a text-encoder builder ``factory(checkpoint=None, **overrides)`` under ``name``."""
    if ":" in name:
        raise EncoderError(f"encoder names cannot contain ':' ({name!r})")
    return _register(_TEXT, "text", name, description, tiny)


def list_encoders() -> list[str]:
    """Names of the registered image encoders, sorted."""
    _ensure_builtin()
    return sorted(_IMAGE)


def list_text_encoders() -> list[str]:
    """Names of the registered text encoders, sorted."""
    _ensure_builtin()
    return sorted(_TEXT)


def encoder_entry(name: str, kind: str = "image") -> EncoderEntry:
    """The registry entry of ``name`` (kind "image" or "text"); unknown names list the valid ones."""
    _ensure_builtin()
    table = _IMAGE if kind == "image" else _TEXT
    if name not in table:
        raise EncoderError(f"unknown {kind} encoder {name!r}; registered: {sorted(table)}")
    return table[name]


def parse_encoder_spec(spec: str) -> tuple[str, Path | None]:
    """``"name"`` -> (name, None); ``"name:path/to/ckpt"`` -> (name, Path). Splits at the first ':'."""
    spec = spec.strip()
    if not spec:
        raise EncoderError("empty encoder spec")
    name, sep, path = spec.partition(":")
    if sep and not path:
        raise EncoderError(f"encoder spec {spec!r} has ':' but no checkpoint path")
    return name.strip(), (Path(path).expanduser() if sep else None)


def _create(kind: str, name: str, checkpoint: str | Path | None, overrides: dict[str, Any]) -> Any:
    name, spec_ckpt = parse_encoder_spec(name)
    if checkpoint is not None and spec_ckpt is not None:
        raise EncoderError(f"checkpoint given twice: in the spec ({spec_ckpt}) and as an argument ({checkpoint})")
    ckpt = Path(checkpoint).expanduser() if checkpoint is not None else spec_ckpt
    entry = encoder_entry(name, kind)
    if ckpt is not None and not ckpt.exists():
        raise EncoderError(f"checkpoint for {kind} encoder {name!r} not found", ckpt)
    if ckpt is not None and is_own_checkpoint(ckpt):
        meta = read_own_meta(ckpt)
        if meta["name"] != name:
            raise EncoderError(f"checkpoint is for encoder {meta['name']!r}, not {name!r}", ckpt)
        cfg = {**meta["config"], **overrides}
        model = entry.factory(None, **cfg)
        load_own_weights(model, ckpt)
    else:
        model = entry.factory(ckpt, **overrides)
    model.name = name
    model.checkpoint = str(ckpt) if ckpt is not None else None
    return model.eval()


def create_encoder(name: str, checkpoint: str | Path | None = None, **overrides: Any) -> ImageEncoder:
    """Build image encoder ``name`` (or ``"name:CKPT"``), in eval mode.

    ``checkpoint``: hwsi's own folder (any encoder), or the builder's foreign format (CONCH / HIPT files).
    ``overrides``: config fields (see each builder's config dataclass). Unknown names or options raise
    :class:`EncoderError` listing the valid ones.
    """
    return _create("image", name, checkpoint, overrides)


def create_text_encoder(name: str = "minilm", checkpoint: str | Path | None = None, **overrides: Any) -> Any:
    """Build text encoder ``name`` (or ``"name:CKPT"``), in eval mode; see :mod:`hwsi.features.encoders.text`."""
    return _create("text", name, checkpoint, overrides)
