"""`hwsi demo`: the whole pipeline on SynthPath with tiny models (hwsi.demo.pipeline)."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    """Add `hwsi demo` and `hwsi ablate` to the hwsi app."""
    _register_ablate(app)

    @app.command("demo")
    def demo(
        out: Path = typer.Option(Path("demo_out"), "--out", help="Output folder (a rerun resumes where it stopped)."),
        preset: str = typer.Option("demo", "--preset", help="Pipeline size: demo (default), test or small."),
        slides: int = typer.Option(0, "--slides", min=0, help="Cohort size (0: the preset's)."),
        seed: int = typer.Option(0, "--seed", help="Seed of the cohort, encoders and training."),
        until: str = typer.Option("", "--until", help="Stop after this step: synth, tile, encoder, extract, "
                                  "train, eval, report."),
    ) -> None:
        """SynthPath cohort -> tile -> patch encoder -> extract -> train stages 0-3 -> evaluate -> OUT/report.md."""
        from dataclasses import replace

        from hwsi.demo.pipeline import STEPS, Pipeline, PipelineConfig
        from hwsi.errors import ConfigError

        if until and until not in STEPS:
            raise ConfigError(f"--until must be one of {', '.join(STEPS)}, got {until!r}")
        cfg = PipelineConfig.preset(preset)
        cfg = replace(cfg, seed=seed, **({"n_slides": slides} if slides else {}))
        p = Pipeline(out, cfg).run(until=until or None)
        secs = p.step_seconds()
        typer.echo("")
        typer.echo("hwsi demo: " + ", ".join(f"{k} {v:.0f}s" for k, v in secs.items())
                   + f" (total {sum(secs.values()):.0f}s)")
        if p.paths.report.is_file():
            typer.echo(f"report: {p.paths.report}")
        if (p.paths.runs / "config.yaml").is_file():
            typer.echo(f"ask:    hwsi ask {p.paths.cohort}/slides/<slide>.tiff --run {p.paths.runs} "
                       f"-q 'What is the diagnosis?'   (or a store: {p.paths.job}/stores/<slide>.h5)")
            typer.echo(f"view:   hwsi serve {p.paths.job} --model {p.paths.runs}   (then open http://127.0.0.1:8000)")


def _register_ablate(app: typer.Typer) -> None:
    @app.command("ablate")
    def ablate(
        table: int = typer.Option(..., "--table", help="1: scales fed to the LLM (paper Table 1); "
                                  "2: terms of L_HCA (paper Table 2)."),
        out: Path = typer.Option(Path("ablation_out"), "--out", help="Output folder (resumable)."),
        seeds: str = typer.Option("0,1,2", "--seeds", help="Comma-separated seeds (at least 3 for a CI)."),
        preset: str = typer.Option("small", "--preset", help="SynthPath pipeline size: small (default, 40 "
                                   "slides), test (80) or demo."),
        rows: str = typer.Option("", "--rows", help="Only these rows, by their printed names separated by ';' "
                                 "(default: every row of the table)."),
    ) -> None:
        """Train and score every ablation row on SynthPath over several seeds; print mean ± 95% CI."""
        from hwsi.demo.ablate import run_ablation
        from hwsi.errors import ConfigError

        try:
            seed_list = tuple(int(s) for s in seeds.split(",") if s.strip())
        except ValueError as exc:
            raise ConfigError(f"--seeds must be comma-separated integers, got {seeds!r}") from exc
        row_names = tuple(r.strip() for r in rows.split(";") if r.strip())
        md = run_ablation(table, out, seed_list, preset, row_names)
        typer.echo(md.read_text())
