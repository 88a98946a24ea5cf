"""CLI commands of hwsi.features (registered by hwsi.cli): `hwsi extract` and `hwsi import-features`
(`hwsi train-encoder`, a training loop, is registered by hwsi.train.commands). Heavy imports (torch, encoders) stay
inside the command functions."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import typer

from hwsi.devices import choice_check, device_option, dtype_option
from hwsi.errors import HwsiError
from hwsi.features.extract import ExtractConfig
from hwsi.features.import_config import ImportConfig
from hwsi.options import default_of, fraction, positive_int, positive_number
from hwsi.store import FEATURE_DTYPES, store_path
from hwsi.utils.launch import CLAIM_TIMEOUT_HELP, DEFAULT_CLAIM_TIMEOUT_S, SHARD_HELP, resolve_shard, shard_option

_extract = partial(default_of, ExtractConfig)
_import = partial(default_of, ImportConfig)


def tolerance_fraction(value: float) -> float:
    """A match tolerance in (0, 0.5] patch sides (beyond half a side the nearest patch is always taken)."""
    if not 0 < value <= 0.5:
        raise typer.BadParameter(f"must be a number in (0, 0.5], got {value!r}")
    return value


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
        shard: str | None = typer.Option(None, "--shard", callback=shard_option, help=SHARD_HELP),
        claim_timeout: float = typer.Option(DEFAULT_CLAIM_TIMEOUT_S, "--claim-timeout",
                                            callback=positive_number, help=CLAIM_TIMEOUT_HELP),
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
        result = run_extract(job, cfg, show_progress=not quiet, shard=resolve_shard(shard),
                             claim_timeout_s=claim_timeout)
        raise typer.Exit(result.exit_code)

    @app.command("import-features")
    def import_features_cmd(
        job: Path = typer.Argument(..., help="Job folder with JOB/stores/<slide_id>.h5."),
        features: Path = typer.Argument(..., help="A TRIDENT / CLAM features file (.h5, or .pt with --patches), a "
                                                  "folder of them named by slide, CLAM's features folder (h5_files/) "
                                                  "or a whole TRIDENT job (features_<enc>/) (docs/formats-features.md)."),
        name: str = typer.Option(..., "--name", help="Dataset name: written as patches/<NAME>."),
        slide_id: str | None = typer.Option(None, "--slide-id",
                                            help="Slide whose store receives a single file (default: its file stem)."),
        patches: Path | None = typer.Option(None, "--patches",
                                            help="The patches .h5 of the same run (CLAM's patches/<slide>.h5, "
                                                 "TRIDENT's patches/<slide>_patches.h5), or their folder: coordinates "
                                                 "for .pt files, patch size and level for CLAM features files."),
        patch_size_level0: float | None = typer.Option(_import("patch_size_level0"), "--patch-size-level0",
                                                       callback=positive_number,
                                                       help="Level-0 side of the foreign patches, for files that do "
                                                            "not state it (CLAM features .h5 without --patches)."),
        min_matched: float = typer.Option(_import("min_matched"), "--min-matched", callback=fraction,
                                          help="Fail the slide when fewer than this fraction of the foreign patches "
                                               "match the store's grid."),
        tolerance: float = typer.Option(_import("tolerance"), "--tolerance", callback=tolerance_fraction,
                                        help="Max patch-centre offset, in the store's patch sides (0-0.5]."),
        overwrite: bool = typer.Option(_import("overwrite"), "--overwrite", help="Replace an existing patches/<NAME>."),
        encoder: str | None = typer.Option(None, "--encoder",
                                           help="A TRIDENT job folder's encoder: read its features_<ENCODER>/ (needed "
                                                "where the job has several)."),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar (folder input)."),
    ) -> None:
        """Import TRIDENT / CLAM patch features as patches/<NAME> of the slides' stores."""
        cfg = ImportConfig(name=name, tolerance=tolerance, min_matched=min_matched,
                           patch_size_level0=patch_size_level0, patches=str(patches) if patches else None,
                           overwrite=overwrite)
        if features.is_dir():
            from hwsi.features.import_batch import import_features_batch

            if slide_id is not None:
                raise HwsiError(f"{features}: --slide-id names the slide of ONE file; a folder's files are named "
                                "by slide id")
            result = import_features_batch(job, features, cfg, show_progress=not quiet, encoder=encoder)
            raise typer.Exit(result.exit_code)
        from hwsi.features.import_features import import_features

        if encoder is not None:
            raise HwsiError(f"{features}: --encoder picks the features_<ENCODER>/ folder of a TRIDENT job folder; "
                            "give the job folder, or drop --encoder for one file")
        sid = slide_id or features.stem
        rep = import_features(store_path(job, sid), features, cfg)
        typer.echo(f"{sid}: patches/{name} ({rep.dim}-d, {rep.source_format}): {rep.summary()}")
