"""CLI commands of hwsi.slide (registered by hwsi.cli)."""

from __future__ import annotations

from pathlib import Path

import typer

from hwsi.options import fraction, open_fraction, positive_int, positive_number
from hwsi.utils.launch import CLAIM_TIMEOUT_HELP, DEFAULT_CLAIM_TIMEOUT_S, SHARD_HELP, resolve_shard, shard_option


def register(app: typer.Typer) -> None:
    """Add this stage's commands to the hwsi app."""

    @app.command("tile")
    def tile(
        source: Path = typer.Argument(..., help="A slide file, a folder of slides, or a CSV with columns slide[,mpp] "
                                                "(or TRIDENT's wsi[,mpp])."),
        recursive: bool = typer.Option(False, "--recursive", "-r", help="Also the slides in the folder's "
                                                                         "sub-folders, at any depth."),
        out: Path = typer.Option(..., "--out", "-o", help="Job folder (stores/, errors/, previews/, slides.json)."),
        region_size: int = typer.Option(4096, callback=positive_int, help="Region side in pixels at --target-mpp."),
        patch_size: int = typer.Option(256, callback=positive_int, help="Patch side in pixels at --target-mpp."),
        target_mpp: float = typer.Option(0.5, callback=positive_number, help="Target µm per pixel (0.5 ≈ '20x')."),
        mpp: float | None = typer.Option(None, callback=positive_number, help="Level-0 µm/px for slides without it in their metadata "
                                                    "(overrides the metadata)."),
        min_region_tissue: float = typer.Option(0.05, callback=fraction, help="Drop regions with a smaller tissue fraction."),
        min_patch_tissue: float = typer.Option(0.25, callback=fraction, help="A patch is tissue from this tissue fraction on."),
        mpp_tolerance: float = typer.Option(0.02, callback=open_fraction, help="Use the slide's own µm/px when within this relative "
                                                       "distance of the target (no resampling)."),
        threads: int = typer.Option(2, callback=positive_int, help="Threads reading the slide."),
        annotations: Path | None = typer.Option(
            None, "--annotations", help="QuPath GeoJSON annotations (level-0 px): tile only inside the include "
            "polygons and outside those classed Ignore*/Exclude; a FILE for one slide, or a folder of <slide>.geojson."),
        preview: bool = typer.Option(False, "--preview", help="Write JOB/previews/<slide_id>.png."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Redo slides already tiled."),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
        shard: str | None = typer.Option(None, "--shard", callback=shard_option, help=SHARD_HELP),
        claim_timeout: float = typer.Option(DEFAULT_CLAIM_TIMEOUT_S, "--claim-timeout",
                                            callback=positive_number, help=CLAIM_TIMEOUT_HELP),
    ) -> None:
        """Decompose slides into tissue regions and patches: one HDF5 store per slide in OUT/stores/."""
        from hwsi.slide.grid import GridConfig
        from hwsi.slide.tile import TileConfig, tile_batch

        grid = GridConfig(
            target_mpp=target_mpp,
            region_size=region_size,
            patch_size=patch_size,
            min_region_tissue=min_region_tissue,
            min_patch_tissue=min_patch_tissue,
            mpp_tolerance=mpp_tolerance,
        )
        grid.validate()
        result = tile_batch(source, out, TileConfig(grid=grid, preview=preview, threads=threads), mpp=mpp,
                            overwrite=overwrite, show_progress=not quiet, shard=resolve_shard(shard),
                            claim_timeout_s=claim_timeout, annotations=annotations, recursive=recursive)
        raise typer.Exit(result.exit_code)
