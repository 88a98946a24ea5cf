"""CLI commands of hwsi.serve (registered by hwsi.cli): `hwsi serve` and `hwsi export`."""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path

import typer

from hwsi.devices import device_option, dtype_option
from hwsi.errors import HwsiError
from hwsi.store import list_stores
from hwsi.utils.atomic import write_bytes_atomic

LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1"}


def host_warning(host: str) -> str | None:
    """A warning when ``host`` is not a loopback address (the viewer has no authentication)."""
    if host in LOOPBACK_NAMES:
        return None
    try:
        if ipaddress.ip_address(host).is_loopback:
            return None
    except ValueError:
        pass
    return (
        f"warning: binding {host} makes the viewer, its slides and its chat reachable from other machines; "
        "hwsi serve has no authentication. Use --host 127.0.0.1 unless you mean it."
    )


def load_assistant(model: Path | None, job: Path, device: str = "cpu",
                   dtype: str | None = None):  # -> Assistant | None
    """The real assistant over ``model`` (hwsi.model) on ``device`` with the LLM in ``dtype`` (None = the run's),
    or None without --model."""
    if model is None:
        return None
    from hwsi.serve.assistant import ModelAssistant

    return ModelAssistant.load(model, job, device=device, dtype=dtype)


def serve(
    job: Path = typer.Argument(..., help="Job folder (with stores/ and slides.json) whose slides are served."),
    host: str = typer.Option("127.0.0.1", help="Address to bind; anything but loopback prints a warning."),
    port: int = typer.Option(8000, min=0, max=65535, help="TCP port."),
    model: Path | None = typer.Option(None, "--model", help="Trained model folder for the chat (omit: view only)."),
    tile_cache_mb: int = typer.Option(128, min=1, help="LRU tile cache size in MiB."),
    device: str = device_option("cpu", " Where --model runs."),
    dtype: str | None = dtype_option(None, " The LLM's; default: the run's llm_dtype."),
) -> None:
    """Serve a slide viewer with overlays and an evidence-grounded chat for the slides of JOB."""
    import uvicorn

    from hwsi.serve.app import create_app

    if not (job / "stores").is_dir() or not list_stores(job):
        raise HwsiError(f"{job}: no stores in {job / 'stores'} (run `hwsi tile` and `hwsi extract` first)")
    warn = host_warning(host)
    if warn:
        typer.secho(warn, err=True, fg=typer.colors.YELLOW)
    assistant = load_assistant(model, job, device, dtype)
    app = create_app(job, assistant, tile_cache_bytes=tile_cache_mb * 2**20)
    typer.echo(f"hwsi serve: {len(app.state.hwsi.registry.ids())} slide(s) at http://{host}:{port}/")
    uvicorn.run(app, host=host, port=port, log_level="warning")


def export(
    job: Path = typer.Argument(..., help="Job folder."),
    slide_id: str = typer.Argument(..., help="Slide id (as listed by the viewer / slides.json)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output .geojson file."),
    question: str | None = typer.Option(None, help="Also export the evidence of the model's answer to this question."),
    model: Path | None = typer.Option(None, "--model", help="Model folder (needed with --question)."),
    nuclei: bool = typer.Option(True, help="Include nuclei (detections coloured by type)."),
    spf: bool = typer.Option(True, help="Include the SPF-selected patches."),
    regions: bool = typer.Option(False, help="Include every region (QuPath class Region*, SPF numbers as measurements)."),
    patches: bool = typer.Option(False, help="Include every tissue patch as a QuPath tile with its SPF relevance."),
) -> None:
    """Write nuclei, SPF patches and answer evidence of one slide as QuPath-compatible GeoJSON."""
    from hwsi.serve.geojson import export_geojson
    from hwsi.serve.overlays import StoreOverlays
    from hwsi.serve.registry import SlideRegistry

    entry = SlideRegistry(job).get(slide_id)
    if entry is None:
        raise HwsiError(f"{job}: no store for slide {slide_id!r}")
    ov = StoreOverlays.load(entry.store)
    evidence = []
    if question:
        if model is None:
            raise HwsiError("--question needs --model DIR")
        assistant = load_assistant(model, job)
        session = assistant.start(slide_id)
        answer = "".join(session.ask(question))
        typer.echo(f"answer: {answer}")
        evidence = session.evidence(question, answer).items
    fc = export_geojson(ov, evidence, nuclei=nuclei, spf=spf, regions=regions, patches=patches)
    write_bytes_atomic(out, json.dumps(fc).encode())
    kinds: dict[str, int] = {}
    for f in fc["features"]:
        name = f["properties"]["classification"]["name"]
        kinds[name] = kinds.get(name, 0) + 1
    typer.echo(f"wrote {out}: {len(fc['features'])} features {kinds}")


def register(app: typer.Typer) -> None:
    """Add this stage's commands to the hwsi app."""
    app.command("serve")(serve)
    app.command("export")(export)
