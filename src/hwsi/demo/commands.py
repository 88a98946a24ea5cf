"""`hwsi demo`: the whole pipeline on SynthPath with tiny models (hwsi.demo.pipeline)."""

from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path

import typer

from hwsi.config import from_dict
from hwsi.errors import ConfigError
from hwsi.utils.atomic import write_bytes_atomic, write_json_atomic
from hwsi.utils.outdir import prepare_output_dir


def register(app: typer.Typer) -> None:
    """Add `hwsi demo`, `hwsi ablate` and `hwsi gates` to the hwsi app."""
    _register_ablate(app)
    _register_gates(app)

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
        from hwsi.demo.pipeline import STEPS, Pipeline, PipelineConfig

        if until and until not in STEPS:
            raise ConfigError(f"--until must be one of {', '.join(STEPS)}, got {until!r}")
        prepare_output_dir(out, what="--out folder", create=False)
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
        protocol: str = typer.Option("paper", "--protocol", help="Table 1: paper (a scale off in stage 1 and the "
                                     "LLM input) or clean (stage 1 with every scale; the LLM input only)."),
        stage1_probes: bool = typer.Option(False, "--stage1-probes", help="Only stage 1 of each row and seed, and "
                                           "linear probes of its outputs per scale (minutes, not hours)."),
        stage1_epochs: int = typer.Option(None, "--stage1-epochs", min=1, help="With --stage1-probes: retrain "
                                          "stage 1 with this many epochs into OUT/stage1-e<N> (default: probe the "
                                          "table's own runs)."),
    ) -> None:
        """Train and score every ablation row on SynthPath over several seeds; print mean ± 95% CI."""
        from hwsi.demo.ablate import run_ablation

        try:
            seed_list = tuple(int(s) for s in seeds.split(",") if s.strip())
        except ValueError as exc:
            raise ConfigError(f"--seeds must be comma-separated integers, got {seeds!r}") from exc
        row_names = tuple(r.strip() for r in rows.split(";") if r.strip())

        prepare_output_dir(out, what="--out folder", create=False)
        if stage1_epochs is not None and not stage1_probes:
            raise ConfigError("--stage1-epochs applies only with --stage1-probes")
        if stage1_probes:
            from hwsi.demo.ablate import select_rows
            from hwsi.demo.stage1_sweep import stage1_probes as sweep

            md = sweep(out, table, select_rows(table, row_names), seed_list, preset, stage1_epochs)
            typer.echo(md.read_text())
            return
        md = run_ablation(table, out, seed_list, preset, row_names, protocol)
        typer.echo(md.read_text())


def _register_gates(app: typer.Typer) -> None:
    @app.command("gates")
    def gates(
        pipeline: Path = typer.Argument(..., help="A finished `hwsi demo --out` folder (cohort/, job/, runs/)."),
        scales: str = typer.Option("cells,patches,regions,slide", "--scales", help="Comma-separated gates to run."),
        stem: str = typer.Option("conv", "--stem", help="Region-encoder stem: conv, neighbour or linear (HIPT)."),
        pos_grid: int = typer.Option(16, "--pos-grid", min=1, help="ViT-4K position-grid side."),
        probes: bool = typer.Option(True, "--probes/--no-probes", help="Also probe the run's stage-1 outputs."),
        out: Path = typer.Option(None, "--out", help="Write gates.json / gates.md here (default: PIPELINE)."),
    ) -> None:
        """Supervised ceilings of each scale's encoder on the fact it owns (held-out slides), and linear probes of
        the trained stage-1 outputs beside random init and the raw input (docs/design.md §5)."""
        from hwsi.demo.gates import GateConfig, gates_table, results_json, run_gates
        from hwsi.demo.probes import probe_stage1, probes_table
        from hwsi.model.vit4k import ViT4KConfig

        cfg = GateConfig()  # --stem is checked by the typed reader against ViT4KConfig.stem's Literal
        cfg.vit4k = from_dict(ViT4KConfig, {**asdict(cfg.vit4k), "stem": stem, "pos_grid": pos_grid},
                              "hwsi demo gates options")
        names = tuple(s.strip() for s in scales.split(",") if s.strip())
        results = run_gates(pipeline, cfg, names)
        md = "## Gates (supervised ceilings, held-out slides)\n\n" + gates_table(results) + "\n"
        data = results_json(results, cfg)
        run = pipeline / "runs"
        if probes and (run / "stage1" / "final").is_dir():
            pr = probe_stage1(pipeline, run, cfg)
            md += "\n## Stage-1 probes (logistic regression on z, held-out slides)\n\n" + probes_table(pr) + "\n"
            data["probes"] = [asdict(r) for r in pr]
        dest = out or pipeline
        dest.mkdir(parents=True, exist_ok=True)
        write_json_atomic(dest / "gates.json", data)
        write_bytes_atomic(dest / "gates.md", md.encode("utf-8"))
        typer.echo(md)
