"""LLaVA-style conversation json: ``wsi-bench-train`` (``"image": "<dir>/<slide>.pt"``) and ``slidechat``
(``"image": ["<slide>.csv", ...]``), a list of ``{"id", "image", "conversations": [{"from", "value"}, ...]}``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hwsi.data.records import Conversation, Turn, fail, need, slide_from_ref

_ROLE_ALIASES = {"human": "human", "user": "human", "gpt": "gpt", "assistant": "gpt"}


def parse_turns(conv: Any, path: Path, where: str) -> list[Turn]:
    """The alternating human/gpt turns of one record's ``conversations`` (``user``/``assistant`` accepted)."""
    if not isinstance(conv, list) or not conv:
        raise fail(path, where, "'conversations' must be a non-empty list")
    turns: list[Turn] = []
    for j, t in enumerate(conv):
        w = f"{where}, turn {j}"
        if not isinstance(t, dict):
            raise fail(path, w, "a turn must be an object with 'from' and 'value'")
        role_raw = need(t, "from", path, w)
        text = need(t, "value", path, w)
        role = _ROLE_ALIASES.get(role_raw.strip().lower())
        if role is None:
            raise fail(path, w, f"unknown role {role_raw!r} (expected human/gpt)")
        expected = "human" if j % 2 == 0 else "gpt"
        if role != expected:
            raise fail(path, w, f"turns must alternate human/gpt starting with human; got {role!r} here")
        turns.append(Turn(role=role, text=text))  # type: ignore[arg-type]
    return turns


def parse_llava(items: list[Any], path: Path, source: str | None) -> list[Conversation]:
    """One :class:`Conversation` per record; ``source`` None: ``slidechat`` for a list image reference, else
    ``wsi-bench``."""
    out: list[Conversation] = []
    for i, obj in enumerate(items):
        where = f"record {i}"
        if not isinstance(obj, dict):
            raise fail(path, where, "expected an object")
        rid = obj.get("id")
        if rid is None:
            raise fail(path, where, "missing field 'id'")
        where = f"record {i} (id={rid})"
        if "image" not in obj:
            raise fail(path, where, "missing field 'image'")
        image = obj["image"]
        slide_id, ids = slide_from_ref(image, path, where)
        src = source or ("slidechat" if isinstance(image, list) else "wsi-bench")
        turns = parse_turns(obj.get("conversations"), path, where)
        meta = {k: v for k, v in obj.items() if k not in ("id", "image", "conversations")}
        meta["image"] = image
        meta["image_refs"] = ids
        out.append(Conversation(id=str(rid), slide_id=slide_id, turns=turns, source=src, metadata=meta))
    return out
