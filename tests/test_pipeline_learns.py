"""Evidence that the tiny CPU pipeline LEARNS, on the test preset built once by ``test_pipeline``.

Held out = the val and test splits pooled (neither trains any stage). Targets:
(1) stages 0–3 all finished;
(2) the stage-3 model's closed-VQA accuracy >= chance + 0.3 and >= 0.25 above the same model answering with
    another slide's visual tokens (a derangement over the held-out slides); chance = mean of 1/len(options);
    the slide-scale Extent questions (extent, count of lesional regions) >= shuffled + 0.15;
(3) the held-out stage-2 LM loss (reports and captions) with the true visual tokens < with the shuffled ones.
"""

from __future__ import annotations

import copy

import pytest

from hwsi.train.data import ChatSample, permute_options

N_MIN_CLOSED = 500  # 104 held-out slides (80 extra test slides), every fact asked closed


def heldout_evidence(pipe) -> dict:
    import torch

    from hwsi.eval.model_outputs import SlideInputCache, derangement, generate_answers
    from hwsi.eval.tasks import EvalConfig, load_eval_data
    from hwsi.eval.vqa import vqa_accuracy
    from hwsi.model.inputs import collate_slides
    from hwsi.train.data import load_train_text, store_ids
    from hwsi.train.inference import load_trained_model, run_config
    from hwsi.train.stage_common import PROJECTORS_FILE, load_safetensors
    from hwsi.train.stage_lm import build_model, report_samples

    p = pipe.paths
    datas = [load_eval_data(p.cohort, p.job, split=s) for s in ("val", "test")]
    merged = copy.copy(datas[0])
    merged.slides = {**datas[0].slides, **datas[1].slides}
    closed = [it for d in datas for it in d.items if it.options]
    ids = sorted({it.slide_id for it in closed})
    perm = derangement(ids, 0)
    model = load_trained_model(p.runs)
    slides = SlideInputCache(model, merged, EvalConfig())
    res: dict = {"n_slides": len(ids), "chance": sum(1 / len(it.options) for it in closed) / len(closed)}
    for name, vis in (("closed_acc", [it.slide_id for it in closed]), ("shuffled_acc", [perm[it.slide_id] for it in closed])):
        acc = vqa_accuracy(generate_answers(model, slides, closed, vis, 24, 8), closed)
        res[name], res["n_closed"] = acc["accuracy"], acc["n"]
        res[name + "_by_category"] = {k: round(v["accuracy"], 3) for k, v in acc["by_category"].items()}

    cfg = run_config(p.runs)
    m2, _ = build_model(cfg, p.runs, 2)  # stage-2 model: stage-0 LLM, stage-1 hierarchy, stage-2 projectors
    m2.projectors.load_state_dict(load_safetensors(p.runs / "stage2" / "final" / PROJECTORS_FILE))
    m2.eval()
    slides2 = SlideInputCache(m2, merged, EvalConfig())
    losses: dict[str, list[float]] = {"true": [], "shuffled": []}
    for split in ("val", "test"):
        data = copy.deepcopy(cfg.data)
        data.records = str(p.cohort / "text" / f"{split}.jsonl")
        text = load_train_text(p.job, data, store_ids(p.job, data))
        for s in report_samples(text):
            for key, sid in (("true", s.slide_id), ("shuffled", perm[s.slide_id])):
                with torch.no_grad():
                    losses[key].append(float(m2(collate_slides([slides2.get(sid)]), [s.messages]).loss))
    res["n_stage2_items"] = len(losses["true"])
    res["stage2_loss_true"] = sum(losses["true"]) / len(losses["true"])
    res["stage2_loss_shuffled"] = sum(losses["shuffled"]) / len(losses["shuffled"])
    return res


def test_pipeline_learns(test_pipeline) -> None:
    """Targets on the test preset (80 slides + 80 extra test slides; the fixture is built once, ~15 min cold on 2
    cores). With the committed config the pipeline is deterministic; measured (`pytest -s
    tests/test_pipeline_learns.py`), seed 0, stage-1 reading v2 + conv region stem + region identity, stage 1 for 60
    epochs, stage 3 with report_repeats 3: closed accuracy 0.951 / shuffled 0.355 / chance 0.374 on 961 held-out
    questions of 104 slides (Extent 0.963 / 0.270, Location 0.273 / 0.136); stage-2 loss 0.215 true < 0.339 shuffled
    (report records once: 0.955 / 0.356, Location 0.341 / 0.114; stage 1 at 20 epochs: 0.949 / 0.362,
    Extent 0.940 / 0.270; 0.223 < 0.342). Reading v1 (before): 0.604 / 0.415 / 0.378 on
    159 questions. Earlier gains: SPF candidates with >= 50 % tissue and SynthPath's vocabulary, 56 training
    slides instead of 28."""
    pipe = test_pipeline
    train = pipe.state["steps"]["train"]
    for stage in (0, 1, 2, 3):  # (1)
        assert (pipe.paths.runs / f"stage{stage}" / "result.json").is_file(), f"stage {stage} did not finish"
    r = heldout_evidence(pipe)
    print("\npipeline step seconds:", pipe.step_seconds())
    print("train:", {k: {m: v.get(m) for m in ("steps", "seconds", "final_loss")} for k, v in train.items()
                     if isinstance(v, dict)})
    print("held-out evidence (val+test):", r)
    assert r["n_closed"] >= N_MIN_CLOSED
    assert r["closed_acc"] >= r["chance"] + 0.3, r  # (2)
    assert r["closed_acc"] >= r["shuffled_acc"] + 0.25, r
    ext, ext_shuffled = r["closed_acc_by_category"]["Extent"], r["shuffled_acc_by_category"]["Extent"]
    assert ext >= ext_shuffled + 0.15, r
    assert r["stage2_loss_true"] < r["stage2_loss_shuffled"], r  # (3)


def _closed(q: str, a: str) -> ChatSample:
    return ChatSample("s", [{"role": "user", "content": q}, {"role": "assistant", "content": a}])


def test_permute_options_moves_the_letter_with_the_option() -> None:
    s = _closed("<image>\nWhat grade?\nA) high grade\nB) low grade\nC) not applicable", "B) low grade")
    out = permute_options([s], 6, seed=1)
    assert out[0] is s and len(out) == 7
    for x in out:
        q, a = x.messages[0]["content"], x.messages[1]["content"]
        assert q.startswith("<image>\nWhat grade?\n")
        letter = a[0]
        assert f"\n{letter}) low grade" in q and a == f"{letter}) low grade"
        assert sorted(q.split("\n")[2:]) == sorted(f"{c}) {o}" for c, o in zip("ABC", sorted(
            ["high grade", "low grade", "not applicable"], key=lambda o: q.index(") " + o))))
    assert len({x.messages[0]["content"] for x in out}) > 1


def test_permute_options_text_answers_and_open_records() -> None:
    closed = _closed("<image>\nGlands?\nA) yes\nB) no", "B) no")
    open_ = _closed("<image>\nDescribe the slide.", "A) benign looking tissue.")
    out = permute_options([closed, open_], 2, seed=0, text_answers=True)
    assert len(out) == 4
    assert out[3] is open_  # each closed record, then its copies
    assert all(x.messages[1]["content"] == "no" for x in out[:3])
    assert closed.messages[1]["content"] == "B) no"  # inputs untouched
    assert permute_options([closed], 0) == [closed]


@pytest.mark.parametrize("answer", ["C) no", "B) maybe", "no"])
def test_permute_options_leaves_mismatched_answers(answer: str) -> None:
    s = _closed("<image>\nGlands?\nA) yes\nB) no", answer)
    assert permute_options([s], 3, text_answers=True) == [s]


def test_report_repeats_add_report_records_to_stage3_only() -> None:
    from hwsi.train.config import TrainConfig
    from hwsi.train.data import TrainText
    from hwsi.train.stage_lm import lm_samples

    def chat(sid: str, q: str, a: str) -> ChatSample:
        return ChatSample(sid, [{"role": "user", "content": q}, {"role": "assistant", "content": a}])

    report = "Glands are crowded. Nuclei are atypical. Diagnosis: adenocarcinoma, low grade, focal."
    samples = [chat("s1", "Write a report.", report), chat("s1", "Give a caption.", "Crowded glands."),
               chat("s1", "Are glands formed?", "Yes."), chat("s1", "Describe the slide.", report)]
    text = TrainText(samples=samples, reports={"s1": report}, captions={"s1": "Crowded glands."})
    cfg = TrainConfig()
    cfg.data.stage2_records = "all"
    cfg.data.report_repeats = 3
    got3, got2 = lm_samples(3, cfg, text), lm_samples(2, cfg, text)
    answers3 = [s.messages[-1]["content"] for s in got3]
    assert len(got2) == 4 and answers3.count(report) == 2 * 3 and answers3.count("Crowded glands.") == 1
    cfg.data.report_repeats = 1
    assert len(lm_samples(3, cfg, text)) == 4
