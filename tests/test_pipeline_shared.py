"""The cached test-preset pipeline (``test_pipeline``) serving the eval and serve layers with a TRAINED model."""

from __future__ import annotations

import json

import numpy as np


def test_eval_report_task_on_trained_run_is_deterministic(test_pipeline) -> None:
    from hwsi.eval.tasks import EvalConfig, load_eval_data, run_task
    from hwsi.train.inference import load_trained_model

    p = test_pipeline.paths
    model = load_trained_model(p.runs)
    data = load_eval_data(p.cohort, p.job, split="test")
    cfg = EvalConfig(meteor=False)
    a = run_task("report", model, data, cfg)
    b = run_task("report", model, data, cfg)
    assert not a.skipped and len(a.predictions) == len({it.slide_id for it in data.items if it.category == "Report"})
    assert a.predictions == b.predictions  # greedy decoding: bit-identical reruns
    text = json.dumps(a.metrics)
    assert "shuffled" in text and "fact" in text  # every generation score beside its baselines
    assert all(pred["prediction"].strip() for pred in a.predictions)


def test_serve_assistant_on_trained_run(test_pipeline) -> None:
    from hwsi.serve.assistant import ModelAssistant

    p = test_pipeline.paths
    assistant = ModelAssistant.load(p.runs, p.job)
    sid = sorted(s.stem for s in (p.job / "stores").glob("*.h5"))[0]
    chat = assistant.start(sid)
    first = "".join(chat.ask("Are glands formed?", max_new_tokens=16))
    second = "".join(chat.ask("What is the diagnosis?", max_new_tokens=24))
    assert first.strip() and second.strip()
    ev = chat.evidence("What is the diagnosis?", second)
    assert ev.items and np.isfinite([e.score for e in ev.items]).all()
    assert all(e.w > 0 and e.h > 0 and e.x >= 0 and e.y >= 0 for e in ev.items)
