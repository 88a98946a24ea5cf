"""CLI commands of hwsi.features (registered by hwsi.cli): `hwsi extract` and `hwsi import-features`
(`hwsi train-encoder`, a training loop, is registered by hwsi.train.commands). Heavy imports (torch, encoders) stay
inside the command functions."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import typer

from hwsi.devices import choice_check, device_option, dtype_option
from hwsi.features.extract import ExtractConfig
from hwsi.options import default_of, positive_int
from hwsi.store import FEATURE_DTYPES, store_path

_extract = partial(default_of, ExtractConfig)


def register(app: typer.Typer) -> None:
    """Add this stage's commands to the hwsi app."""

    @app.command("extract")
    def extract(
        job: Path = typer.Argument(..., help="Job folder written by `hwsi tile` (JOB/stores/<slide_id>.h5)."),
        patch_encoder: str = typer.Option(_extract("patch_encoder"), "--patch-encoder",
                                          help="Patch encoder NAME or NAME:CHECKPOINT (f_ij of the paper; must share "
                                               "the text encoder's space for SPF Eq. 2)."),
        region_input: str = typer.Option(_extract("region_input"), "--region-input",
                                         help="Encoder NAME[:CKPT] of the region encoder's input (e.g. hipt_vit256:"
                                              "vit256_small_dino.pth), or 'same' to reuse the patch features."),
        text_encoder: str = typer.Option(_extract("text_encoder"), "--text-encoder",
                                         help="Text encoder NAME[:CKPT] for SPF."),
        cells: str = typer.Option(_extract("cells"), "--cells",
                                  help="Cells of the SPF-selected patches (Eq. 3): builtin | none | cellvit:DIR."),
        batch_size: int = typer.Option(_extract("batch_size"), "--batch-size",
                                       help="Patches per encoder forward pass."),
        threads: int = typer.Option(_extract("threads"), "--threads",
                                    help="Threads reading regions (overlaps reading with encoding)."),
        k: int = typer.Option(_extract("k"), "--k", callback=positive_int,
                              help="SPF: patches kept per region (top-k by text relevance, Eq. 2)."),
        n_div: int = typer.Option(_extract("n_div"), "--n-div",
                                  help="SPF: diverse survivors of Eq. 1 kept before top-k (0 = off)."),
        min_tissue: float = typer.Option(_extract("min_tissue"), "--min-tissue",
                                         help="SPF: candidates are tissue patches with at least this tissue fraction "
                                              "(0-1)."),
        vocab: Path | None = typer.Option(None, "--vocab", help="SPF vocabulary file (.txt one term per line, or "
                                                                 ".yaml list); default: the built-in vocabulary."),
        slide: list[str] = typer.Option([], "--slide", help="Only these slide ids (repeatable)."),
        overwrite: bool = typer.Option(_extract("overwrite"), "--overwrite", help="Redo slides already extracted."),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
        device: str = device_option(_extract("device"), " All three encoders run there (docs/devices.md)."),
        dtype: str = dtype_option(_extract("dtype"), " The encoders' weights and compute."),
        feature_dtype: str = typer.Option(_extract("feature_dtype"), "--feature-dtype",
                                          callback=choice_check(FEATURE_DTYPES),
                                          help="Stored patch features: float32, or float16 (half the store; read "
                                               "back as float32)."),
    ) -> None:
        """Fill the stores with patch features, region-encoder inputs, SPF selections and cells."""
        from hwsi.features.extract import run_extract

        cfg = ExtractConfig(
            patch_encoder=patch_encoder, region_input=region_input, text_encoder=text_encoder, cells=cells,
            batch_size=batch_size, threads=threads, k=k, n_div=n_div, min_tissue=min_tissue,
            vocab=str(vocab) if vocab else None,
            overwrite=overwrite, slide_ids=list(slide), device=device, dtype=dtype,  # type: ignore[arg-type]
            feature_dtype=feature_dtype,  # type: ignore[arg-type]
        )
        result = run_extract(job, cfg, show_progress=not quiet)
        raise typer.Exit(result.exit_code)

    @app.command("import-features")
    def import_features_cmd(
        job: Path = typer.Argument(..., help="Job folder with JOB/stores/<slide_id>.h5."),
        features: Path = typer.Argument(..., help="TRIDENT or CLAM features .h5 ('features' (N, D), 'coords' (N, 2))."),
        slide_id: str = typer.Option(..., "--slide-id", help="Slide whose store receives the features."),
        name: str = typer.Option(..., "--name", help="Dataset name: written as patches/<NAME>."),
        tolerance: float = typer.Option(0.25, "--tolerance", help="Max coordinate offset, in patch sides."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing patches/<NAME>."),
    ) -> None:
        """Import a TRIDENT / CLAM features file as the patch features of one slide."""
        from hwsi.features.import_features import import_features

        rep = import_features(store_path(job, slide_id), features, name, tolerance=tolerance, overwrite=overwrite)
        typer.echo(f"{slide_id}: patches/{name} ({rep.dim}-d, {rep.source_format}): {rep.summary()}")
