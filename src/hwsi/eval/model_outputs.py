"""What the tasks ask of a trained MLLM-HWSI: slide embeddings (z_WSI or f_WSI) and greedy answers about a slide's
visual inputs, the per-slide inputs loaded once per run (:class:`SlideInputCache`), the text encoders, and the
:func:`derangement` of the shuffled-visual baseline.

torch and :mod:`hwsi.model.inputs` (torch) are imported inside the functions that run the model; the text encoders
(torch, transformers) when one is first built.

Several processes (``torchrun ... -m hwsi.cli eval``, docs/cluster.md): with a torch.distributed process group of
W > 1 processes, :func:`slide_embeddings` gives batch j to process j mod W (the same batches as one process, so the
same numbers bit for bit) and :func:`generate_answers` gives the questions about the k-th distinct slide to process
k mod W (a slide's prefix is still prefilled once; greedy answers do not depend on the batch, docs/generation.md);
every process then gathers every result in the original order, so each computes the same metrics.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from hwsi.data import QAItem, strip_image_token
from hwsi.eval.eval_config import EvalConfig, TaskError
from hwsi.eval.eval_data import EvalData
from hwsi.store import SlideStore


def model_device(model: Any) -> Any:
    """The device of the model's weights (where its inputs go)."""
    return model.llm.get_input_embeddings().weight.device


def store_encoders(store: Path, cfg: EvalConfig) -> tuple[str, str]:
    """``(patch_encoder, region_input)`` recorded by ``hwsi extract`` in the store (or given in ``cfg``)."""
    with SlideStore(store) as s:
        settings = s.json_attr("extract", {}) or {}
        encoders = s.meta.encoders
        patch = cfg.patch_encoder or str(s.attr("patch_encoder", "") or settings.get("patch_encoder", "")) or next(
            iter(encoders), "")
        region = cfg.region_input or str(s.attr("region_input", "") or settings.get("region_input", "")) or patch
    if not patch:
        raise TaskError(f"{store}: no patch encoder recorded (run `hwsi extract`, or set patch_encoder)")
    return patch, region


class SlideInputCache:
    """Per-slide model inputs, loaded once per run."""

    def __init__(self, model: Any, data: EvalData, cfg: EvalConfig) -> None:
        self.model, self.data, self.cfg = model, data, cfg
        self._cache: dict[str, Any] = {}

    def get(self, slide_id: str) -> Any:
        from hwsi.model.inputs import load_slide_inputs

        if slide_id not in self._cache:
            info = self.data.slides[slide_id]
            patch, region = store_encoders(info.store, self.cfg)
            mc = self.model.cfg
            self._cache[slide_id] = load_slide_inputs(info.store, patch, region, mc.max_regions, mc.k, mc.max_cells)
        return self._cache[slide_id]


def resolve_embedding(model: Any, cfg: EvalConfig) -> str:
    """``z_wsi`` or ``slide_token`` (``auto``: z_wsi when the model has a slide alignment head)."""
    has_head = model.heads is not None and "slide" in model.heads.heads
    kind = cfg.embedding if cfg.embedding != "auto" else ("z_wsi" if has_head else "slide_token")
    if kind not in ("z_wsi", "slide_token"):
        raise TaskError(f"unknown embedding {cfg.embedding!r}; use auto, z_wsi or slide_token")
    if kind == "z_wsi" and not has_head:
        raise TaskError("z_WSI needs the stage-1 slide alignment head (MLLMConfig.text_dim > 0 and the slide scale on)")
    if not model.hierarchy.cfg.use_slide:
        raise TaskError("slide embeddings need the slide scale (HierarchyConfig.use_slide)")
    return kind


def process_rank() -> tuple[int, int]:
    """(rank, world size) of this process in the torch.distributed process group; (0, 1) without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_results(n: int, mine: dict[int, Any]) -> list[Any]:
    """The values of positions ``0..n-1``, each computed by one process (``mine``: this process's), on every
    process (all_gather_object); one process: ``mine`` in order."""
    import torch.distributed as dist

    _, world = process_rank()
    merged = dict(mine)
    if world > 1:
        parts: list[Any] = [None] * world
        dist.all_gather_object(parts, mine)
        for p in parts:
            merged.update(p)
    return [merged[i] for i in range(n)]


def slide_embeddings(model: Any, slides: SlideInputCache, ids: Sequence[str], kind: str, batch_size: int = 4) -> np.ndarray:
    """(N, D) float64 slide embeddings (``z_wsi``: unit vectors in the text space; ``slide_token``: f_WSI); batch j
    on process j mod W (module docstring)."""
    import torch

    from hwsi.model.inputs import collate_slides

    dev = model_device(model)
    rank, world = process_rank()
    size = max(1, batch_size)
    starts = list(range(0, len(ids), size))
    mine: dict[int, np.ndarray] = {}
    with torch.no_grad():
        for j, s in enumerate(starts):
            if j % world != rank:
                continue
            batch = collate_slides([slides.get(i) for i in ids[s: s + size]]).to(dev)
            tok = model.hierarchy(batch).slide_token
            if kind == "z_wsi":
                tok = model.heads.embed("slide", tok)
            mine[j] = tok.float().cpu().numpy().astype(np.float64)
    rows = gather_results(len(starts), mine)
    return np.concatenate(rows) if rows else np.zeros((0, 0))


def derangement(ids: Sequence[str], seed: int = 0) -> dict[str, str]:
    """A deterministic permutation of ``ids`` with no fixed point: each slide -> another slide's visual inputs.

    The ids are sorted, shuffled with ``seed`` and each is mapped to the next one in that cycle (needs >= 2 ids).
    """
    u = sorted(set(ids))
    if len(u) < 2:
        raise TaskError("the shuffled-visual baseline needs at least two slides")
    order = [u[i] for i in np.random.default_rng([seed, 7919]).permutation(len(u))]
    return {order[j]: order[(j + 1) % len(order)] for j in range(len(order))}


def slide_visual_tokens(model: Any, slides: SlideInputCache, ids: Sequence[str]) -> dict[str, Any]:
    """Visual tokens per distinct slide id, each slide encoded alone (no padding: the same tensor whatever else is
    evaluated)."""
    import torch

    from hwsi.model.inputs import collate_slides

    dev = model_device(model)
    out: dict[str, Any] = {}
    with torch.no_grad():
        for v in dict.fromkeys(ids):
            out[v] = model.visual_tokens(collate_slides([slides.get(v)]).to(dev))[0]
    return out


def generate_answers(model: Any, slides: SlideInputCache, items: Sequence[QAItem], visual_ids: Sequence[str],
                     max_new_tokens: int, batch_size: int = 4) -> list[str]:
    """Greedy answers: item i is asked about the visual inputs of slide ``visual_ids[i]``, ``batch_size`` questions
    per batch, each slide's visual prefix prefilled once (:func:`hwsi.model.generate.greedy_answers`)."""
    from hwsi.model.generate import greedy_answers

    rank, world = process_rank()
    owner = {v: k % world for k, v in enumerate(dict.fromkeys(visual_ids))}
    todo = [i for i, v in enumerate(visual_ids) if owner[v] == rank]  # this process's share (module docstring)
    vis = slide_visual_tokens(model, slides, [visual_ids[i] for i in todo])
    qs = [strip_image_token(items[i].question) for i in todo]
    answers = greedy_answers(model, [vis[visual_ids[i]] for i in todo], qs, max_new_tokens, batch_size) if todo else []
    return gather_results(len(items), dict(zip(todo, answers, strict=True)))


_TEXT_ENCODERS: dict[str, Any] = {}


def get_text_encoder(name: str) -> Any:
    """A cached text encoder from the registry (``hwsi.features.encoders.create_text_encoder``)."""
    if name not in _TEXT_ENCODERS:
        from hwsi.features.encoders import create_text_encoder

        _TEXT_ENCODERS[name] = create_text_encoder(name)
    return _TEXT_ENCODERS[name]
