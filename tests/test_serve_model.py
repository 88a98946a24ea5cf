"""The real chat adapter (hwsi.serve.assistant.ModelAssistant) over hwsi.model's cached ChatSession.

Uses a tiny MLLM-HWSI (tiny Qwen2 from build_tiny_llm + the tiny hierarchy) on the synthetic job's store; its
weights are untrained, so the test checks the plumbing (streaming, greedy determinism, multi-turn, evidence), not
the answers' content.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from hwsi.serve.app import create_app
from hwsi.serve.assistant import RELEVANCE_SIGNAL, ModelAssistant, StoreEncoders, text_patch_relevance
from hwsi.store import SlideStore
from synthetic_store import hash_text_encode, make_synthetic_job, tiny_model_assistant

SID = "synth-a"

tiny_assistant = tiny_model_assistant  # the e2e test imports it from here


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, ModelAssistant]:
    job = tmp_path_factory.mktemp("modeljob")
    make_synthetic_job(job, SID)
    return job, tiny_assistant(job, tmp_path_factory.mktemp("llm"))


def test_store_encoders_from_extract_settings(setup: tuple[Path, ModelAssistant]) -> None:
    job, _ = setup
    enc = StoreEncoders.read(job / "stores" / f"{SID}.h5")
    assert (enc.patch_encoder, enc.region_input, enc.text_encoder) == ("synthetic", "synthetic", "hash")


def test_relevance_is_cosine_over_tissue_patches(setup: tuple[Path, ModelAssistant]) -> None:
    job, _ = setup
    store = job / "stores" / f"{SID}.h5"
    t = hash_text_encode("hash", ["gland formation"])[0]
    heat = text_patch_relevance(store, "synthetic", t, chunk=3)  # chunking must not change the result
    with SlideStore(store) as s:
        x, tissue = s.patch_features("synthetic"), s.patch_tissue()
    cos = (x @ t) / (np.linalg.norm(x, axis=-1) * np.linalg.norm(t) + 1e-12)
    v = cos[tissue]
    np.testing.assert_allclose(heat[tissue], (v - v.min()) / (v.max() - v.min()), atol=1e-5)
    assert np.isnan(heat[~tissue]).all()
    with pytest.raises(ValueError, match="one image"):
        text_patch_relevance(store, "synthetic", np.ones(5))


def test_model_chat_streams_greedy_multi_turn(setup: tuple[Path, ModelAssistant]) -> None:
    job, assistant = setup
    s1 = assistant.start(SID)
    pieces = list(s1.ask("What is the diagnosis?", 12))
    assert len(pieces) >= 2 and "".join(pieces)
    a2 = "".join(s1.ask("Any necrosis?", 12))
    assert [m["role"] for m in s1.chat.messages] == ["user", "assistant"] * 2
    # greedy: a fresh session gives the same first answer, token for token
    assert "".join(assistant.start(SID).ask("What is the diagnosis?", 12)) == "".join(pieces)
    ev = s1.evidence("Any necrosis?", a2)
    assert ev.signal == RELEVANCE_SIGNAL and ev.heatmap.shape[1] == 16
    kinds = [e.kind for e in ev.items]
    assert kinds == ["region"] * 3 + ["patch"] * 5
    top = ev.items[3]
    assert top.score == pytest.approx(1.0) and ev.heatmap[top.region, top.patch] == pytest.approx(1.0)


def test_model_chat_over_http(setup: tuple[Path, ModelAssistant]) -> None:
    job, assistant = setup
    with TestClient(create_app(job, assistant)) as c:
        sid = c.post("/api/chat", json={"slide_id": SID}).json()["session_id"]
        lines = c.post(f"/api/chat/{sid}/ask", json={"question": "Where is the tumour?", "max_new_tokens": 10}).text
        ev = [json.loads(x) for x in lines.splitlines() if x]
        assert [e["type"] for e in ev][-2:] == ["evidence", "done"] and sum(e["type"] == "token" for e in ev) >= 2
        assert ev[-1]["answer"] == "".join(e["text"] for e in ev if e["type"] == "token")
        hm = c.get(f"/api/chat/{sid}/heatmap").json()
        assert hm["signal"] == RELEVANCE_SIGNAL and len(hm["scores"][0]) == 16


def test_model_load_names_a_bad_run_folder(setup: tuple[Path, ModelAssistant], tmp_path: Path) -> None:
    from hwsi.cli import main
    from hwsi.errors import HwsiError

    job, _ = setup
    with pytest.raises(HwsiError, match="config.yaml"):
        ModelAssistant.load(tmp_path, job)
    # `hwsi serve --model` with a folder that is not a run: one clear error line, exit code 2, no server
    assert main(["serve", str(job), "--model", str(tmp_path), "--port", "0"]) == 2


@pytest.mark.slow
def test_model_assistant_loads_a_train_run(tmp_path: Path) -> None:
    """`hwsi serve --model RUN` path: a run folder written by hwsi.train (a few steps per stage) loads, answers and
    gives evidence with the store's real text encoder (MiniLM, 384-d like the stores' patch features)."""
    from hwsi.store import update_store
    from hwsi.train.stages import run_stage
    from test_train import make_job, tiny_config

    job = make_job(tmp_path)
    out, cfg = tmp_path / "run", tiny_config()
    for s in range(4):
        run_stage(s, cfg, job, out, progress=False)
    for p in (job / "stores").glob("*.h5"):  # the extract settings serve reads: MiniLM pairs with the features
        with update_store(p) as w:
            w.set_json_attr("extract", {"patch_encoder": "hwsi_small_patch", "text_encoder": "minilm"})
    assistant = ModelAssistant.load(out, job)
    chat = assistant.start("s00")
    pieces = list(chat.ask("What is the grade?", 6))
    assert len(pieces) >= 1
    ev = chat.evidence("What is the grade?", "".join(pieces))
    assert ev.heatmap.shape == (3, 4) and [e.kind for e in ev.items][:3] == ["region"] * 3
