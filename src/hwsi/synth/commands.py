"""CLI commands of hwsi.synth (registered by hwsi.cli): ``hwsi synth``."""

from __future__ import annotations

from pathlib import Path

import typer

from hwsi.utils.outdir import prepare_output_dir


def register(app: typer.Typer) -> None:
    """Add this stage's commands to the hwsi app."""

    @app.command("synth")
    def synth(
        out: Path = typer.Option(..., "--out", help="Output folder."),
        seed: int = typer.Option(0, "--seed", help="Random seed (same seed -> identical slides, truth and text)."),
        cohort: int = typer.Option(0, "--cohort", help="Write a cohort of N slides balanced over classes."),
        width: int = typer.Option(3072, "--width", help="Slide width, level-0 px."),
        height: int = typer.Option(3072, "--height", help="Slide height, level-0 px."),
        size: int = typer.Option(0, "--size", help="Square slide side (overrides --width/--height)."),
        mpp: float = typer.Option(0.5, "--mpp", help="Level-0 µm per pixel."),
        region_size: int = typer.Option(1024, "--region-size", help="Scene region side, px."),
        patch_size: int = typer.Option(64, "--patch-size", help="Scene patch side, px."),
        classes: str = typer.Option(
            "adenocarcinoma_high_grade:focal", "--classes",
            help="Single slide: 'diagnosis[:extent]'; diagnoses benign, dysplasia, adenocarcinoma_low_grade, "
            "adenocarcinoma_high_grade, solid_carcinoma; extents focal, extensive.",
        ),
        slide_id: str = typer.Option("synth", "--slide-id", help="Single slide: file stem."),
        workers: int = typer.Option(0, "--workers", help="Cohort: processes (default: all CPUs)."),
    ) -> None:
        """Write SynthPath slides: pyramidal TIFF + <slide>.truth.h5 (+ cohort.json, facts.json, text/ for cohorts)."""
        from hwsi.synth.classes import parse_classes
        from hwsi.synth.cohort import write_cohort, write_slide
        from hwsi.synth.scene import SceneConfig

        prepare_output_dir(out, what="--out folder", create=False)
        if size:
            width = height = size
        base = SceneConfig(width=width, height=height, mpp=mpp, region_size=region_size, patch_size=patch_size,
                           seed=seed)
        if cohort:
            res = write_cohort(out, cohort, seed=seed, base=base, workers=workers or None)
            counts: dict[str, int] = {}
            for r in res.slides:
                counts[r.split] = counts.get(r.split, 0) + 1
            typer.echo(f"wrote {len(res.slides)} slides to {out} in {res.seconds:.1f} s (splits {counts})")
        else:
            base.classes = parse_classes(classes)
            rec = write_slide(out, base, slide_id, threads=None, overwrite=True)
            typer.echo(f"wrote {rec.path} and {rec.truth} in {rec.seconds:.1f} s: {rec.facts}")
