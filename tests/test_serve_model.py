"""The real chat adapter (hwsi.serve.assistant.ModelAssistant) over hwsi.model's cached ChatSession.

Uses a tiny MLLM-HWSI (tiny Qwen2 from build_tiny_llm + the tiny hierarchy) on the synthetic job's store; its
weights are untrained, so the test checks the plumbing (streaming, greedy determinism, multi-turn, evidence), not
the answers' content.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from hwsi.serve.app import create_app
from hwsi.serve.assistant import RELEVANCE_SIGNAL, ModelAssistant, StoreEncoders, text_patch_relevance
from hwsi.serve.synthetic import make_synthetic_job

SID = "synth-a"
CORPUS = [
    "The tumour shows high grade nuclei and gland formation.",
    "What is the diagnosis? Adenocarcinoma, moderately differentiated.",
    "Necrosis is present in several regions; lymphocytes infiltrate the stroma.",
] * 4


def hash_text_encode(encoder: str, texts: list[str], dim: int = 16) -> np.ndarray:
    """A deterministic bag-of-words text embedding (stand-in for the frozen text encoder in the patch space)."""
    out = np.zeros((len(texts), dim), np.float32)
    for i, t in enumerate(texts):
        for w in t.lower().split():
            h = int(hashlib.sha1(w.encode()).hexdigest(), 16)
            out[i, h % dim] += 1.0 if (h >> 8) % 2 else -1.0
    return out


QA = [("Where is the tumour and what grade is it?", "The tumour shows high grade nuclei and gland formation."),
      ("What is the diagnosis?", "Adenocarcinoma, moderately differentiated.")]


def _train(model, job: Path, steps: int) -> None:  # type: ignore[no-untyped-def]
    """A few LM steps on QA about the synthetic slide (through the model's own forward/loss) so it answers in words."""
    import torch

    from hwsi.model.inputs import collate_slides, load_slide_inputs

    cfg = model.cfg
    inputs = load_slide_inputs(job / "stores" / f"{SID}.h5", "synthetic", "synthetic", cfg.max_regions, cfg.k, cfg.max_cells)
    batch = collate_slides([inputs] * len(QA))
    convs = [[{"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": a}] for q, a in QA]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    model.train()
    for _ in range(steps):
        loss = model(batch, convs).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def tiny_assistant(job: Path, llm_root: Path, train_steps: int = 0) -> ModelAssistant:
    """ModelAssistant over a tiny MLLM-HWSI whose widths match the synthetic store (16/16/8); ``train_steps`` > 0
    trains it briefly on :data:`QA` (otherwise its weights are random)."""
    import torch

    from hwsi.model.hierarchy import HierarchyConfig
    from hwsi.model.llm import build_tiny_llm, load_llm
    from hwsi.model.mllm import MLLMConfig, MLLMHWSI
    from hwsi.model.projectors import ProjectorConfig

    llm_dir = build_tiny_llm(llm_root / "tiny", CORPUS, vocab_size=300, hidden=32, layers=2, heads=4, kv_heads=2)
    torch.manual_seed(0)
    llm, tok = load_llm(llm_dir)
    cfg = MLLMConfig(
        hierarchy=HierarchyConfig.tiny(patch_dim=16, region_in_dim=16, cell_dim=8),
        projector=ProjectorConfig(hidden=24, llm_dim=32),
        k=4,
        max_cells=32,
        max_regions=4,  # 45 visual tokens: keeps the fixture's training steps short
    )
    model = MLLMHWSI.from_config(cfg, llm, tok)
    if train_steps:
        _train(model, job, train_steps)
    name = f"tiny-mllm ({train_steps} steps)" if train_steps else "tiny-mllm (untrained)"
    return ModelAssistant(model, job, name=name, text_encode=hash_text_encode, max_new_tokens=24)


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
    import h5py

    job, _ = setup
    store = job / "stores" / f"{SID}.h5"
    t = hash_text_encode("hash", ["gland formation"])[0]
    heat = text_patch_relevance(store, "synthetic", t, chunk=3)  # chunking must not change the result
    with h5py.File(store, "r") as f:
        x, tissue = f["patches/synthetic"][:], f["patches/tissue"][:]
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
    import h5py

    from hwsi.store import StoreMeta, write_meta
    from hwsi.train.stages import run_stage
    from test_train import make_job, tiny_config

    job = make_job(tmp_path)
    out, cfg = tmp_path / "run", tiny_config()
    for s in range(4):
        run_stage(s, cfg, job, out, progress=False)
    for p in (job / "stores").glob("*.h5"):  # the training fixture's stores lack the file attributes serve reads
        with h5py.File(p, "a") as f:
            write_meta(f, StoreMeta(str(p), p.stem, 0.5, 0.5, 0.5, 1000, 500, 1000.0, 500.0, 3000, 1000,
                                    encoders={"hwsi_small_patch": 384}))
            f.attrs["extract"] = json.dumps({"patch_encoder": "hwsi_small_patch", "text_encoder": "minilm"})
    assistant = ModelAssistant.load(out, job)
    chat = assistant.start("s00")
    pieces = list(chat.ask("What is the grade?", 6))
    assert len(pieces) >= 1
    ev = chat.evidence("What is the grade?", "".join(pieces))
    assert ev.heatmap.shape == (3, 4) and [e.kind for e in ev.items][:3] == ["region"] * 3
