"""Ask about a region: the visual tokens of a slide inside an ROI (docs/roi.md).

    sel = select_roi(store, roi, max_regions=16, k=8)          # which regions and patches, and why
    x = roi_slide_inputs(store, "conch_vit_b16", "same", roi, max_regions=16, k=8, max_cells=32)
    chat = ChatSession(model, x.inputs, region_token_mask=x.region_token_mask)
    print(x.selection.summary())   # "Answer restricted to the ROI x 0..1024, y 0..1024 (level-0 px, rectangle): ..."

Token order stays Z = [z_c, z_p, z_r, z_WSI, z_text] (docs/design.md). What goes in, for an ROI (level-0 px):

* z_c, z_p: the cells and patch of each SPF-selected patch (the patches the model was trained to read, the only ones
  with nuclei: Eq. 3) whose CENTRE lies inside the ROI, at most k per region (the k most relevant). Where the ROI
  holds tissue but none of the SPF-selected patches, its k most relevant tissue patches per region are used instead
  (their cell token is the "no cells" one: nuclei are segmented in SPF-selected patches only); the summary says so.
* z_r: the regions of which at least ``min_region_overlap`` of the tissue patches (patch centres) lie inside.
* z_WSI: the slide token over the slide's regions (the whole slide's kept regions plus those the ROI needs), i.e.
  context from the whole slide, marked as such in the summary. The other regions feed z_WSI only.

Region identity (ProjectorConfig.region_embed) follows the regions' raster positions among the kept regions.
Bad ROIs (outside the slide, no tissue patch inside) are :class:`~hwsi.slide.roi_geometry.RoiError`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from hwsi.model.inputs import SlideInputs, load_slide_inputs, rank_regions
from hwsi.slide.roi_geometry import Roi, RoiError, place_roi
from hwsi.store import SlideStore

DEFAULT_MIN_REGION_OVERLAP = 0.5  # share of a region's tissue patches inside the ROI for its z_r to be used


@dataclass
class RoiSelection:
    """Which of a slide's regions and patches an ROI keeps (store rows and region-grid patch indices)."""

    roi: Roi
    regions: np.ndarray  # (n,) store rows given to the model, ascending (ROI regions + whole-slide context)
    selection: np.ndarray  # (R_store, w) patch indices inside the ROI per store row, -1 padded (k rule applied)
    region_tokens: np.ndarray  # store rows whose z_r is used (overlap >= min_region_overlap)
    overlap: np.ndarray  # (R_store,) share of each region's tissue patches with the centre inside the ROI
    patch_source: str  # "spf" (SPF-selected patches inside) | "relevance" (none was: top tissue patches inside)
    n_patches: int  # patch (and cell) tokens inside the ROI
    n_patches_slide: int  # patch tokens of the whole-slide answer
    n_regions_slide: int  # region tokens of the whole-slide answer
    min_region_overlap: float
    patch_boxes_level0: np.ndarray  # (n_patches, 4) x, y, w, h of the patches used (evidence stays inside)

    def summary(self) -> str:
        """What the answer is restricted to, in one line (printed by `hwsi ask --roi`, sent by the server)."""
        src = ("SPF-selected patches with the centre inside" if self.patch_source == "spf" else
               "no SPF-selected patch lies inside: its most relevant tissue patches, without nuclei")
        return (f"Answer restricted to the ROI {self.roi.describe()}: {self.n_patches} of {self.n_patches_slide} "
                f"patch tokens ({src}), {len(self.region_tokens)} of {self.n_regions_slide} regions "
                f"(>= {self.min_region_overlap:.0%} inside), plus the slide token (whole-slide context)")

    def record(self) -> dict[str, object]:
        """The ROI and what it kept, as the chat history stores it."""
        return {"geometry": self.roi.to_geojson(), "label": self.roi.label, "summary": self.summary(),
                "patches": self.n_patches, "patches_slide": self.n_patches_slide,
                "regions": [int(r) for r in self.region_tokens], "regions_slide": self.n_regions_slide,
                "patch_source": self.patch_source, "min_region_overlap": self.min_region_overlap}


def _top(cand: np.ndarray, relevance: np.ndarray, k: int) -> np.ndarray:
    """The k most relevant of ``cand`` (ties: stored order), in stored order."""
    if cand.size <= k:
        return cand
    rel = np.nan_to_num(relevance[cand].astype(np.float64), nan=-np.inf)
    return cand[np.sort(np.argsort(-rel, kind="stable")[:k])]


def select_roi(store: str | Path, roi: Roi, max_regions: int, k: int,
               min_region_overlap: float = DEFAULT_MIN_REGION_OVERLAP) -> RoiSelection:
    """The regions and patches of ``store`` an ROI keeps (rules: module docstring)."""
    if not 0.0 < min_region_overlap <= 1.0:
        raise RoiError(f"{roi.label}: the minimum region overlap must be in (0, 1], got {min_region_overlap}")
    placed = place_roi(store, roi)
    with SlideStore(Path(store)) as s:
        sel_all, rel_all = s.spf_selected(), s.spf_relevance()
    inside, overlap, pcoords, ps = placed.inside, placed.overlap, placed.patch_coords_level0, placed.patch_size_level0
    n_regions = inside.shape[0]
    chosen: list[np.ndarray] = []
    for ri in range(n_regions):
        sel = sel_all[ri][sel_all[ri] >= 0]
        chosen.append(_top(sel[inside[ri, sel]], rel_all[ri], k))
    source = "spf"
    if not any(c.size for c in chosen):
        source = "relevance"
        chosen = [_top(np.flatnonzero(inside[ri]), rel_all[ri], k) for ri in range(n_regions)]
    width_sel = max(1, max(c.size for c in chosen))
    selection = np.full((n_regions, width_sel), -1, np.int64)
    for ri, c in enumerate(chosen):
        selection[ri, : c.size] = c
    region_tokens = np.flatnonzero(overlap >= min_region_overlap - 1e-12)
    needed = np.union1d(np.flatnonzero([c.size > 0 for c in chosen]), region_tokens).astype(np.int64)
    if needed.size > max_regions:  # the ROI alone has more regions than the model takes: its most relevant ones
        needed = needed[rank_regions(rel_all[needed], selection[needed], max_regions)]
    whole = rank_regions(rel_all, sel_all, max_regions)
    others = np.setdiff1d(np.arange(n_regions), needed)  # z_WSI context: the most relevant of the other regions
    context = others[rank_regions(rel_all[others], sel_all[others], max_regions - needed.size)] if others.size \
        else others
    regions = np.sort(np.concatenate([needed, context])).astype(np.int64)
    dropped = np.setdiff1d(np.arange(n_regions), needed)
    selection[dropped] = -1  # patches of ROI regions cut by the cap are not used either
    region_tokens = np.intersect1d(region_tokens, needed)
    boxes = [(*pcoords[ri, j], ps, ps) for ri in needed for j in selection[ri] if j >= 0]
    n_slide = int(sum(min(k, int((sel_all[ri] >= 0).sum())) for ri in whole))
    return RoiSelection(roi, regions, selection, region_tokens, overlap, source, len(boxes), n_slide, len(whole),
                        float(min_region_overlap), np.asarray(boxes, np.float64).reshape(-1, 4))


@dataclass
class RoiInputs:
    """An ROI's model inputs: the slide's regions with only the ROI's patches, and which z_r to keep."""

    inputs: SlideInputs
    region_token_mask: torch.Tensor  # (R,) bool over inputs' regions
    selection: RoiSelection


def roi_slide_inputs(store: str | Path, patch_encoder: str, region_input: str, roi: Roi, max_regions: int = 64,
                     k: int = 16, max_cells: int = 64,
                     min_region_overlap: float = DEFAULT_MIN_REGION_OVERLAP) -> RoiInputs:
    """:class:`~hwsi.model.inputs.SlideInputs` restricted to ``roi`` (module docstring) and the z_r mask."""
    sel = select_roi(store, roi, max_regions, k, min_region_overlap)
    x = load_slide_inputs(store, patch_encoder, region_input, max_regions=max_regions, k=k, max_cells=max_cells,
                          regions=sel.regions, selection=sel.selection)
    mask = torch.from_numpy(np.isin(x.region_index.numpy(), sel.region_tokens))
    return RoiInputs(x, mask, sel)

