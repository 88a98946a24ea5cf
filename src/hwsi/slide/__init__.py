"""hwsi.slide: open slides (µm/px), tissue masks, the region/patch grid, and fast streaming region reads.

Public API::

    open_slide(path, mpp=None, slide_id=None) -> Slide
    compute_tissue(slide, TissueConfig(), patch_size_level0=None) -> TissueMask
    build_grid(slide, tissue_mask, mask_downsample, GridConfig()) -> Grid
    iter_regions(slide, grid, ReaderConfig(), threads=2) -> Iterator[RegionPixels]
    tile_batch(source, job, TileConfig(), mpp=None) -> BatchResult        # `hwsi tile`
"""

from hwsi.slide.grid import Grid, GridConfig, build_grid, resolution_plan
from hwsi.slide.levels import read_level_box
from hwsi.slide.open import Slide, mpp_from_properties, open_slide
from hwsi.slide.reader import ReaderConfig, RegionPixels, iter_regions, read_region_pixels
from hwsi.slide.tissue import TissueConfig, TissueMask, compute_tissue, tissue_mask_from_rgb
from hwsi.slide.tile import SlideSpec, TileConfig, collect_slides, tile_batch, tile_slide

__all__ = [
    "Grid", "GridConfig", "ReaderConfig", "RegionPixels", "Slide", "SlideSpec", "TileConfig", "TissueConfig",
    "TissueMask", "build_grid", "collect_slides", "compute_tissue", "iter_regions", "mpp_from_properties",
    "open_slide", "read_level_box", "read_region_pixels", "resolution_plan", "tile_batch", "tile_slide",
    "tissue_mask_from_rgb",
]
