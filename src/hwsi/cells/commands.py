"""CLI commands of hwsi.cells (registered by hwsi.cli). Heavy imports stay inside the command functions."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import typer

from hwsi.config import load_config, read_yaml
from hwsi.errors import ConfigError, HwsiError
from hwsi.options import positive_number

PLAIN_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")


def parse_region(text: str) -> tuple[int, int, int, int]:
    """``"x,y,w,h"`` (level-0 pixels) → ints; raises :class:`hwsi.errors.ConfigError` when malformed."""
    try:
        parts = [int(float(v)) for v in text.split(",")]
    except ValueError:
        parts = []
    if len(parts) != 4 or parts[2] <= 0 or parts[3] <= 0 or parts[0] < 0 or parts[1] < 0:
        raise ConfigError(f"--region must be x,y,w,h with x, y ≥ 0 and w, h > 0 (level-0 px), got {text!r}")
    return parts[0], parts[1], parts[2], parts[3]


def load_image(path: Path) -> "np.ndarray":
    """Read a PNG/JPEG tile as RGB uint8; :class:`HwsiError` naming the file when unreadable."""
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise HwsiError(f"{path}: no such file")
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except (UnidentifiedImageError, OSError) as exc:
        raise HwsiError(f"{path}: not a readable image ({exc})") from exc


def register(app: typer.Typer) -> None:
    """Add this stage's commands to the hwsi app."""

    @app.command("cells")
    def cells(
        source: Path = typer.Argument(..., help="A PNG/JPEG H&E tile, or a slide file (then --region is needed)."),
        out: Path = typer.Option(..., "--out", "-o", help="Per-nucleus table: .csv (+ <stem>.features.npy) or .h5."),
        mpp: float | None = typer.Option(None, callback=positive_number, help="µm per pixel. Required for image tiles; for slides it overrides "
                                                    "the slide metadata."),
        region: str | None = typer.Option(None, help="Slide region x,y,w,h in level-0 pixels (slides only)."),
        overlay: Path | None = typer.Option(None, help="Also write a PNG of the image with nucleus outlines "
                                                       "(yellow unknown, cyan small round, red large, green elongated)."),
        config: Path | None = typer.Option(None, help="YAML with SegmentConfig fields (section 'segment' or top level)."),
    ) -> None:
        """Segment the nuclei of an H&E image tile or slide region; write one row per nucleus.

        Coordinates x, y are pixels of the tile, or level-0 pixels of the slide. Areas and lengths are in µm.
        """
        from hwsi.cells.export import draw_overlay, table_with_offset, write_nuclei, write_png
        from hwsi.cells.segment import SegmentConfig, segment_nuclei

        cfg = SegmentConfig()
        if config is not None:
            raw = read_yaml(config)
            section = "segment" if isinstance(raw, dict) and "segment" in raw else None
            cfg = load_config(config, SegmentConfig, section=section)
        if mpp is not None and not mpp > 0:
            raise ConfigError(f"--mpp must be > 0, got {mpp}")
        if source.suffix.lower() in PLAIN_IMAGE_SUFFIXES:
            if region is not None:
                raise ConfigError("--region applies to slides; crop the image tile instead")
            if mpp is None:
                raise ConfigError(f"{source}: a plain image has no µm/px; pass --mpp (e.g. 0.5 for '20x')")
            rgb = load_image(source)
            offset, eff_mpp, scale = (0.0, 0.0), float(mpp), 1.0
        else:
            if region is None:
                raise ConfigError(f"{source}: pass --region x,y,w,h (level-0 px) to segment part of a slide")
            from hwsi.slide import open_slide

            x, y, w, h = parse_region(region)
            if max(w, h) > cfg.max_tile_px:
                raise ConfigError(f"--region {w}×{h} exceeds {cfg.max_tile_px} px per side; segment smaller regions")
            with open_slide(source, mpp=mpp) as slide:
                W, H = slide.dimensions
                if x + w > W or y + h > H:
                    raise HwsiError(f"{source}: region {x},{y},{w},{h} lies outside the slide ({W}×{H} level-0 px)")
                rgb = slide.read_region(x, y, 0, w, h)
                eff_mpp = float(slide.mpp)
            offset, scale = (float(x), float(y)), 1.0
        t0 = time.perf_counter()
        nuc = segment_nuclei(rgb, eff_mpp, cfg)
        dt = time.perf_counter() - t0
        table = table_with_offset(nuc, offset, scale)
        written = write_nuclei(out, table, nuc.features, attrs={"source": str(source), "mpp": eff_mpp,
                                                                "offset_xy_level0": list(offset)})
        if overlay is not None:
            write_png(overlay, draw_overlay(rgb, nuc.labels, nuc.table["type"]))
            written.append(overlay)
        counts = {int(t): int((nuc.table["type"] == t).sum()) for t in range(4)}
        typer.echo(f"{len(nuc)} nuclei in {rgb.shape[1]}×{rgb.shape[0]} px at {eff_mpp:g} µm/px ({dt * 1000:.0f} ms); "
                   f"types {counts}; wrote {', '.join(str(p) for p in written)}")
