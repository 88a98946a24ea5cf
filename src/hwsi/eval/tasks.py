"""Benchmark tasks of the paper's Tables 1-6 run on a trained MLLM-HWSI over a job's feature stores.

API::

    data = load_eval_data(DATA, job=JOB)              # SynthPath cohort folder, or a real-format record file
    res = run_task("report", model, data, EvalConfig(convention="wsi-bench"))
    res.metrics, res.predictions, res.markdown        # TaskResult
    results = run_all(model, data, cfg, out="eval_out")   # every task; JSON + Markdown per task + summary.md

Tasks (:data:`TASKS`) and what they use:

=========================  =================================================================================
``zero_shot``              z_WSI (stage-1 slide alignment head, unit vector in the text space) vs class
                           embeddings from a prompt file (templates x class names through the text encoder,
                           CONCH/MI-Zero convention, :mod:`hwsi.eval.classification`); default prompts for
                           SynthPath: ``hwsi/eval/prompts/synthpath.json``. Balanced accuracy, weighted F1,
                           confusion matrix (PNG written beside the JSON).
``linear_probe``           logistic regression on slide embeddings, C chosen on the validation split.
``slide_retrieval``        slide->slide Acc@K and MV@top1% on the test split's slide embeddings.
``cross_modal_retrieval``  z_WSI vs text-encoder embeddings of the reference reports, Recall@1/3/5/10 both ways.
``vqa``                    greedy answers; closed items: accuracy + parse-failure rate; open: text metrics.
``report``, ``caption``    greedy generation; BLEU-1..4, ROUGE-L, METEOR in the chosen convention.
=========================  =================================================================================

Generation tasks print every score beside (a) the SynthPath FACT accuracy of the same texts
(:mod:`hwsi.eval.facts`) and (b) the same model's scores with the visual inputs SHUFFLED across slides: slide s is
answered with the visual tokens of slide ``pi(s)``, ``pi`` a deterministic derangement (:func:`derangement`), so no
slide keeps its own. A model whose scores do not drop under shuffling is not reading the slide.

Slide embeddings (``EvalConfig.embedding``): ``z_wsi`` (alignment head output, needs the stage-1 heads) or
``slide_token`` (f_WSI of the slide ViT); ``auto`` = z_wsi when the model has heads. Decoding is greedy; runs are
deterministic (no sampling, fixed derangement seed, fixed sample order).

Modules, in data-flow order: :mod:`~hwsi.eval.eval_config` (:class:`EvalConfig`, :class:`TaskError`),
:mod:`~hwsi.eval.eval_data` (:func:`load_eval_data`), :mod:`~hwsi.eval.model_outputs` (slide embeddings, greedy
answers, :func:`derangement`), :mod:`~hwsi.eval.embedding_tasks`, :mod:`~hwsi.eval.generation_tasks`,
:mod:`~hwsi.eval.results` (:class:`TaskResult`; JSON, Markdown, PNG); this module is the task registry. The names its
callers use beside :func:`run_task` (EvalConfig, EvalData, TaskError, TaskResult, load_eval_data, derangement,
heldout_closed_vqa, write_task) are re-exported here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from hwsi.eval.embedding_tasks import task_cross_modal, task_linear_probe, task_slide_retrieval, task_zero_shot
from hwsi.eval.eval_config import EvalConfig, TaskError, TextEncoderLike
from hwsi.eval.eval_data import EvalData, load_eval_data
from hwsi.eval.generation_tasks import heldout_closed_vqa, task_generation
from hwsi.eval.model_outputs import derangement
from hwsi.eval.results import TaskResult, write_summary, write_task
from hwsi.train.bundle import check_stores

TASKS: tuple[str, ...] = (
    "zero_shot",
    "linear_probe",
    "slide_retrieval",
    "cross_modal_retrieval",
    "vqa",
    "report",
    "caption",
)
GENERATION_TASKS: tuple[str, ...] = ("vqa", "report", "caption")

_EMBEDDING_TASKS: dict[str, Callable[[Any, EvalData, EvalConfig, TextEncoderLike | None], TaskResult]] = {
    "zero_shot": task_zero_shot,
    "linear_probe": task_linear_probe,
    "slide_retrieval": task_slide_retrieval,
    "cross_modal_retrieval": task_cross_modal,
}


def run_task(name: str, model: Any, data: EvalData, cfg: EvalConfig | None = None,
             text_encoder: TextEncoderLike | None = None) -> TaskResult:
    """Run task ``name`` (one of :data:`TASKS`); raises :class:`TaskError` when it cannot run on this model/data."""
    cfg = cfg or EvalConfig()
    if name not in TASKS:
        raise TaskError(f"unknown task {name!r}; choose one of {list(TASKS)}")
    was_training = model.training
    model.eval()
    try:
        if name in GENERATION_TASKS:
            res = task_generation(name, model, data, cfg)
        else:
            res = _EMBEDDING_TASKS[name](model, data, cfg, text_encoder)
    finally:
        model.train(was_training)
    res.config = asdict(cfg)
    res.data = data.summary()
    if data.unmatched or data.missing_stores:
        res.markdown += (f"\n\nData: {len(data.unmatched)} records without a store "
                         f"({len(res.data['unmatched_slide_ids'])} slide ids); "
                         f"{len(data.missing_stores)} slides of the data set without a store.")
    return res


def run_all(model: Any, data: EvalData, cfg: EvalConfig | None = None, tasks: Sequence[str] | None = None,
            out: str | Path | None = None, text_encoder: TextEncoderLike | None = None,
            figures: bool = True) -> dict[str, TaskResult]:
    """Every task (default :data:`TASKS`); a task that cannot run is kept as skipped with its reason.

    With ``out``: ``<task>.json``/``<task>.md`` per task, confusion-matrix PNGs of the classification tasks
    (``figures``) and ``summary.md`` with all tables.
    """
    cfg = cfg or EvalConfig()
    results: dict[str, TaskResult] = {}
    for name in tasks or TASKS:
        try:
            results[name] = run_task(name, model, data, cfg, text_encoder)
        except TaskError as exc:
            results[name] = TaskResult(name, {}, [], f"## {name}\n\nSkipped: {exc}", skipped=str(exc),
                                       config=asdict(cfg), data=data.summary())
    if out is not None:
        out = Path(out)
        for r in results.values():
            write_task(r, out, figures=figures)
        write_summary(results.values(), out)
    return results


def load_model(run_dir: str | Path, placement: Any = None) -> Any:
    """The trained :class:`hwsi.model.mllm.MLLMHWSI` of a training run folder
    (:func:`hwsi.train.inference.load_trained_model`: LoRA merged, eval mode; a folder that is not a finished run is
    a TrainError naming it); ``placement`` (:class:`hwsi.devices.Placement`): device and LLM dtype."""
    from hwsi.train.inference import load_trained_model

    return load_trained_model(run_dir, placement=placement)


def check_run_stores(run_dir: str | Path, data: EvalData) -> Any:
    """Check every store of ``data`` against the run's bundle (:func:`hwsi.train.bundle.check_stores`): a store made
    another way than the run's (encoder, µm/px, region size, SPF settings) is an error naming it. Returns the
    bundle, or None for a run without one (nothing checked)."""
    return check_stores([info.store for _, info in sorted(data.slides.items())], run_dir,
                        hint=" (extract the job with the run's settings: RUN/bundle/bundle.json)")


__all__ = [  # run_task's own names, and the few its callers need beside it (hwsi.demo, tests)
    "EvalConfig",
    "EvalData",
    "GENERATION_TASKS",
    "TASKS",
    "TaskError",
    "TaskResult",
    "check_run_stores",
    "derangement",
    "heldout_closed_vqa",
    "load_eval_data",
    "load_model",
    "run_all",
    "run_task",
    "write_task",
]
