"""What every reader of another tool's cell output shares: :class:`CellVitError`, the :class:`CellVitCells` result
and :func:`read_json_file` (plain or snappy-compressed JSON). Formats: docs/formats-cells.md."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hwsi.errors import HwsiError


class CellVitError(HwsiError):
    """A CellViT / QuPath cells file is missing, malformed or inconsistent with its companion file or slide."""

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


@dataclass
class CellVitCells:
    """Cells read from another tool, level-0 coordinates; ``types`` are codes of
    :data:`hwsi.cells.nucleus_types.NUCLEUS_TYPES` and ``type_map`` names the codes present.
    ``embeddings`` is None when no token file was given."""

    centroids: np.ndarray  # (N, 2) float64 x, y
    types: np.ndarray  # (N,) int16 codes of the type table
    type_prob: np.ndarray  # (N,) float32
    type_map: dict[int, str]  # code -> table name, for the codes the source's classes map to
    bbox: np.ndarray | None = None  # (N, 2, 2) as in the file (CellViT: (row, col) corners)
    contours: list[np.ndarray] | None = None  # N arrays (k, 2) x, y (nucleus outlines; empty where none)
    embeddings: np.ndarray | None = None  # (N, D) float32
    source: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.centroids.shape[0])

    @property
    def table(self) -> dict[str, np.ndarray]:
        """Columnar table (x, y level-0, type, type_prob), the shape :func:`hwsi.store.rows_to_columns` takes."""
        return {"x": self.centroids[:, 0], "y": self.centroids[:, 1], "type": self.types, "type_prob": self.type_prob}


SNAPPY_HINT = ("snappy-compressed (CellViT --compression); install python-snappy (pip install python-snappy) "
               "to read it, or rerun CellViT without --compression")


def read_json_file(path: Path) -> Any:
    """Parse a JSON file; ``*.snappy`` (CellViT's ``--compression``: one raw snappy block) needs python-snappy."""
    if not path.is_file():
        raise CellVitError(path, "no such file")
    raw = path.read_bytes()
    if path.suffix == ".snappy":
        try:
            import snappy  # type: ignore[import-not-found]  # optional: python-snappy
        except ImportError:
            raise CellVitError(path, SNAPPY_HINT) from None
        try:
            raw = snappy.decompress(raw)
        except Exception as exc:  # noqa: BLE001 - the library's own error types differ between versions
            raise CellVitError(path, f"not a snappy-compressed file ({type(exc).__name__}: {exc})") from exc
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CellVitError(path, f"not valid JSON ({exc})") from exc
