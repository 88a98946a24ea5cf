"""hwsi.train: exact resumption, what each stage trains, answer-only labels, the CLI (train + ask)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hwsi.config import save_config
from hwsi.model.inputs import collate_slides
from hwsi.train.stages import run_stage
from test_train import make_job, run, tiny_config  # noqa: F401  (run: the shared module fixture)

REPO = Path(__file__).resolve().parents[1]


def _losses(path: Path) -> list[str]:
    """The loss column of a metrics.csv as written (exact decimal repr of each float)."""
    lines = path.read_text().splitlines()
    col = lines[0].split(",").index("loss")
    return [ln.split(",")[col] for ln in lines[1:]]


def test_stage1_stopped_and_resumed_reproduces_the_straight_run_exactly(tmp_path: Path) -> None:
    """4 steps straight vs 2 + resume 2 with fresh objects; the last text-encoder block trains (dropout: RNG)."""
    job = make_job(tmp_path, n=4, missing=0)
    cfg = tiny_config(stage1=4)
    cfg.stage1.batch_size = cfg.stage1.micro_batch_size = 1
    cfg.stage1.text_finetune_layers = 1
    cfg.stage1.checkpoint_every = 1
    straight = run_stage(1, cfg, job, tmp_path / "a", progress=False)
    first = run_stage(1, cfg, job, tmp_path / "b", stop_after=2, progress=False)
    assert not first.finished and len(first.losses) == 2 and first.output is None
    resumed = run_stage(1, cfg, job, tmp_path / "b", resume=True, progress=False)
    assert resumed.finished and straight.finished
    a, b = _losses(tmp_path / "a" / "stage1" / "metrics.csv"), _losses(tmp_path / "b" / "stage1" / "metrics.csv")
    assert len(a) == 4 and a == b  # bit for bit (repr of float64 round-trips)
    assert len(set(a)) > 1
    from safetensors.torch import load_file

    wa = load_file(str(tmp_path / "a" / "stage1" / "final" / "alignment.safetensors"))
    wb = load_file(str(tmp_path / "b" / "stage1" / "final" / "alignment.safetensors"))
    assert wa.keys() == wb.keys() and any(k.startswith("text.") for k in wa)
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def test_stage3_resume_in_a_fresh_process_via_cli_is_exact(run, tmp_path: Path) -> None:
    """Gradient accumulation (batch 4 = 2 × 2) and LoRA dropout; the resumed half runs in a new process."""
    cfg, job, out = run
    cfg = tiny_config(stage3=4)
    cfg.stage3.batch_size, cfg.stage3.micro_batch_size, cfg.stage3.lora_dropout = 4, 2, 0.1
    cfg.stage3.checkpoint_every = 1
    runs = []
    for name in ("a", "b"):
        dst = tmp_path / name
        dst.mkdir()
        for part in ("config.yaml", "cache", "stage0", "stage1", "stage2"):
            src = out / part
            (shutil.copytree if src.is_dir() else shutil.copy)(src, dst / part)
        runs.append(dst)
    cfg_path = tmp_path / "cfg.yaml"
    save_config(cfg, cfg_path)
    straight = run_stage(3, cfg, job, runs[0], progress=False)
    assert straight.finished and len(straight.losses) == 4
    half = run_stage(3, cfg, job, runs[1], stop_after=2, progress=False)
    assert not half.finished
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    cmd = [sys.executable, "-m", "hwsi.cli", "train", "--stage", "3", "--config", str(cfg_path), "--job", str(job),
           "--out", str(runs[1]), "--resume", "--no-progress"]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "stage 3 finished: step 4/4" in p.stdout
    assert _losses(runs[0] / "stage3" / "metrics.csv") == _losses(runs[1] / "stage3" / "metrics.csv")


def _one_step(model, job: Path, cfg) -> None:
    from hwsi.train.inference import slide_inputs_for

    x = slide_inputs_for(job / "stores" / "s00.h5", cfg=cfg)
    conv = [{"from": "human", "value": "<image>\nWhat is the grade?"}, {"from": "gpt", "value": "benign."}]
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    model(collate_slides([x]), [conv]).loss.backward()
    opt.step()


def test_stage2_trains_only_projectors_and_stage3_only_lora_and_projectors(run) -> None:
    from hwsi.train.stage_lm import stage_model

    cfg, job, out = run
    for stage in (2, 3):
        model, scfg = stage_model(stage, cfg, out)
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        if stage == 2:
            assert trainable and all(n.startswith("projectors.") for n in trainable)
        else:
            assert any("lora_" in n for n in trainable)
            assert all(n.startswith("projectors.") or "lora_" in n for n in trainable)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        _one_step(model, job, scfg)
        after = dict(model.named_parameters())
        for n, p in before.items():
            changed = not torch.equal(p, after[n])
            if n in trainable and ("lora_B" in n or n.startswith("projectors.mlps")):
                assert changed, f"stage {stage}: trainable {n} did not change"
            if n not in trainable:
                assert not changed, f"stage {stage}: frozen {n} changed"


def test_stage0_labels_keep_only_the_answers_of_every_turn(run) -> None:
    from hwsi.model.llm import load_llm
    from hwsi.train.stage0 import findings_model

    cfg, job, out = run
    llm, tok = load_llm(out / "stage0" / "llm")
    m = findings_model(llm, tok)
    conv = [{"role": "user", "content": "<image>\nWhat is the grade?"}, {"role": "assistant", "content": "high."},
            {"role": "user", "content": "Glands?"}, {"role": "assistant", "content": "yes."}]
    findings = "diagnosis: carcinoma; grade: high"
    with torch.no_grad():
        x = m.build_inputs([findings], [conv])
    labels = x.labels[0][x.labels[0] != -100]
    assert tok.decode(labels) == "high.<|im_end|>\nyes.<|im_end|>\n"
    ids = tok(findings, add_special_tokens=False).input_ids
    emb = llm.get_input_embeddings().weight[ids]
    start = len(tok("<|im_start|>user\n", add_special_tokens=False).input_ids)
    torch.testing.assert_close(x.inputs_embeds[0, start:start + len(ids)], emb)
    assert (x.labels[0, : start + len(ids)] == -100).all()


def test_records_without_store_are_reported_not_fatal(tmp_path: Path) -> None:
    from hwsi.train.data import load_train_text, store_ids

    job = make_job(tmp_path, n=3, missing=2)
    cfg = tiny_config()
    text = load_train_text(job, cfg.data, store_ids(job, cfg.data))
    assert text.match is not None and text.match.missing_slide_ids == ["s03", "s04"]
    assert text.slide_ids == ["s00", "s01", "s02"] and set(text.reports) == set(text.slide_ids)


def test_cli_ask_streams_answers_and_evidence(run) -> None:
    cfg, job, out = run
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    cmd = [sys.executable, "-m", "hwsi.cli", "ask", str(job / "stores" / "s02.h5"), "--run", str(out),
           "-q", "What is the grade?", "-q", "And the diagnosis?", "--max-new-tokens", "5", "--top", "2"]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.count("Q: ") == 2 and p.stdout.count("evidence") == 2
    assert "at level-0 (" in p.stdout and "visual tokens" in p.stderr
