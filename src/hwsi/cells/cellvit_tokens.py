"""Per-cell token embeddings of a CellViT run (docs/formats-cells.md "cells.pt").

CellViT saves ``cells.pt`` with ``torch.save(graph, ...)`` where ``graph`` is a plain ``@dataclass`` (no
torch-geometric): ``x`` (N, D) tokens (384-d CellViT-256, 1280-d CellViT-SAM-H), ``positions`` (N, 2) level-0
centroids in the order of ``cells.json``, ``metadata`` (dict: ``wsi_metadata``, ``nuclei_types``) and, by version,

* CellViT v1: ``cell_segmentation.datasets.cell_graph_datamodel.CellGraphDataWSI`` (+ ``contours``, a list of tensors);
* CellViT++: ``cellvit.data.dataclass.cell_graph.CellGraphDataWSI`` (x, positions, metadata);
* CellViT-Inference: the same path, + ``nuclei_types`` (N,) tensor.

They are read with torch's ``weights_only`` unpickler (tensors and plain containers only), which is allowed to build
exactly these classes — as :class:`PickledCellGraph`, by module path — and then their fields are checked. Also read:
a tensor (N, D), a dict with one of :data:`TOKEN_KEYS` (and optional ``positions``), or a ``.npy`` (N, D).
"""

from __future__ import annotations

import io
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hwsi.cells.cell_files import CellVitError

KNOWN_DIMS = {384: "CellViT-256", 1280: "CellViT-SAM-H"}
TOKEN_KEYS = ("x", "cell_tokens", "embeddings", "tokens", "features")


@dataclass
class PickledCellGraph:
    """What hwsi builds for a pickled CellViT ``CellGraphDataWSI``: its fields, nothing run."""

    x: Any = None
    positions: Any = None
    metadata: Any = None
    contours: Any = None
    nuclei_types: Any = None


# module path of each CellViT cell-graph class -> the fields that class has
CELL_GRAPH_CLASSES: dict[str, frozenset[str]] = {
    "cell_segmentation.datasets.cell_graph_datamodel.CellGraphDataWSI": frozenset(
        {"x", "positions", "metadata", "contours"}),  # CellViT v1
    "cellvit.data.dataclass.cell_graph.CellGraphDataWSI": frozenset(
        {"x", "positions", "metadata", "nuclei_types"}),  # CellViT++ (no nuclei_types) and CellViT-Inference
}


def _tensor(v: Any) -> bool:
    return hasattr(v, "detach") or isinstance(v, np.ndarray)


def _load_torch(path: Path) -> tuple[Any, str | None]:
    """(object, CellViT class path or None) of a torch file, through the weights_only unpickler."""
    import torch

    raw = path.read_bytes()
    # one stand-in class per allowed path, so the loaded object says which class it was saved as
    stand_ins = {p: type("PickledCellGraph", (PickledCellGraph,), {"class_path": p}) for p in CELL_GRAPH_CLASSES}
    try:
        with torch.serialization.safe_globals([(cls, p) for p, cls in stand_ins.items()]):
            obj = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        try:
            bad = [g for g in torch.serialization.get_unsafe_globals_in_checkpoint(io.BytesIO(raw))
                   if g not in CELL_GRAPH_CLASSES]
        except Exception:  # noqa: BLE001 - only used to name what was refused
            bad = []
        if not bad:
            raise CellVitError(path, "not a readable torch file (no torch archive or pickle)") from exc
        raise CellVitError(path, f"holds objects hwsi does not load: {', '.join(bad[:5])} (hwsi builds only "
                                 "tensors, plain containers and CellViT's CellGraphDataWSI)") from exc
    except Exception as exc:  # noqa: BLE001 - torch raises many kinds for a file that is not a torch archive
        raise CellVitError(path, f"not a readable torch file ({type(exc).__name__}: {str(exc)[:200]})") from exc
    if isinstance(obj, PickledCellGraph):
        path_name = getattr(type(obj), "class_path", "")
        extra = set(vars(obj)) - CELL_GRAPH_CLASSES.get(path_name, frozenset())
        if extra:
            raise CellVitError(path, f"{path_name} has fields {sorted(extra)} that CellViT's class does not have")
        return obj, path_name
    return obj, None


def read_cell_embeddings(path: str | Path) -> tuple[np.ndarray, np.ndarray | None]:
    """Read per-cell token embeddings → (tokens (N, D) float32, positions (N, 2) or None)."""
    path = Path(path)
    if not path.is_file():
        raise CellVitError(path, "no such file")
    positions: Any = None
    if path.suffix == ".npy":
        try:
            tokens: Any = np.load(path, allow_pickle=False)
        except ValueError as exc:
            raise CellVitError(path, f"not a plain .npy array ({exc})") from exc
    else:
        obj, cls = _load_torch(path)
        if cls is not None:
            if not _tensor(obj.x) or not _tensor(obj.positions):
                raise CellVitError(path, f"{cls}: x and positions must be tensors")
            tokens, positions = obj.x, obj.positions
        elif _tensor(obj):
            tokens = obj
        elif isinstance(obj, dict):
            key = next((k for k in TOKEN_KEYS if _tensor(obj.get(k)) and obj[k].ndim == 2), None)
            if key is None:
                raise CellVitError(path, f"no (N, D) token tensor found (looked for a tensor, CellViT's "
                                         f"CellGraphDataWSI or keys {list(TOKEN_KEYS)})")
            tokens, positions = obj[key], obj.get("positions")
        else:
            raise CellVitError(path, f"no (N, D) token tensor found (a {type(obj).__name__})")
    tokens = np.asarray(tokens.detach().cpu().numpy() if hasattr(tokens, "detach") else tokens)
    if tokens.ndim != 2:
        raise CellVitError(path, f"token embeddings must be (N, D), got shape {tokens.shape}")
    if not np.issubdtype(tokens.dtype, np.floating) or not np.isfinite(tokens).all():
        raise CellVitError(path, "token embeddings must be finite floats")
    if positions is not None:
        positions = np.asarray(positions.detach().cpu().numpy() if hasattr(positions, "detach") else positions,
                               dtype=np.float64)
        if positions.shape != (len(tokens), 2):
            raise CellVitError(path, f"positions shape {positions.shape} does not match {len(tokens)} tokens")
    return tokens.astype(np.float32), positions
