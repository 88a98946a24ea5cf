"""Where CellViT (and QuPath) cell outputs of one slide lie in ``--cells cellvit:DIR`` (docs/formats-cells.md
"Layouts").

For a slide whose file is ``NAME.EXT`` (hwsi slide id ``ID``), the names tried are ``ID``, the file name without its
last suffix (Python's ``Path.stem``, what CellViT v1 and CellViT-Inference name folders by) and the file name up to
its FIRST dot (CellViT++'s ``wsi_path.name.split(".")[0]``: a TCGA name is cut there). Per name ``n``, in order:

1. CellViT v1 and CellViT++'s disk mode: ``DIR/n/cell_detection/FILE``, or ``DIR/n/cell_detection/<subdir>/FILE``
   (``--outdir_subdir``; exactly one such subdir);
2. CellViT-Inference: ``DIR/n/FILE``;
3. CellViT++: ``DIR/n_FILE`` (``n_cells.json``, ``n_cell_detection.geojson``, ...);
4. a flat file per slide (e.g. a QuPath export): ``DIR/n.json``, ``DIR/n.geojson``;

where FILE is the first of ``cells.json``, ``cell_detection.json``, ``cells.geojson``, ``cell_detection.geojson``,
each plain before ``.snappy``. Tokens: ``cells.pt`` beside it (CellViT++: ``n_cells.pt``; flat: ``n.pt``), or hwsi's
``cells.npy`` / ``cell_tokens.npy`` (flat: ``n.npy``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from hwsi.cells.cell_files import CellVitError

CELL_FILES = ("cells.json", "cell_detection.json", "cells.geojson", "cell_detection.geojson")
_PATTERN = "{cells,cell_detection}.{json,geojson}[.snappy]"


@dataclass(frozen=True)
class CellVitOutputs:
    """The cells file of one slide, its token file (or None) and the layout they were found in."""

    cells: Path
    embeddings: Path | None
    layout: str


def slide_names(slide_id: str, slide_file: str | Path | None = None) -> list[str]:
    """Names a tool may have given this slide's outputs (see the module docstring), without repeats."""
    names = [slide_id]
    if slide_file:
        file_name = Path(slide_file).name
        names += [Path(file_name).stem, file_name.split(".")[0]]
    names += [slide_id.split(".")[0]]
    return [n for i, n in enumerate(names) if n and n not in names[:i]]


def _first(d: Path, prefix: str = "") -> Path | None:
    for name in CELL_FILES:
        for suffix in ("", ".snappy"):
            p = d / f"{prefix}{name}{suffix}"
            if p.is_file():
                return p
    return None


def _tokens(*candidates: Path) -> Path | None:
    return next((p for p in candidates if p.is_file()), None)


def _in_dir(d: Path) -> Path | None:
    """Tokens beside a cells file in a per-slide folder."""
    return _tokens(d / "cells.pt", d / "cells.npy", d / "cell_tokens.npy")


def find_cellvit_outputs(folder: Path, slide_id: str, slide_file: str | Path | None = None) -> CellVitOutputs:
    """The cell outputs of one slide in ``folder``; :class:`CellVitError` listing every path tried if none."""
    tried: list[str] = []
    for n in slide_names(slide_id, slide_file):
        det = folder / n / "cell_detection"
        found = _first(det)
        if found is not None:
            return CellVitOutputs(found, _in_dir(det), "CellViT v1 / CellViT++ disk: <slide>/cell_detection/")
        subs = sorted(s for s in det.iterdir() if s.is_dir() and _first(s)) if det.is_dir() else []
        if len(subs) > 1:
            raise CellVitError(det, f"{len(subs)} CellViT runs ({', '.join(s.name for s in subs)}) for slide "
                                    f"{slide_id!r}; keep one --outdir_subdir run per slide in the folder given")
        found = _first(subs[0]) if subs else None
        if found is not None:
            return CellVitOutputs(found, _in_dir(subs[0]), "CellViT v1 / CellViT++ disk: <slide>/cell_detection/<subdir>/")
        tried.append(f"{n}/cell_detection/[<subdir>/]{_PATTERN}")
        found = _first(folder / n)
        if found is not None:
            return CellVitOutputs(found, _in_dir(folder / n), "CellViT-Inference: <out>/<stem>/")
        tried.append(f"{n}/{_PATTERN}")
        found = _first(folder, prefix=f"{n}_")
        if found is not None:
            return CellVitOutputs(found, _tokens(folder / f"{n}_cells.pt"), "CellViT++: <out>/<name>_*")
        tried.append(f"{n}_{_PATTERN}")
        for ext in (".json", ".geojson"):
            if (folder / f"{n}{ext}").is_file():
                return CellVitOutputs(folder / f"{n}{ext}", _tokens(folder / f"{n}.pt", folder / f"{n}.npy"),
                                      "flat: <dir>/<slide>.json|.geojson")
        tried.append(f"{n}.{{json,geojson}}")
    raise CellVitError(folder, f"no CellViT output for slide {slide_id!r}; tried {', '.join(tried)}")
