"""Preview image of a tiled slide: thumbnail, tissue mask tint, region grid (and patch grid when visible)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from hwsi.slide.grid import Grid
from hwsi.slide.tissue import TissueMask
from hwsi.utils.atomic import write_bytes_atomic


def render_preview(tissue: TissueMask, grid: Grid) -> np.ndarray:
    """RGB uint8 preview: tissue tinted green, kept regions outlined blue, tissue patches outlined light blue."""
    import cv2

    thumb = tissue.thumbnail.copy()
    th, tw = thumb.shape[:2]
    mask = cv2.resize(tissue.mask.astype(np.uint8), (tw, th), interpolation=cv2.INTER_NEAREST).astype(bool)
    tint = np.array([0, 200, 0], np.float32)
    thumb[mask] = (0.65 * thumb[mask] + 0.35 * tint).astype(np.uint8)
    ds = tissue.thumbnail_downsample
    p_px = grid.patch_size_level0 / ds
    if p_px >= 4:  # draw tissue patches only when they are visible
        for (x, y), ok in zip(grid.patch_coords.reshape(-1, 2), grid.patch_tissue.ravel()):
            if ok:
                x0, y0 = int(x / ds), int(y / ds)
                cv2.rectangle(thumb, (x0, y0), (int((x + grid.patch_size_level0) / ds) - 1,
                                                int((y + grid.patch_size_level0) / ds) - 1), (150, 190, 255), 1)
    for x, y in grid.region_coords:
        x0, y0 = int(x / ds), int(y / ds)
        x1, y1 = int((x + grid.region_size_level0) / ds), int((y + grid.region_size_level0) / ds)
        cv2.rectangle(thumb, (x0, y0), (x1, y1), (0, 0, 255), 2)
    return thumb


def save_preview(path: str | Path, tissue: TissueMask, grid: Grid) -> Path:
    """Write the preview PNG atomically."""
    import cv2

    img = render_preview(tissue, grid)
    ok, buf = cv2.imencode(".png", cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    if not ok:
        raise RuntimeError("PNG encoding failed")
    write_bytes_atomic(path, buf.tobytes())
    return Path(path)
