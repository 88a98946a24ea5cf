"""ROI samples in stages 2 and 3: records about a rectangle of the slide answered from that rectangle's tokens.

A train record with ``"roi": [x, y, w, h]`` (level-0 px; :func:`hwsi.data.records.parse_roi_field`) is a question
about that part of the slide. Its visual prefix is the one ``hwsi ask --roi`` builds at inference
(:func:`hwsi.model.roi.roi_slide_inputs`): z_c and z_p of the SPF-selected patches whose centre is inside, z_r of
the regions at least half inside, z_WSI over the slide's regions (whole-slide context). Training on them is what
makes an answer about a region follow that region rather than the slide token (docs/roi.md: a model trained on
whole slides only answered both ROIs of 12 of 44 held-out focal slides right; an ROI-aware fine-tune 44 of 44).

:class:`VisualInputs` gives every sample its inputs and z_r mask: whole-slide samples from the run's
:class:`~hwsi.train.data.SlideCache`, ROI samples computed once from the store and kept in RAM (a few kB each),
their features rounded to float16 as the slide cache stores them, so both kinds see the same precision.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from hwsi.model.inputs import SlideInputs, half_rounded
from hwsi.model.roi import roi_slide_inputs
from hwsi.slide.roi_geometry import parse_rect
from hwsi.train.data import ChatSample, SlideCache


class VisualInputs:
    """SlideInputs and z_r mask per sample (module docstring); ``get`` is keyed by :attr:`ChatSample.visual_key`."""

    def __init__(self, cache: SlideCache) -> None:
        self.cache = cache
        self._roi: dict[str, tuple[SlideInputs, torch.Tensor]] = {}

    def get(self, sample: ChatSample) -> tuple[SlideInputs, torch.Tensor | None]:
        if sample.roi is None:
            return self.cache.get(sample.slide_id), None
        key = sample.visual_key
        if key not in self._roi:
            store = self.cache.stores.get(sample.slide_id)
            if store is None:
                raise KeyError(f"slide {sample.slide_id!r} has no store")
            kw = self.cache.kw
            x, y, w, h = sample.roi
            rx = roi_slide_inputs(store, kw["patch_encoder"], kw["region_input"], parse_rect(f"{x},{y},{w},{h}"),
                                  max_regions=kw["max_regions"], k=kw["k"], max_cells=kw["max_cells"])
            self._roi[key] = (half_rounded(rx.inputs), rx.region_token_mask)
        return self._roi[key]

    def region_token_mask(self, samples: Sequence[ChatSample], n_regions: int) -> torch.Tensor | None:
        """(B, n_regions) bool z_r mask of a batch (every region True for whole-slide samples); None if none is an
        ROI sample (the batch is then exactly a whole-slide batch)."""
        if all(s.roi is None for s in samples):
            return None
        out = torch.ones(len(samples), n_regions, dtype=torch.bool)
        for b, s in enumerate(samples):
            m = self.get(s)[1]
            if m is not None:
                out[b] = False
                out[b, : m.numel()] = m
        return out
