"""ROI records in training (docs/roi.md "Training records"): the ``roi`` field of a record, its samples in stages
2-3 answered from the ROI's tokens (hwsi.train.roi_samples), left out of stage 0, and SynthPath's region records."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from hwsi.data import load_records
from hwsi.data.records import RecordError
from test_train import make_job, tiny_config

ROI_Q = "How are the glands arranged?\nA) regular\nB) crowded"


def _add_roi_records(job: Path) -> None:
    p = job / "text" / "train.json"
    recs = json.loads(p.read_text())
    for sid, x, a in (("s00", 0, "A) regular"), ("s00", 1000, "B) crowded"), ("s01", 2000, "B) crowded")):
        recs.append({"id": f"{sid}_roi{x}", "image": f"{sid}.pt", "roi": [x, 0, 1000, 1000], "conversations": [
            {"from": "human", "value": "<image>\n" + ROI_Q}, {"from": "gpt", "value": a}]})
    p.write_text(json.dumps(recs))


def test_roi_field_is_read_and_bad_ones_name_the_record(tmp_path: Path) -> None:
    p = tmp_path / "train.json"
    rec = {"id": "a", "image": "s0.svs", "roi": [10, 20, 30, 40],
           "conversations": [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}]}
    p.write_text(json.dumps([rec]))
    (got,) = load_records(p)
    assert got.metadata["roi"] == (10.0, 20.0, 30.0, 40.0)
    for bad, words in (([1, 2, 3], "must be [x, y, w, h]"), ([0, 0, 0, 5], "w, h > 0"), ("0,0,5,5", "must be"),
                       ([0, 0, float("nan"), 5], "finite"), ([True, 0, 5, 5], "must be")):
        p.write_text(json.dumps([{**rec, "id": "r7", "roi": bad}]))  # nan is written as NaN, which json reads
        with pytest.raises(RecordError) as e:
            load_records(p)
        msg = str(e.value)
        assert str(p) in msg and "id=r7" in msg and words in msg and "\n" not in msg, msg


def test_roi_samples_come_last_unpermuted_and_stage0_leaves_them_out(tmp_path: Path) -> None:
    from hwsi.train.data import load_train_text, store_ids
    from hwsi.train.stage_lm import lm_samples

    job = make_job(tmp_path)
    _add_roi_records(job)
    cfg = tiny_config()
    cfg.data.option_permutations, cfg.data.closed_text_answers = 3, True
    text = load_train_text(job, cfg.data, store_ids(job, cfg.data))
    roi = [s for s in text.samples if s.roi is not None]
    assert [s.visual_key for s in roi] == ["s00@0,0,1000,1000", "s00@1000,0,1000,1000", "s01@2000,0,1000,1000"]
    samples = lm_samples(3, cfg, text)
    tail = samples[-3:]
    assert [s.roi for s in tail] == [s.roi for s in roi] and all(s.roi is None for s in samples[:-3])
    assert [s.messages[-1]["content"] for s in tail] == ["regular", "crowded", "crowded"]  # option text answers
    cfg.data.roi_option_permutations = 2
    assert sum(s.roi is not None for s in lm_samples(3, cfg, text)) == 9
    cfg.data.roi_records = False
    assert all(s.roi is None for s in lm_samples(3, cfg, text))


def test_stage3_trains_roi_samples_on_the_rois_tokens(tmp_path: Path) -> None:
    """Stages 0-3 run with ROI records; an ROI sample's prefix is the ROI's (fewer patch tokens, one z_r), so its
    loss differs from the same conversation about the whole slide."""
    from hwsi.train.data import ChatSample
    from hwsi.train.roi_samples import VisualInputs
    from hwsi.train.stage_common import slide_cache
    from hwsi.train.stage_lm import _lm_step, stage_model
    from hwsi.train.stages import run_stage

    job = make_job(tmp_path)
    _add_roi_records(job)
    out = tmp_path / "run"
    cfg = tiny_config(stage3=3)
    for s in range(4):
        r = run_stage(s, cfg, job, out, progress=False)
        assert r.finished and all(np.isfinite(r.losses)), (s, r.losses)
    cache, _ = slide_cache(cfg, job, out)
    inputs = VisualInputs(cache)
    msgs = [{"role": "user", "content": "<image>\n" + ROI_Q}, {"role": "assistant", "content": "crowded"}]
    whole, part = ChatSample("s00", msgs), ChatSample("s00", msgs, roi=(1000.0, 0.0, 1000.0, 1000.0))
    x_whole, m_whole = inputs.get(whole)
    x_roi, m_roi = inputs.get(part)
    assert m_whole is None and m_roi.tolist().count(True) == 1
    assert int((x_roi.selected >= 0).sum()) < int((x_whole.selected >= 0).sum())
    mask = inputs.region_token_mask([whole, part], 3)
    assert mask[0].all() and mask[1].tolist().count(True) == 1
    model, cfg3 = stage_model(3, cfg, out)
    model.eval()
    step = _lm_step(cache, torch.device("cpu"), 8, model.hierarchy)
    with torch.no_grad():
        a, b = step(model, [whole])[0], step(model, [part])[0]
        both = step(model, [whole, part])[0]
    assert torch.isfinite(both) and abs(float(a) - float(b)) > 1e-6
