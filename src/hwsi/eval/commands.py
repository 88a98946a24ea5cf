"""CLI commands of hwsi.eval (registered by hwsi.cli): ``hwsi eval`` and ``hwsi score``."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import typer

from hwsi.config import from_dict
from hwsi.devices import device_option, dtype_option, resolve_placement
from hwsi.eval.eval_config import EvalConfig, ScoreConfig, TaskError
from hwsi.options import default_of
from hwsi.utils.outdir import prepare_output_dir


_eval = partial(default_of, EvalConfig)
_score = partial(default_of, ScoreConfig)


def register(app: typer.Typer) -> None:
    """Add this stage's commands to the hwsi app."""

    @app.command("eval")
    def eval_(
        task: list[str] = typer.Option(
            ["all"], "--task",
            help="Task(s): zero_shot, linear_probe, slide_retrieval, cross_modal_retrieval, vqa, report, caption, "
            "or all (repeat --task for several).",
        ),
        data: Path = typer.Option(..., "--data", help="SynthPath cohort folder (cohort.json) or a record file "
                                  "(WSI-Bench test jsonl, SlideBench csv/json, WSI-VQA, HistGen json)."),
        model: Path = typer.Option(..., "--model", help="Training run folder (hwsi.train)."),
        job: Path = typer.Option(None, "--job", help="Job folder with stores/<slide_id>.h5 (default: DATA/job)."),
        out: Path = typer.Option(Path("eval_out"), "--out", help="Output folder: <task>.json, <task>.md, summary.md."),
        convention: str = typer.Option(_eval("convention"), "--convention", help="Generation metrics: wsi-bench or coco."),
        coco_tokenizer: str = typer.Option(_eval("coco_tokenizer"), "--coco-tokenizer", help="coco only: ptb (Java) or simple."),
        limit: int = typer.Option(_eval("limit"), "--limit", help="First N test samples per task (0 = all)."),
        split: str = typer.Option("test", "--split", help="Evaluated split (SynthPath: test or val)."),
        labels: Path = typer.Option(None, "--labels", help="Record-file data: CSV slide_id,label[,split] for the "
                                    "classification / retrieval tasks."),
        label_key: str = typer.Option(_eval("label_key"), "--label-key", help="SynthPath label: a fact name or 'label'."),
        prompts: Path = typer.Option(None, "--prompts", help="Zero-shot prompt file (CONCH/MI-Zero json or TITAN "
                                     "yaml); default: the packaged SynthPath prompts."),
        prompt_set: int = typer.Option(_eval("prompt_set"), "--prompt-set", help="Index of the prompt set in the file."),
        text_encoder: str = typer.Option(_eval("text_encoder"), "--text-encoder", help="Text encoder (registry name)."),
        embedding: str = typer.Option(_eval("embedding"), "--embedding", help="Slide embedding: auto, z_wsi or slide_token."),
        max_new_tokens: int = typer.Option(_eval("max_new_tokens"), "--max-new-tokens", help="0 = per task (report 256, caption 96, vqa 64)."),
        batch_size: int = typer.Option(_eval("batch_size"), "--batch-size", help="Slides per forward (embeddings)."),
        answer_batch_size: int = typer.Option(_eval("answer_batch_size"), "--answer-batch-size",
                                              help="Questions per batched greedy generation (1: one at a time; the "
                                              "answers are the same, docs/generation.md)."),
        no_shuffle: bool = typer.Option(False, "--no-shuffle", help="Skip the shuffled-visual-tokens baseline."),
        no_meteor: bool = typer.Option(False, "--no-meteor", help="Skip METEOR (the slow metric)."),
        seed: int = typer.Option(_eval("shuffle_seed"), "--seed", help="Seed of the shuffled-visual derangement."),
        skip_bad_records: bool = typer.Option(False, "--skip-bad-records", help="Record-file data: leave malformed "
                                              "records out (count and where printed) instead of failing."),
        device: str = device_option(_eval("device")),
        dtype: str = dtype_option(None, " The LLM's; default: the run's llm_dtype."),
    ) -> None:
        """Evaluate a trained model on the paper's tasks; JSON + Markdown tables per task in --out. Under torchrun
        the processes share the slides and questions out and gather (docs/cluster.md); the main one writes."""
        # the CLI imports the evaluation on use (torch, transformers): `hwsi --help` stays fast
        from hwsi.eval.eval_data import load_eval_data
        from hwsi.eval.tasks import TASKS, check_run_stores, load_model, run_all
        from hwsi.train.processes import process_state
        from hwsi.train.inference import run_config

        main = process_state(device).is_main_process  # torchrun: the process group; else one process
        echo = typer.echo if main else (lambda *args, **kwargs: None)

        names = list(TASKS) if "all" in task else task
        bad = [t for t in names if t not in TASKS]
        if bad:
            raise TaskError(f"unknown task(s) {bad}; choose from {list(TASKS)} or all")

        # the typed reader checks the options' values (convention, coco_tokenizer, embedding are Literal fields)
        cfg = from_dict(EvalConfig, dict(
            convention=convention, coco_tokenizer=coco_tokenizer, meteor=not no_meteor, limit=limit,
            batch_size=batch_size, answer_batch_size=answer_batch_size, max_new_tokens=max_new_tokens, shuffled_baseline=not no_shuffle, shuffle_seed=seed,
            text_encoder=text_encoder, prompt_file=str(prompts or ""), prompt_set=prompt_set, label_key=label_key,
            embedding=embedding, device=device, dtype=dtype or ""), "hwsi eval options")
        prepare_output_dir(out, what="--out folder", create=False)
        ev = load_eval_data(data, job, split=split, label_key=label_key, labels_csv=labels,
                            skip_bad_records=skip_bad_records)
        if ev.skipped_records:
            echo(f"warning: {data}: {ev.records_summary}", err=True)
        echo(f"data: {len(ev.slides)} slides with stores, {len(ev.items)} {split} records; {ev.match_summary}")
        if ev.missing_stores:
            echo(f"warning: {len(ev.missing_stores)} slides have no store: {ev.missing_stores[:10]}")
        run_cfg = run_config(model)  # not a run folder: one line, before any work
        cfg.patch_encoder, cfg.region_input = run_cfg.data.patch_encoder, run_cfg.data.region_input
        if check_run_stores(model, ev) is None:
            echo(f"warning: {model} has no bundle/bundle.json (trained before hwsi recorded one): the stores "
                 "are not checked against the run's encoders and grid", err=True)
        place = resolve_placement(cfg.device, cfg.dtype or run_cfg.llm_dtype)
        cfg.device, cfg.dtype = place.device, place.dtype  # each task's JSON records what ran
        mdl = load_model(model, place)
        if not main:
            cfg.meteor = False  # the other processes' metrics are not written: no second METEOR (Java, temp files)
        results = run_all(mdl, ev, cfg, tasks=names, out=out if main else None)
        for name, r in results.items():
            echo(f"{name}: " + (f"skipped ({r.skipped})" if r.skipped else f"written {out / (name + '.json')}"))
        echo(f"summary: {out / 'summary.md'}")
        if all(r.skipped for r in results.values()):
            raise typer.Exit(1)

    @app.command("score")
    def score(
        predictions: Path = typer.Argument(..., help="Another tool's answer file: WSI-LLaVA model_vqa jsonl, SlideChat "
                                           "test csv, NLP_Metric / WSI-Relevance inputs, hwsi eval <task>.json, or a "
                                           "json/jsonl/csv with question ids and answers (docs/scoring-peers.md)."),
        data: Path = typer.Option(..., "--data", help="The benchmark: WSI-Bench test jsonl, SlideBench-VQA json/csv, "
                                  "WSI-VQA json, or a SynthPath cohort folder (facts scored too)."),
        convention: str = typer.Option(_score("convention"), "--convention", help="Text metrics: wsi-bench or coco."),
        coco_tokenizer: str = typer.Option(_score("coco_tokenizer"), "--coco-tokenizer",
                                           help="coco only: ptb (Java) or simple."),
        out: Path = typer.Option(Path("score_out"), "--out", help="Output folder: answers.*, <task>.json, <task>.md, "
                                 "summary.md."),
        fmt: str = typer.Option("auto", "--format", help="Layout of PREDICTIONS: auto, slidechat-csv, nlp-metric, "
                                "wsi-relevance-csv, llava, wsi-llava, hwsi-eval, generic."),
        id_key: str = typer.Option("", "--id-key", help="Column / key of the question id (default: the layout's)."),
        answer_key: str = typer.Option("", "--answer-key", help="Column / key of the answer (default: the layout's)."),
        missing: str = typer.Option(_score("missing"), "--missing", help="Questions without an answer: skip (left "
                                    "out, counted) or wrong (scored as empty answers)."),
        split: str = typer.Option(_score("split"), "--split", help="SynthPath cohort only: the split's records."),
        no_meteor: bool = typer.Option(False, "--no-meteor", help="Skip METEOR (the slow metric)."),
    ) -> None:
        """Score another tool's answers to a benchmark with hwsi eval's tables (closed accuracy + parse failures,
        open text metrics, facts); JSON + Markdown in --out, the tables printed."""
        from hwsi.eval.peer_predictions import read_peer_predictions
        from hwsi.eval.score import load_benchmark, score_predictions, write_scores

        cfg = from_dict(ScoreConfig, dict(convention=convention, coco_tokenizer=coco_tokenizer, meteor=not no_meteor,
                                          missing=missing, split=split), "hwsi score options")
        prepare_output_dir(out, what="--out folder", create=False)
        bench = load_benchmark(data, split=cfg.split)
        preds = read_peer_predictions(predictions, fmt, id_key=id_key, answer_key=answer_key)
        results = score_predictions(preds, bench, cfg)
        prepare_output_dir(out, what="--out folder")
        summary = write_scores(results, out, f"Scores of {preds.path.name} on {bench.source}")
        typer.echo(summary.read_text(encoding="utf-8").rstrip())
        typer.echo(f"written: {summary} and " + ", ".join(f"{r.name}.json" for r in results))
