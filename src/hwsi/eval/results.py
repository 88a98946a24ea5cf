"""A task's result (:class:`TaskResult`) and how it is written: JSON (full, with per-sample predictions), Markdown
tables and confusion-matrix PNGs.

:func:`write_task` writes ``<out>/<task>.json``, ``<out>/<task>.md`` and, for the classification tasks, the
confusion-matrix PNG; :func:`summary_markdown` joins the tables of several tasks (what ``hwsi demo`` puts into
``report.md``). Numbers in tables are printed with 3 decimals, NaN as ``n/a``; every table is preceded by the
metric convention it uses. matplotlib is imported only when a PNG is drawn.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hwsi.utils.atomic import write_bytes_atomic, write_json_atomic


@dataclass
class TaskResult:
    """Metrics (each block names its convention), per-sample predictions and a Markdown table."""

    name: str
    metrics: dict[str, Any]
    predictions: list[dict[str, Any]]
    markdown: str
    skipped: str = ""  # reason, when the task could not run
    config: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    figures: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"task": self.name, "skipped": self.skipped, "metrics": self.metrics, "config": self.config,
                "data": self.data, "predictions": self.predictions}


def fmt(v: Any, digits: int = 3) -> str:
    """A table cell: floats with ``digits`` decimals (NaN -> ``n/a``), ints as is, None -> ``-``."""
    if v is None:
        return "-"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, float):
        return "n/a" if math.isnan(v) else f"{v:.{digits}f}"
    return str(v)


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A GitHub Markdown table (cells formatted by :func:`fmt`, ``|`` escaped)."""

    def cell(x: Any) -> str:
        return fmt(x).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(h) for h in headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(x) for x in r) + " |" for r in rows]
    return "\n".join(lines)


def jsonable(obj: Any) -> Any:
    """Numpy scalars/arrays, tuples, Paths and float dict keys made JSON-friendly; NaN kept (json writes NaN)."""
    if isinstance(obj, dict):
        return {(k if isinstance(k, str) else str(k)): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_result(result: TaskResult, out_dir: str | Path) -> dict[str, Path]:
    """Write ``<task>.json`` (metrics, predictions, convention, config) and ``<task>.md``; returns the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / f"{result.name}.json", "md": out / f"{result.name}.md"}
    write_json_atomic(paths["json"], jsonable(result.to_dict()))
    write_bytes_atomic(paths["md"], (result.markdown + "\n").encode("utf-8"))
    for name, fig in result.figures.items():
        paths[name] = Path(fig)
    return paths


def summary_markdown(results: Iterable[TaskResult], title: str = "Evaluation") -> str:
    """One Markdown document with every task's table (skipped tasks listed with their reason)."""
    parts = [f"# {title}", ""]
    for r in results:
        parts += [r.markdown, ""]
    return "\n".join(parts)


def write_summary(results: Iterable[TaskResult], out_dir: str | Path, title: str = "Evaluation") -> Path:
    """Write ``<out>/summary.md`` (:func:`summary_markdown`) atomically; returns its path."""
    path = Path(out_dir) / "summary.md"
    write_bytes_atomic(path, (summary_markdown(results, title) + "\n").encode("utf-8"))
    return path


def confusion_matrix_png(
    cm: Sequence[Sequence[int]], labels: Sequence[str], path: str | Path, title: str = "Confusion matrix"
) -> Path:
    """Render a confusion matrix (rows true, columns predicted; counts annotated) to a PNG with matplotlib."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    m = np.asarray(cm, dtype=np.int64)
    if m.ndim != 2 or m.shape[0] != m.shape[1] or m.shape[0] != len(labels):
        raise ValueError(f"confusion matrix {m.shape} does not match {len(labels)} labels")
    n = len(labels)
    size = max(3.5, 0.7 * n + 2.0)
    fig, ax = plt.subplots(figsize=(size, size), dpi=100)
    try:
        ax.imshow(m, cmap="Blues", vmin=0, vmax=max(1, int(m.max())))
        ax.set_xticks(range(n), [str(x) for x in labels], rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(n), [str(x) for x in labels], fontsize=8)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(title, fontsize=10)
        thresh = m.max() / 2 if m.max() else 1
        for i in range(n):
            for j in range(n):
                ax.text(j, i, str(m[i, j]), ha="center", va="center", fontsize=8,
                        color="white" if m[i, j] > thresh else "black")
        fig.tight_layout()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path)
    finally:
        plt.close(fig)
    return path


def dumps(obj: Any) -> str:
    """JSON text of ``obj`` (after :func:`jsonable`), sorted keys, for determinism checks."""
    return json.dumps(jsonable(obj), sort_keys=True)


def write_task(result: TaskResult, out: str | Path, figures: bool = True) -> dict[str, Path]:
    """Write one task's JSON + Markdown (+ confusion-matrix PNG for classification tasks)."""
    out = Path(out)
    if figures and "confusion_matrix" in result.metrics:
        png = confusion_matrix_png(result.metrics["confusion_matrix"], [str(x) for x in result.metrics["labels"]],
                                   out / f"{result.name}_confusion.png", title=result.name.replace("_", " "))
        result.figures["confusion_matrix"] = str(png)
        result.markdown += f"\n\n![confusion matrix]({png.name})"
    return write_result(result, out)


__all__ = [
    "TaskResult",
    "confusion_matrix_png",
    "dumps",
    "fmt",
    "jsonable",
    "markdown_table",
    "summary_markdown",
    "write_result",
    "write_summary",
    "write_task",
]
