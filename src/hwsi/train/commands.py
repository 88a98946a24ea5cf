"""CLI commands of hwsi.train (registered by hwsi.cli): ``hwsi train-encoder``, ``hwsi train`` and ``hwsi ask``.

    hwsi train --stage {0,1,2,3} --config tiny --job JOB [--out RUN] [--resume] [--stop-after N]
    hwsi ask SLIDE.svs --run RUN --question "What is the grade?" [--question "And the stage?"]   (tiled + extracted
                                         the run's way into RUN/ask, cached; hwsi.train.ask)
    hwsi ask JOB/stores/SLIDE.h5 --run RUN -q ...                     (a store made the run's way)
    hwsi ask SLIDE --run RUN --roi x,y,w,h | --roi FILE.geojson -q ...  (about a region only: hwsi.model.roi)

Multi-GPU / DeepSpeed ZeRO-3 (same code, same flags)::

    accelerate launch --use_deepspeed --deepspeed_config_file src/hwsi/configs/deepspeed_zero3.json \\
        -m hwsi.cli train --stage 3 --config paper.yaml --job JOB --out RUN
"""

from __future__ import annotations

import logging
import sys
from functools import partial
from pathlib import Path
from typing import Optional

import typer

from hwsi.devices import choice_check, device_option, dtype_option, resolve_placement
from hwsi.errors import ConfigError
from hwsi.options import default_of
from hwsi.train.tracking import LOG_WITH, check_log_with
from hwsi.utils.outdir import prepare_output_dir


def _evidence(chat, inputs, run: Path, question: str, top: int, encoder_cache: dict,
              region_tokens=None) -> list[str]:
    """Lines naming the top regions and patches for ``question`` (level-0 coordinates); with an ROI only its patches
    and the regions whose token it uses (``region_tokens``: (R,) bool over ``inputs``' regions)."""
    import torch

    from hwsi.features.encoders import create_text_encoder
    from hwsi.train.inference import run_config

    if "enc" not in encoder_cache:
        cfg = run_config(run)
        enc = create_text_encoder(cfg.data.text_encoder)
        align = run / "stage1" / "final" / "alignment.safetensors"
        if align.is_file():
            from safetensors.torch import load_file

            text_state = {k[5:]: v for k, v in load_file(str(align)).items() if k.startswith("text.")}
            if text_state:
                enc.load_state_dict(text_state, strict=False)
        encoder_cache["enc"] = enc
    t = torch.from_numpy(encoder_cache["enc"].encode([question]))[0]
    scores = chat.relevance(t)  # (R, k), NaN at padding
    valid = ~torch.isnan(scores)
    lines = []
    region_score = torch.where(valid, scores, torch.zeros_like(scores)).sum(1) / valid.sum(1).clamp_min(1)
    region_score = torch.where(valid.any(1), region_score, torch.full_like(region_score, float("-inf")))
    for r in region_score.argsort(descending=True)[:top].tolist():
        if not torch.isfinite(region_score[r]) or (region_tokens is not None and not bool(region_tokens[r])):
            continue
        x, y = inputs.region_coords[r].tolist()
        lines.append(f"  region {int(inputs.region_index[r])} at level-0 ({x}, {y}): {float(region_score[r]):.3f}")
    flat = torch.where(valid, scores, torch.full_like(scores, float("-inf"))).reshape(-1)
    k = scores.shape[1]
    for i in flat.argsort(descending=True)[:top].tolist():
        if not torch.isfinite(flat[i]):
            continue
        r, j = divmod(i, k)
        x, y = inputs.patch_coords[r, j].tolist()
        lines.append(f"  patch {int(inputs.selected[r, j])} of region {int(inputs.region_index[r])} "
                     f"at level-0 ({x}, {y}): {float(flat[i]):.3f}")
    return lines


def register_train_encoder(app: typer.Typer) -> None:
    """Add ``hwsi train-encoder`` to a typer app (called from :func:`register`); option defaults are
    :class:`~hwsi.train.patch_encoder.TrainEncoderConfig`'s (:func:`hwsi.options.default_of`)."""
    from hwsi.train.patch_encoder import TrainEncoderConfig

    _enc = partial(default_of, TrainEncoderConfig)

    @app.command("train-encoder")
    def train_encoder_cmd(
        out: Path = typer.Option(..., "--out", help="Checkpoint folder to write (encoder.json + model.safetensors)."),
        n: int = typer.Option(_enc("n"), "--n", help="Number of SynthPath patch-caption pairs."),
        epochs: int = typer.Option(_enc("epochs"), "--epochs", help="Training epochs."),
        batch_size: int = typer.Option(_enc("batch_size"), "--batch-size", help="Batch size."),
        lr: float = typer.Option(_enc("lr"), "--lr", help="Peak learning rate (AdamW, cosine schedule)."),
        seed: int = typer.Option(_enc("seed"), "--seed", help="Seed of data, split, init and augmentation."),
        val_fraction: float = typer.Option(_enc("val_fraction"), "--val-fraction",
                                           help="Held-out fraction for zero-shot evaluation."),
        patch_px: int = typer.Option(_enc("patch_px"), "--patch-px", help="Patch size in px at --mpp."),
        mpp: float = typer.Option(_enc("mpp"), "--mpp", help="Target µm per pixel of the patches."),
    ) -> None:
        """Train the small patch encoder (hwsi_small_patch) CLIP-style against frozen MiniLM on SynthPath."""
        from hwsi.train.patch_encoder import TrainEncoderConfig, train_small_encoder

        prepare_output_dir(out, what="--out folder", create=False)
        cfg = TrainEncoderConfig(
            n=n, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, val_fraction=val_fraction,
            patch_px=patch_px, mpp=mpp,
        )  # fmt: skip
        train_small_encoder(cfg, out)


def register(app: typer.Typer) -> None:
    """Add this stage's commands to the hwsi app."""
    register_train_encoder(app)

    @app.command("train")
    def train(
        stage: int = typer.Option(..., "--stage", min=0, max=3, help="0 (tiny LLM pretraining, tiny runs only), "
                                  "1 (hierarchical alignment), 2 (projectors), 3 (LoRA instruction tuning)."),
        config: Path = typer.Option(..., "--config", help="A YAML file, or the name of a shipped preset: tiny, demo or paper."),
        job: Path = typer.Option(Path("."), "--job", help="Job folder (stores/, text paths in the config are relative to it)."),
        out: Optional[Path] = typer.Option(None, "--out", help="Run folder (default: JOB/runs/<config name>)."),
        resume: bool = typer.Option(False, "--resume", help="Continue from the stage's last checkpoint."),
        stop_after: Optional[int] = typer.Option(None, "--stop-after", min=1,
                                                 help="Stop (checkpointed) after this many optimizer steps in total."),
        progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
        skip_bad_records: bool = typer.Option(False, "--skip-bad-records", help="Leave malformed text records out "
                                              "(count and where logged) instead of failing (data.skip_bad_records)."),
        device: Optional[str] = device_option(None, " Default: the config's `device` (auto)."),
        dtype: Optional[str] = dtype_option(None, " The LLM's; default: the config's `llm_dtype`."),
        log_with: Optional[str] = typer.Option(None, "--log-with", callback=choice_check(LOG_WITH),
                                               help="Experiment tracker (accelerate's; offline, files under "
                                               "RUN/stageN): tensorboard, wandb, mlflow or none. Default: the "
                                               "config's `log_with` (none)."),
    ) -> None:
        """Run one training stage of MLLM-HWSI (paper §3.6); metrics in RUN/stageN/metrics.csv."""
        from hwsi.train.config import load_train_config
        from hwsi.train.stages import run_stage

        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

        cfg = load_train_config(config)
        cfg.data.skip_bad_records = cfg.data.skip_bad_records or skip_bad_records
        cfg.device = device or cfg.device
        cfg.llm_dtype = dtype or cfg.llm_dtype  # type: ignore[assignment]
        cfg.log_with = log_with or cfg.log_with  # type: ignore[assignment]
        check_log_with(cfg.log_with, "--log-with" if log_with else f"{config}: log_with")
        run = prepare_output_dir(out or job / "runs" / config.stem, what="run folder (--out)", create=False)
        res = run_stage(stage, cfg, job, run, resume=resume, stop_after=stop_after, progress=progress)
        m = res.metrics
        state = "finished" if res.finished else "stopped"
        typer.echo(f"stage {stage} {state}: step {m['steps']}/{m['total_steps']} on {m['n_items']} items, "
                   f"loss {m['first_loss']} -> {m['final_loss']} in {m['seconds']} s")
        typer.echo(f"run folder: {run}" + (f"; output: {res.output}" if res.output else
                                          f"; resume with --resume (checkpoint {res.checkpoint})"))

    @app.command("plan")
    def plan(
        config: Path = typer.Option(..., "--config", help="A YAML file, or a shipped preset: tiny, demo or paper."),
        regions: Optional[int] = typer.Option(None, "--regions", min=1, help="Regions per slide (default: the "
                                              "config's model.max_regions)."),
        gpus: int = typer.Option(1, "--gpus", min=1, help="GPUs the ZeRO-3 shards are spread over."),
    ) -> None:
        """The full model's parameters (total, trained per stage, LoRA), visual tokens per slide and memory per GPU
        under ZeRO-3, built on the meta device: no weights, no GPU (docs/devices.md)."""
        from hwsi.train.config import load_train_config
        from hwsi.train.plan import build_plan

        for line in build_plan(load_train_config(config), regions=regions, gpus=gpus).lines():
            typer.echo(line)

    @app.command("ask")
    def ask(
        slide: Path = typer.Argument(..., help="A slide file (tiled and extracted the run's way into --job, cached "
                                     "there), or a store JOB/stores/<slide>.h5 made the run's way."),
        run: Path = typer.Option(..., "--run", help="Trained run folder (hwsi train)."),
        question: list[str] = typer.Option([], "--question", "-q",
                                           help="Question; repeat for a multi-turn chat. None: read stdin lines."),
        job: Optional[Path] = typer.Option(None, "--job", help="Slide file: the job folder its store is cached in "
                                           "(default RUN/ask)."),
        mpp: Optional[float] = typer.Option(None, "--mpp", help="Slide file: level-0 µm/px when its metadata lacks "
                                            "it."),
        cells: Optional[str] = typer.Option(None, "--cells", help="Slide file of a run trained on CellViT nuclei: "
                                            "cellvit:DIR with this slide's CellViT output."),
        max_new_tokens: int = typer.Option(128, "--max-new-tokens", min=1),
        top: int = typer.Option(3, "--top", min=0, help="Top regions and patches to print per question (0: none)."),
        device: str = device_option("cpu"),
        dtype: Optional[str] = dtype_option(None, " The LLM's; default: the run's llm_dtype."),
        each: bool = typer.Option(False, "--each", help="Answer every question on its own (no chat history), in "
                                  "batches sharing the cached visual prefix; printed when all are done."),
        batch_size: int = typer.Option(16, "--batch-size", min=1, help="--each: questions per batch."),
        roi: Optional[str] = typer.Option(None, "--roi", help="Answer about a region only: x,y,w,h in level-0 px, or "
                                          "a GeoJSON file (QuPath annotations; polygons united). docs/roi.md"),
        min_region_overlap: float = typer.Option(0.5, "--min-region-overlap", help="--roi: share of a region's "
                                                 "tissue patches inside the ROI for its region token to be used."),
    ) -> None:
        """Ask a slide questions: streamed greedy answers, the visual prefix encoded once (KV cache), evidence.

        A slide file is tiled and extracted as the run's stores were (RUN/bundle); a store made otherwise is refused.
        """
        from hwsi.model.chat import ChatSession
        from hwsi.model.roi import roi_slide_inputs
        from hwsi.slide.roi_geometry import RoiError, parse_roi_option
        from hwsi.train.ask import is_store_path, prepare_slide
        from hwsi.train.inference import load_trained_model, run_config, slide_inputs_for

        place = resolve_placement(device, dtype or run_config(run).llm_dtype)  # one line before any work
        area = parse_roi_option(roi) if roi is not None else None
        if not 0 < min_region_overlap <= 1:
            raise RoiError(f"--min-region-overlap {min_region_overlap}: must be in (0, 1]")
        if mpp is not None and not mpp > 0:
            raise ConfigError(f"--mpp must be > 0, got {mpp}")
        if is_store_path(slide):
            if job is not None or mpp is not None or cells is not None:
                raise ConfigError(f"{slide}: --job, --mpp and --cells are for a slide file, not a store")
            store = slide
        else:
            store = prepare_slide(slide, run, job, mpp=mpp, cells=cells, log=lambda m: typer.echo(m, err=True),
                                  device=place.device)
        inputs = slide_inputs_for(store, run)  # checks the store against the run's bundle
        region_tokens = None
        if area is not None:  # the ROI's tokens + the slide token (hwsi.model.roi)
            cfg = run_config(run)
            rx = roi_slide_inputs(store, cfg.data.patch_encoder, cfg.data.region_input, area, cfg.model.max_regions,
                                  cfg.model.k, cfg.model.max_cells, min_region_overlap)
            inputs, region_tokens = rx.inputs, rx.region_token_mask
        model = load_trained_model(run, placement=place)
        chat = ChatSession(model, inputs, max_new_tokens=max_new_tokens, region_token_mask=region_tokens)
        if area is not None:
            typer.echo(rx.selection.summary())
        typer.echo(f"{inputs.slide_id}: {inputs.n_regions} regions, {chat.n_visual} visual tokens (cached prefix), "
                   f"on {place.describe()}", err=True)
        questions = iter(question) if question else _stdin_questions()
        if each:  # independent one-turn answers, batched (hwsi.model.generate); same text as a fresh chat's
            qs = list(questions)
            questions = iter(qs)
            answers = iter(chat.ask_each(qs, batch_size=batch_size))
        cache: dict = {}
        for q in questions:
            if len(question) > 1 or not question:
                typer.echo(f"Q: {q}")
            for piece in ([next(answers)] if each else chat.stream(q)):
                sys.stdout.write(piece)
                sys.stdout.flush()
            sys.stdout.write("\n")
            if top and model.heads is not None:
                typer.echo("evidence (cosine of the question with the stage-1 patch embeddings):")
                for line in _evidence(chat, inputs, run, q, top, cache, region_tokens):
                    typer.echo(line)


def _stdin_questions():
    """Questions typed one per line (prompt on stderr when interactive); an empty line or EOF ends."""
    while True:
        if sys.stdin.isatty():
            sys.stderr.write("> ")
            sys.stderr.flush()
        line = sys.stdin.readline()
        if not line or not line.strip():
            return
        yield line.strip()
