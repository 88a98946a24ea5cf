"""hwsi.train: every stage on a tiny synthetic job (stores from hwsi.store's writer + WSI-Bench records + facts), CPU, seconds.

``make_job`` / ``tiny_config`` are imported by the other test_train*.py files.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from hwsi.config import shipped_file
from hwsi.train.config import TrainConfig, load_train_config
from store_builder import write_extracted_store

DP, DIN, DC = 384, 8, 5  # patch features in MiniLM's 384-d space (positives need the shared space)
DIAG = ["benign", "carcinoma", "dysplasia"]
GRADE = ["low", "high", "none"]


def write_store(path: Path, seed: int, n_regions: int = 3, side: int = 2, k_store: int = 3) -> None:
    """An extracted store (tests/store_builder.py) with the datasets hwsi.model.inputs reads."""
    rng = np.random.default_rng(seed)
    g = side * side
    counts = rng.integers(0, 4, size=n_regions * g)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    coords = np.stack([np.arange(n_regions) * 1000, np.zeros(n_regions)], 1).astype(np.int64)
    grid = np.stack(np.meshgrid(np.arange(side), np.arange(side)), -1).reshape(g, 2)[None] * 250
    sel = np.stack([rng.permutation(g)[:k_store] for _ in range(n_regions)]).astype(np.int32)
    patch = rng.normal(size=(n_regions, g, DP)).astype(np.float32)
    rin = rng.normal(size=(n_regions, g, DIN)).astype(np.float32)
    rel = rng.uniform(size=(n_regions, g)).astype(np.float32)
    write_extracted_store(path, region_coords=coords, patch_coords=(coords[:, None, :] + grid).astype(np.int64),
                          features={"hwsi_small_patch": patch, "rin": rin}, selected=sel, relevance=rel,
                          cell_counts=counts, cell_embeddings=rng.normal(size=(int(offsets[-1]), DC)).astype(np.float32),
                          region_size_level0=1000.0)


def make_job(root: Path, n: int = 6, missing: int = 1) -> Path:
    """JOB/stores/*.h5 for ``n`` slides, JOB/text/train.json (+ records of ``missing`` slides without a store),
    JOB/facts.json. Each slide: a report request, a closed question and a two-turn conversation."""
    job = root / "job"
    (job / "stores").mkdir(parents=True)
    (job / "text").mkdir()
    records, facts = [], {}
    for i in range(n + missing):
        sid = f"s{i:02d}"
        d, g = DIAG[i % 3], GRADE[i % 3]
        facts[sid] = {"diagnosis": d, "grade": g, "glands": "yes" if i % 2 else "no", "n_lesion_regions": i % 3}
        report = (f"The slide shows {d}, {g} grade. Glands are {'present' if i % 2 else 'absent'}, with "
                  f"atypical nuclei in {i % 3} regions. Final diagnosis: {d}.")
        records += [
            {"id": f"{sid}_0", "image": f"{sid}.pt", "conversations": [
                {"from": "human", "value": "<image>\nWrite the report."}, {"from": "gpt", "value": report}]},
            {"id": f"{sid}_1", "image": f"{sid}.pt", "conversations": [
                {"from": "human", "value": "<image>\nWhat is the grade?"}, {"from": "gpt", "value": f"{g} grade."},
                {"from": "human", "value": "And the diagnosis?"}, {"from": "gpt", "value": f"{d}."}]},
        ]
        if i < n:
            write_store(job / "stores" / f"{sid}.h5", seed=i)
    (job / "text" / "train.json").write_text(json.dumps(records))
    (job / "facts.json").write_text(json.dumps(facts))
    return job


def tiny_config(**stage_steps: int) -> TrainConfig:
    """configs/tiny.yaml shrunk to a few optimizer steps per stage (``stage1=3`` etc.)."""
    cfg = load_train_config("tiny")
    cfg.data.region_input = "rin"
    cfg.model.max_regions, cfg.model.k = 3, 2
    cfg.tiny_llm.vocab_size, cfg.tiny_llm.hidden = 300, 32
    cfg.model.projector.hidden = 16
    for s in range(4):
        st = cfg.stage(s)
        st.max_steps = stage_steps.get(f"stage{s}", 2)
        st.batch_size = st.micro_batch_size = 2
        st.log_every = 1
    cfg.stage3.lora_rank, cfg.stage3.lora_alpha = 4, 8
    return cfg


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[TrainConfig, Path, Path]:
    """A job and a run folder where stages 0-3 ran a few steps each (shared by the tests of this module)."""
    from hwsi.train.stages import run_stage

    root = tmp_path_factory.mktemp("train")
    job = make_job(root)
    out = root / "run"
    cfg = tiny_config()
    results = [run_stage(s, cfg, job, out, progress=False) for s in range(4)]
    for r in results:
        assert r.finished and r.output is not None and r.output.exists()
        assert len(r.losses) == 2 and all(np.isfinite(r.losses)), r.losses
    return cfg, job, out


def test_every_stage_writes_its_outputs(run: tuple[TrainConfig, Path, Path]) -> None:
    cfg, job, out = run
    assert (out / "stage0" / "llm" / "config.json").is_file()
    assert (out / "stage1" / "final" / "alignment.safetensors").is_file()
    assert (out / "stage2" / "final" / "projectors.safetensors").is_file()
    assert (out / "stage3" / "final" / "lora" / "adapter_config.json").is_file()
    saved = load_train_config(out / "config.yaml")
    assert saved.model.hierarchy.patch_dim == DP and saved.model.hierarchy.vit4k.in_dim == DIN
    assert saved.model.hierarchy.ccaf.in_dim == DC and saved.model.projector.llm_dim == 32
    header = (out / "stage1" / "metrics.csv").read_text().splitlines()[0].split(",")
    for term in ("loss", "lr", "L_cells", "L_patches", "L_regions", "L_c", "L_wsi"):
        assert term in header


def test_resume_of_a_finished_stage_does_nothing(run: tuple[TrainConfig, Path, Path]) -> None:
    from hwsi.train.stages import run_stage

    cfg, job, out = run
    before = (out / "stage2" / "final" / "projectors.safetensors").stat().st_mtime_ns
    r = run_stage(2, cfg, job, out, resume=True, progress=False)
    assert r.finished and len(r.losses) == 2
    assert (out / "stage2" / "final" / "projectors.safetensors").stat().st_mtime_ns == before


def test_load_trained_model_answers_deterministically(run: tuple[TrainConfig, Path, Path]) -> None:
    from hwsi.model.inputs import collate_slides
    from hwsi.train.inference import load_trained_model, slide_inputs_for

    cfg, job, out = run
    model = load_trained_model(out)
    assert not any(p.requires_grad for p in model.parameters())
    assert not any("lora_" in n for n, _ in model.named_parameters())  # merged into the base weights
    x = slide_inputs_for(job / "stores" / "s01.h5", out)
    batch = collate_slides([x])
    a = model.generate(batch, ["What is the grade?"], max_new_tokens=6)
    b = model.generate(batch, ["What is the grade?"], max_new_tokens=6)
    assert a == b and isinstance(a[0], str)
    wrapped = load_trained_model(out, merge=False)
    assert any("lora_" in n for n, _ in wrapped.named_parameters())
    torch.testing.assert_close(wrapped.llm(inputs_embeds=torch.ones(1, 3, 32) * 0.01).logits,
                               model.llm(inputs_embeds=torch.ones(1, 3, 32) * 0.01).logits, atol=1e-4, rtol=1e-4)


def test_paper_preset_has_the_papers_hyper_parameters() -> None:
    cfg = load_train_config("paper")
    s1, s2, s3 = cfg.stage1, cfg.stage2, cfg.stage3
    assert (s1.epochs, s1.lr, s1.batch_size, s1.loss.tau) == (50, 1e-3, 64, 0.02)
    c = cfg.model.hierarchy.ccaf
    assert (c.depth, c.n_heads, c.dim) == (2, 2, 784)
    assert s2.batch_size == 256 and (s3.lr, s3.batch_size, s3.lora_rank, s3.lora_alpha) == (2e-5, 128, 128, 256)
    assert cfg.precision == "bf16" and cfg.model.llm_path and cfg.model.projector.llm_dim == 3584
    assert [st.accumulation(4) for st in (s1, s2, s3)] == [1, 8, 8]
    ds = json.loads(shipped_file("deepspeed_zero3.json").read_text())
    assert ds["zero_optimization"]["stage"] == 3 and ds["bf16"]["enabled"]


def test_config_rejects_bad_values(tmp_path: Path) -> None:
    from hwsi.errors import ConfigError

    p = tmp_path / "c.yaml"
    p.write_text("stage1: {batch_size: 6, micro_batch_size: 4}\n")
    with pytest.raises(ConfigError, match="multiple"):
        load_train_config(p)
    p.write_text("stage2: {learning_rate: 1}\n")
    with pytest.raises(ConfigError, match="learning_rate"):
        load_train_config(p)
    p.write_text("data: {stage2_records: captions}\n")
    with pytest.raises(ConfigError, match="stage2_records"):
        load_train_config(p)


def test_stage1_weights_of_every_scale_load_into_a_model_with_fewer(run: tuple[TrainConfig, Path, Path]) -> None:
    """The "clean" Table 1 protocol: a full stage 1 feeds a model without cell/region tokens; a hierarchy the
    weights do not cover is one clear error."""
    import copy

    from hwsi.train.engine import TrainError
    from hwsi.train.stage_common import load_part
    from hwsi.train.stage_lm import build_model

    cfg, job, out = run
    fewer = copy.deepcopy(cfg)
    fewer.model.hierarchy.use_cells = fewer.model.hierarchy.use_regions = False
    model, _ = build_model(fewer, out, stage=2)
    assert model.hierarchy.ccaf is None and model.hierarchy.vit4k is not None
    with pytest.raises(TrainError, match="stage-1 weights lack"):
        load_part(model.hierarchy, {}, "hierarchy.")


def test_threads_apply_while_a_stage_trains_and_are_restored(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import hwsi.train.stages as stages

    seen = []
    monkeypatch.setattr(stages, "run_stage0", lambda *a, **k: seen.append(torch.get_num_threads()))
    before = torch.get_num_threads()
    cfg = tiny_config()
    cfg.threads = 1
    stages.run_stage(0, cfg, make_job(tmp_path), tmp_path / "run", progress=False)
    assert seen == [1] and torch.get_num_threads() == before
    cfg.threads = 0  # torch's default: left as it is
    stages.run_stage(0, cfg, tmp_path / "job", tmp_path / "run2", progress=False)
    assert seen == [1, before]
