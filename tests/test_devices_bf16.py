"""bf16 on the CPU stays close to float32 (docs/devices.md, "Tolerances"): every registered encoder (image and
text, the tiny variants the encoder tests build) and a short greedy generation of the tiny LLM, alone and inside a
trained MLLM-HWSI run loaded with ``--dtype bfloat16``.

Tolerances, and why: bfloat16 keeps 8 bits of mantissa (relative rounding 2^-8 ≈ 0.4 %), so each layer adds an
error of that order to every activation; through the 2–4 blocks of the tiny models the embedding directions stay
put — cosine(bf16, float32) >= 0.99 per embedding (measured >= 0.9999 here; an encoder that ran in the wrong dtype
or dropped a cast scores far lower). Logits are compared as max |Δ| / std(logits) <= 0.1, and greedy decoding
must pick the same tokens wherever the float32 top-1 margin exceeds twice the largest logit error seen (below that
margin a flip is rounding, not a bug).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from hwsi.devices import resolve_placement
from hwsi.features.encoders import create_encoder, create_text_encoder, encoder_entry, list_encoders, list_text_encoders
from hwsi.features.frozen_models import place_module
from hwsi.model.chat import ChatSession

COSINE_MIN = 0.99
LOGIT_REL_MAX = 0.1
BF16 = resolve_placement("cpu", "bfloat16")


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.mark.parametrize("name", list_encoders())
def test_every_image_encoder_in_bf16_matches_float32(name: str) -> None:
    tiny = encoder_entry(name).tiny
    images = np.random.default_rng(0).integers(0, 256, size=(6, 80, 80, 3), dtype=np.uint8)
    ref = create_encoder(name, **tiny).encode(images)
    enc = place_module(create_encoder(name, **tiny), BF16)
    assert enc.dtype is torch.bfloat16 and enc.preprocess(images[:1]).dtype is torch.bfloat16
    got = enc.encode(images, batch_size=4)
    assert got.dtype == np.float32 and got.shape == ref.shape  # stored as float32 whatever ran
    assert not np.array_equal(got, ref)  # it really ran in bf16
    cos = _cosines(got, ref)
    assert cos.min() >= COSINE_MIN, (name, cos)


def _text_tokens(enc, texts: list[str]) -> dict[str, torch.Tensor]:
    """Token ids for ``enc``: its own tokenizer, or — for conch_text, whose tokenizer file is CONCH's and not
    bundled — random ids of the shape its ``tokenize`` returns ((N, context_length - 1), <start_of_text> first)."""
    if hasattr(enc.config, "tokenizer") and not enc.config.tokenizer:
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(3, enc.config.vocab_size, (len(texts), enc.config.context_length - 1), generator=g)
        ids[:, 0] = 1
        return {"input_ids": ids}
    return enc.tokenize(texts)


@pytest.mark.parametrize("name", list_text_encoders())
def test_every_text_encoder_in_bf16_matches_float32(name: str) -> None:
    tiny = encoder_entry(name, "text").tiny
    texts = ["invasive ductal carcinoma", "benign stroma with lymphocytes", "high-grade nuclei", "necrosis"]
    ref_enc = create_text_encoder(name, **tiny)
    tokens = _text_tokens(ref_enc, texts)
    with torch.no_grad():
        ref = ref_enc.forward_tokens(tokens).float().numpy()
        enc = place_module(ref_enc, BF16)
        assert next(enc.parameters()).dtype is torch.bfloat16
        out = enc.forward_tokens(tokens)
    assert out.dtype is torch.bfloat16
    cos = _cosines(out.float().numpy(), ref)
    assert cos.min() >= COSINE_MIN, (name, cos)


def _greedy_steps(model, ids: torch.Tensor, steps: int) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy decoding by hand: the tokens and the float32 logits of each step."""
    out, logits = [], []
    with torch.no_grad():
        for _ in range(steps):
            lg = model(ids).logits[0, -1].float()
            nxt = int(lg.argmax())
            out.append(nxt)
            logits.append(lg)
            ids = torch.cat([ids, torch.tensor([[nxt]])], 1)
    return out, logits


def _check_greedy(ref_tokens: list[int], ref_logits: list[torch.Tensor], bf16_logits: list[torch.Tensor]) -> None:
    err = max(float((a - b).abs().max()) for a, b in zip(ref_logits, bf16_logits))
    scale = float(torch.stack(ref_logits).std())
    assert err / scale <= LOGIT_REL_MAX, (err, scale)
    for t, a, b in zip(ref_tokens, ref_logits, bf16_logits):
        top2 = a.topk(2).values
        if float(top2[0] - top2[1]) > 2 * err:
            assert int(b.argmax()) == t


def test_tiny_llm_greedy_generation_in_bf16(tmp_path: Path) -> None:
    from test_llm import CORPUS

    from hwsi.model.llm import build_tiny_llm, load_llm

    folder = build_tiny_llm(tmp_path / "llm", CORPUS, vocab_size=300, hidden=64, layers=2, heads=4, kv_heads=2)
    ref_model, tok = load_llm(folder)
    model, _ = load_llm(folder, dtype=BF16.torch_dtype, device=BF16.device)
    assert model.get_input_embeddings().weight.dtype is torch.bfloat16
    ids = tok("The slide shows invasive ductal carcinoma", return_tensors="pt").input_ids
    k = 8
    ref_tokens, ref_logits = _greedy_steps(ref_model.eval(), ids, k)
    # teacher-forced on the float32 path, so one rounding flip cannot derail the later comparisons
    with torch.no_grad():
        full = torch.cat([ids, torch.tensor([ref_tokens])], 1)
        lg = model.eval()(full).logits[0, ids.shape[1] - 1: -1].float()
    _check_greedy(ref_tokens, ref_logits, list(lg))
    # generate() itself runs in bf16 and returns k tokens
    gen = model.generate(ids, max_new_tokens=k, do_sample=False)
    assert gen.shape[1] - ids.shape[1] == k


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(job, run): tests/test_train.py's tiny job, stages 0-3 a step or two each."""
    from test_train import make_job, tiny_config

    from hwsi.train.stages import run_stage

    root = tmp_path_factory.mktemp("bf16run")
    job = make_job(root, n=4)
    run = root / "run"
    cfg = tiny_config(stage0=2, stage1=1, stage2=2, stage3=1)
    for s in range(4):
        assert run_stage(s, cfg, job, run, progress=False).finished
    return job, run


def test_a_trained_run_answers_in_bf16_close_to_float32(trained: tuple[Path, Path]) -> None:
    """`hwsi ask --dtype bfloat16`'s path: load_trained_model with a bf16 placement, ChatSession's greedy answer."""
    from hwsi.train.inference import load_trained_model, run_config, slide_inputs_for
    from hwsi.train.plan import visual_tokens

    job, run = trained
    inputs = slide_inputs_for(job / "stores" / "s00.h5", run)
    ref = load_trained_model(run)
    model = load_trained_model(run, placement=BF16)
    assert model.placement.record() == {"device": "cpu", "dtype": "bfloat16", "requested": "cpu"}
    assert model.llm.get_input_embeddings().weight.dtype is torch.bfloat16
    assert next(model.hierarchy.parameters()).dtype is torch.float32  # master weights of the small parts
    q = "What is the grade?"
    a, b = _RecordingChat(ref, inputs, max_new_tokens=6), _RecordingChat(model, inputs, max_new_tokens=6)
    ref_answer, answer = a.ask(q), b.ask(q)
    assert a.n_visual == b.n_visual == visual_tokens(run_config(run).model, inputs.n_regions)  # hwsi plan's count
    assert isinstance(answer, str) and isinstance(ref_answer, str)
    # logits of the first answer token (cached visual prefix + the question), within the stated tolerance
    _check_greedy([int(a.logits[1].argmax())], a.logits[1:2], b.logits[1:2])


class _RecordingChat(ChatSession):
    """ChatSession keeping a float32 copy of the logits of every forward (0: the visual prefix, 1: the question,
    then one per decoded token)."""

    def __init__(self, *args, **kwargs) -> None:
        self.logits: list[torch.Tensor] = []
        super().__init__(*args, **kwargs)

    def _forward(self, input_ids=None, inputs_embeds=None):
        lg = super()._forward(input_ids=input_ids, inputs_embeds=inputs_embeds)
        self.logits.append(lg.float())
        return lg


def test_ask_and_serve_say_where_the_model_runs(trained: tuple[Path, Path], capsys) -> None:
    from fastapi.testclient import TestClient

    from hwsi.cli import main
    from hwsi.serve.app import create_app
    from hwsi.serve.assistant import ModelAssistant

    job, run = trained
    assert main(["ask", str(job / "stores" / "s00.h5"), "--run", str(run), "-q", "What is the grade?",
                 "--max-new-tokens", "3", "--top", "0", "--dtype", "bfloat16"]) == 0
    assert "visual tokens (cached prefix), on cpu bfloat16" in capsys.readouterr().err
    assistant = ModelAssistant.load(run, job, device="cpu", dtype="bfloat16")
    client = TestClient(create_app(job, assistant))
    want = {"device": "cpu", "dtype": "bfloat16", "requested": "cpu"}
    assert client.get("/api/health").json()["placement"] == want
    assert client.post("/api/chat", json={"slide_id": "s00"}).json()["placement"] == want
