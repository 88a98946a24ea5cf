"""hwsi.model.generate: batched greedy answers (shared visual prefix, left padding) token-for-token equal to one at
a time, on a tiny random model and on the cached test pipeline's trained model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hwsi.model.chat import ChatSession
from hwsi.model.generate import greedy_answers, greedy_token_ids, prompt_rows
from hwsi.model.inputs import collate_slides
from test_model import random_slide
from test_model_mllm import llm_dir, make_model  # noqa: F401  (the module's tiny-LLM fixture)

# mixed lengths: short / long questions, several per slide, one with a system turn and one two-turn history
QUESTIONS = ["What is the grade?", "Any necrosis?", "Describe the tumour, the glands and the nuclei in detail please.",
             "Benign?", "Is gland formation present in several regions of the slide?"]


def _slides_and_convs():
    slides = [random_slide(r=r, k=4, seed=s) for s, r in ((0, 3), (1, 2), (2, 4))]
    convs, which = [], []
    for si in range(len(slides)):
        for q in QUESTIONS[si:] + QUESTIONS[: si]:
            convs.append(q)
            which.append(si)
    convs.append([{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "<image>\nGrade?"}])
    which.append(0)
    convs.append([{"role": "user", "content": "<image>\nWhat is the grade?"}, {"role": "assistant", "content": "High."},
                  {"role": "user", "content": "Any necrosis?"}])
    which.append(2)
    return slides, convs, which


def _loud(model):
    """The tiny model with its LLM weights redrawn N(0, 0.2²) (norms kept): at the default init (std 0.02) every
    prompt decodes to the same repeated token, which would compare nothing."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.llm.named_parameters():
            if "norm" not in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model


def _visual(model, slides, which):
    with torch.no_grad():
        vis = [model.visual_tokens(collate_slides([s]))[0] for s in slides]
    return [vis[i] for i in which]


def test_batched_equals_one_at_a_time_on_tiny_random_model(llm_dir: Path) -> None:  # noqa: F811
    model = _loud(make_model(llm_dir))
    slides, convs, which = _slides_and_convs()
    vis = _visual(model, slides, which)
    rows = prompt_rows(model, vis, convs)
    assert len({r.key for r in rows}) == 4  # per (slide, text before <image>): 3 slides + the system-prompt row
    assert len({r.suffix.shape[0] for r in rows}) >= 4  # the batch really mixes lengths
    one = greedy_token_ids(model, vis, convs, max_new_tokens=12, batch_size=1)
    assert all(len(a) == 12 for a in one)  # random weights rarely emit EOS: every step is compared
    assert len({tuple(a) for a in one}) == len(convs)  # and every prompt gets its own answer
    for b in (2, 5, len(convs)):
        assert greedy_token_ids(model, vis, convs, max_new_tokens=12, batch_size=b) == one, f"batch_size {b}"
    # rows leaving the batch at different steps: a token the answers emit mid-way taken as EOS
    eos = one[0][4]
    cut = greedy_token_ids(model, vis, convs, max_new_tokens=12, batch_size=1, eos_token_id=eos)
    assert len({len(a) for a in cut}) > 1 and all(eos not in a for a in cut)
    assert greedy_token_ids(model, vis, convs, max_new_tokens=12, batch_size=len(convs), eos_token_id=eos) == cut
    # the reference is the unbatched model itself: HF generate on the full spliced sequence, one question per call
    for i in (0, 3, len(convs) - 1):
        hf = model.generate(collate_slides([slides[which[i]]]), [convs[i]], max_new_tokens=12)[0]
        assert hf == model.tokenizer.decode(one[i], skip_special_tokens=True).strip()


def test_ask_each_equals_fresh_chat_answers(llm_dir: Path) -> None:  # noqa: F811
    model = _loud(make_model(llm_dir))
    chat = ChatSession(model, random_slide(r=3, k=4), max_new_tokens=8)
    first = chat.ask("What is the grade?")
    answers = chat.ask_each(QUESTIONS, batch_size=4)
    assert len(chat.messages) == 2  # the conversation is untouched
    fresh = []
    for q in QUESTIONS:
        chat.reset()
        fresh.append(chat.ask(q))
    assert answers == fresh and answers[0] == first


def test_batched_equals_one_at_a_time_on_trained_pipeline_model(test_pipeline) -> None:
    """The test pipeline's trained run (tests/conftest.py; read only)."""
    paths = test_pipeline.paths
    from hwsi.data import strip_image_token
    from hwsi.eval.eval_config import EvalConfig
    from hwsi.eval.eval_data import load_eval_data
    from hwsi.eval.generation_tasks import items_of_task
    from hwsi.eval.model_outputs import SlideInputCache, slide_visual_tokens
    from hwsi.train.inference import load_trained_model

    model = load_trained_model(paths.runs)
    data = load_eval_data(paths.cohort, paths.job, split="test")
    vqa = items_of_task(data.items, "vqa")
    first = list(dict.fromkeys(it.slide_id for it in vqa))[:3]
    items = [it for it in vqa if it.slide_id in first][:30] + [it for it in vqa if it.slide_id not in first][::97]
    slides = SlideInputCache(model, data, EvalConfig(meteor=False))
    vis_of = slide_visual_tokens(model, slides, [it.slide_id for it in items])
    vis = [vis_of[it.slide_id] for it in items]
    qs = [strip_image_token(it.question) for it in items]
    one = greedy_answers(model, vis, qs, max_new_tokens=24, batch_size=1)
    assert greedy_answers(model, vis, qs, max_new_tokens=24, batch_size=len(qs)) == one
    assert sum(bool(a) for a in one) == len(one)
    # the path eval used before (HF generate, 4 left-padded questions per call) gives the same texts
    for s in range(0, 12, 4):
        x = model.build_inputs(vis[s: s + 4], [[{"role": "user", "content": q}] for q in qs[s: s + 4]],
                               add_generation_prompt=True, padding_side="left")
        out = model.llm.generate(inputs_embeds=x.inputs_embeds, attention_mask=x.attention_mask, do_sample=False,
                                 max_new_tokens=24, pad_token_id=model.tokenizer.pad_token_id,
                                 eos_token_id=model.tokenizer.eos_token_id)
        assert [t.strip() for t in model.tokenizer.batch_decode(out, skip_special_tokens=True)] == one[s: s + 4]


def test_ask_each_cli_equals_one_question_per_call(test_pipeline, capsys: pytest.CaptureFixture[str]) -> None:
    """``hwsi ask STORE --run RUN -q A -q B -q C --each`` prints, per question, what a one-question call prints."""
    paths = test_pipeline.paths
    from hwsi.cli import main

    store = str(sorted((paths.job / "stores").glob("*.h5"))[0])
    base = ["ask", store, "--run", str(paths.runs), "--top", "0", "--max-new-tokens", "24"]
    qs = ["What is the diagnosis?", "Are glands formed?", "Is there necrosis in the tissue?"]
    capsys.readouterr()
    assert main(base + [a for q in qs for a in ("-q", q)] + ["--each", "--batch-size", "3"]) == 0
    each = capsys.readouterr().out.strip()
    singles = []
    for q in qs:
        assert main(base + ["-q", q]) == 0
        singles.append(capsys.readouterr().out.strip())
    assert all(singles) and each == "\n".join(f"Q: {q}\n{a}" for q, a in zip(qs, singles))


def test_sliding_window_llm_is_refused_with_one_line(llm_dir: Path) -> None:  # noqa: F811
    from hwsi.errors import ConfigError

    model = make_model(llm_dir)
    model.llm.config.sliding_window, model.llm.config.layer_types = 8, ["sliding_attention"] * 2
    slide = random_slide(r=2, k=4)
    vis = _visual(model, [slide], [0])
    with pytest.raises(ConfigError, match="sliding-window attention layers; batched generation"):
        greedy_answers(model, vis, ["Grade?"], max_new_tokens=2)
