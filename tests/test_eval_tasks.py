"""hwsi.eval.tasks: every task end to end on a tiny random MLLM over a tiny synthetic SynthPath-like job.

The job's stores are written by hwsi.store's writer (tests/store_builder.py; no rendering); the cohort folder holds
cohort.json, text/test.jsonl and text/reports.json exactly as hwsi.synth.cohort writes them (same text functions).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from hwsi.eval.results import dumps
from hwsi.eval.tasks import (
    TASKS,
    EvalConfig,
    TaskError,
    derangement,
    load_eval_data,
    run_all,
    run_task,
    write_task,
)
from hwsi.model.hierarchy import HierarchyConfig
from hwsi.model.llm import build_tiny_llm, load_llm
from hwsi.model.mllm import MLLMConfig, MLLMHWSI
from hwsi.model.projectors import ProjectorConfig
from hwsi.synth.classes import DIAGNOSES, SlideClasses
from hwsi.synth.text import bench_records, slide_text
from store_builder import write_extracted_store

DP, DIN, DC, SIDE, K = 16, 12, 8, 4, 4
H, T = 32, 10
SPLITS = ("train", "val", "test")


class HashTextEncoder:
    """Deterministic bag-of-words text encoder (T-d unit vectors) standing in for MiniLM in fast tests."""

    name = "hash"

    def encode(self, texts: list[str]) -> np.ndarray:
        out = np.zeros((len(texts), T), np.float32)
        for i, t in enumerate(texts):
            for w in t.lower().split():
                h = int(hashlib.md5(w.encode()).hexdigest(), 16)
                out[i, h % T] += 1.0 if (h >> 8) % 2 else -1.0
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-6)


def write_store(path: Path, seed: int, n_regions: int = 3) -> None:
    rng = np.random.default_rng(seed)
    g = SIDE * SIDE
    counts = rng.integers(0, 4, size=n_regions * g)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    coords = np.stack([np.arange(n_regions) * 100, np.zeros(n_regions)], 1).astype(np.int64)
    grid = np.stack(np.meshgrid(np.arange(SIDE), np.arange(SIDE)), -1).reshape(g, 2) * 25
    sel = np.stack([rng.permutation(g)[:K] for _ in range(n_regions)]).astype(np.int32)
    enc = rng.normal(size=(n_regions, g, DP)).astype(np.float32)
    rin = rng.normal(size=(n_regions, g, DIN)).astype(np.float32)
    rel = rng.uniform(size=(n_regions, g)).astype(np.float32)
    write_extracted_store(path, region_coords=coords, patch_coords=(coords[:, None] + grid[None]).astype(np.int64),
                          features={"enc": enc, "rin": rin}, selected=sel, relevance=rel, cell_counts=counts,
                          cell_embeddings=rng.normal(size=(int(offsets[-1]), DC)).astype(np.float32),
                          region_size_level0=100.0, attrs={"patch_encoder": "enc", "region_input": "rin"})


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """15 slides (3 per diagnosis: one train, one val, one test), stores for all but one extra slide."""
    root = tmp_path_factory.mktemp("cohort")
    (root / "job" / "stores").mkdir(parents=True)
    (root / "text").mkdir()
    slides, texts = [], []
    for i in range(15):
        dx = DIAGNOSES[i % 5]
        cls = SlideClasses(dx, "none" if dx == "benign" else ("focal", "extensive")[i % 2])
        facts = cls.facts()
        facts.update(n_tissue_regions=3, n_lesion_regions=1 if cls.extent == "focal" else 2)
        sid = f"synth_{i:04d}"
        split = SPLITS[i // 5]
        slides.append({"slide_id": sid, "classes": cls.to_dict(), "label": cls.label, "split": split, "facts": facts})
        write_store(root / "job" / "stores" / f"{sid}.h5", seed=i)
        texts.append(slide_text(sid, facts, seed=0))
    # a test slide with records but no store: reported, not raised on
    ghost = SlideClasses("benign", "none").facts()
    slides.append({"slide_id": "synth_ghost", "classes": {"diagnosis": "benign", "extent": "none"}, "label": "benign",
                   "split": "test", "facts": ghost})
    texts.append(slide_text("synth_ghost", ghost, seed=0))
    (root / "cohort.json").write_text(json.dumps({"seed": 0, "n": len(slides), "slides": slides}))
    (root / "text" / "reports.json").write_text(json.dumps({t.slide_id: t.report for t in texts}))
    test = [t for t, s in zip(texts, slides, strict=True) if s["split"] == "test"]
    (root / "text" / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in bench_records(test, 0)))
    return root


@pytest.fixture(scope="module")
def llm_dir(tmp_path_factory: pytest.TempPathFactory, cohort: Path) -> Path:
    corpus = list(json.loads((cohort / "text" / "reports.json").read_text()).values())
    return build_tiny_llm(tmp_path_factory.mktemp("llm") / "tiny", corpus, vocab_size=400, hidden=H, layers=2,
                          heads=4, kv_heads=2)


def make_model(llm_dir: Path, text_dim: int = T) -> MLLMHWSI:
    torch.manual_seed(0)
    llm, tok = load_llm(llm_dir)
    cfg = MLLMConfig(hierarchy=HierarchyConfig.tiny(patch_dim=DP, region_in_dim=DIN, cell_dim=DC),
                     projector=ProjectorConfig(hidden=24, llm_dim=H), text_dim=text_dim, k=K)
    return MLLMHWSI.from_config(cfg, llm, tok).eval()


@pytest.fixture(scope="module")
def model(llm_dir: Path) -> MLLMHWSI:
    return make_model(llm_dir)


FAST = EvalConfig(limit=6, max_new_tokens=6, meteor=False, batch_size=3)


def test_load_eval_data_maps_slides_and_reports_unmatched(cohort: Path) -> None:
    data = load_eval_data(cohort)
    assert data.source == "synthpath" and len(data.slides) == 15
    assert data.split_ids("test") == [f"synth_{i:04d}" for i in range(10, 15)]
    assert data.slides["synth_0010"].label == "benign" and data.slides["synth_0011"].label == "dysplasia"
    assert data.missing_stores == ["synth_ghost"]
    assert data.unmatched and {s for _, s in data.unmatched} == {"synth_ghost"}
    assert all(it.slide_id != "synth_ghost" for it in data.items)
    cats = {it.category for it in data.items}
    assert {"Report", "Caption", "Classification", "Grade", "Extent", "Morphology"} <= cats
    assert set(data.reports) >= set(data.split_ids("test"))
    assert load_eval_data(cohort, label_key="label").slides["synth_0011"].label == "dysplasia:extensive"


def test_real_format_records_matched_by_slide_id(cohort: Path, tmp_path: Path) -> None:
    rows = [{"question_id": "q1", "image": "TCGA-XX/synth_0010.pt", "question": "Describe the slide.",
             "T-answer": "Benign glandular tissue.", "metadata": "Report"},
            {"question_id": "q2", "image": "TCGA-XX/unknown_slide.pt", "question": "Grade?", "T-answer": "High.",
             "metadata": "Grade"}]
    path = tmp_path / "WSI-Bench-test.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = load_eval_data(path, cohort / "job")
    assert [it.slide_id for it in data.items] == ["synth_0010"]
    assert data.unmatched == [("q2", "unknown_slide")]
    assert data.reports == {"synth_0010": "Benign glandular tissue."}
    with pytest.raises(TaskError, match="--job"):
        load_eval_data(path)


def test_derangement_has_no_fixed_point_and_is_deterministic() -> None:
    for n in (2, 3, 5, 17):
        ids = [f"s{i}" for i in range(n)]
        for seed in (0, 1, 2):
            p = derangement(ids, seed)
            assert sorted(p) == sorted(ids) and sorted(p.values()) == sorted(ids)
            assert all(k != v for k, v in p.items())
            assert p == derangement(list(reversed(ids)), seed)
    with pytest.raises(TaskError):
        derangement(["only"])


@pytest.mark.parametrize("task", TASKS)
def test_each_task_end_to_end(task: str, cohort: Path, model: MLLMHWSI, tmp_path: Path) -> None:
    data = load_eval_data(cohort)
    res = run_task(task, model, data, FAST, text_encoder=HashTextEncoder())
    assert res.name == task and not res.skipped
    assert "convention" in res.metrics and res.metrics["convention"]
    assert res.predictions and res.markdown.startswith("## ")
    assert "onvention" in res.markdown and "|---|" in res.markdown
    assert "without a store" in res.markdown  # the ghost slide is reported
    paths = write_task(res, tmp_path)
    saved = json.loads(paths["json"].read_text())
    assert saved["task"] == task and saved["config"]["limit"] == 6 and saved["data"]["missing_stores"]
    assert paths["md"].read_text().strip().endswith(res.markdown.strip().splitlines()[-1].strip())
    if task in ("zero_shot", "linear_probe"):
        m = res.metrics
        assert 0.0 <= m["balanced_accuracy"] <= 1.0 and 0.0 <= m["weighted_f1"] <= 1.0
        assert np.asarray(m["confusion_matrix"]).sum() == m["n"] == 5
        assert ("CONCH/MI-Zero" if task == "zero_shot" else "LogisticRegression") in res.markdown
        assert "balanced_accuracy" in res.metrics["convention"]
        png = Path(res.figures["confusion_matrix"])
        assert png.is_file() and png.read_bytes()[:4] == b"\x89PNG"
    if task in ("vqa", "report", "caption"):
        m = res.metrics
        assert m["model"]["facts"]["convention"].startswith("synthpath-facts")
        assert "shuffled" in m and "facts" in m["shuffled"]
        assert "shuffled visual tokens" in res.markdown and "fact acc" in res.markdown
        assert len(res.predictions) == (6 if task == "vqa" else 5)  # one report / caption per test slide
        for p in res.predictions:
            assert p["shuffled_visual_from"] != p["slide_id"]
    if task == "vqa":
        assert "parse_failure_rate" in res.metrics["model"]["closed"]
    if task == "cross_modal_retrieval":
        assert set(res.metrics["image_to_text"]) == {"R@1", "R@3", "R@5"}  # K <= n (5 test slides)


def test_shuffled_baseline_feeds_other_slides_visual_tokens(cohort: Path, llm_dir: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Spy on generation: the baseline's questions get the deranged slides' visual tokens, never their own slide's."""
    model = make_model(llm_dir)
    data = load_eval_data(cohort)
    reports = data.reports
    calls: list[list[str]] = []
    made: dict[int, str] = {}  # id of a visual-token tensor -> the slide it was computed from
    real_visual_tokens = model.visual_tokens

    def spy(batch):
        out = real_visual_tokens(batch)
        made.update({id(v): s for v, s in zip(out, batch.slide_ids)})
        return out

    def oracle(_model, visual, questions, max_new_tokens, batch_size):  # answers with the report of its visual input
        sids = [made[id(v)] for v in visual]
        calls.append(sids)
        return [reports[s] for s in sids]

    model.visual_tokens = spy  # type: ignore[method-assign]
    monkeypatch.setattr("hwsi.model.generate.greedy_answers", oracle)
    res = run_task("report", model, data, EvalConfig(meteor=False, answer_batch_size=2))
    own = [p["slide_id"] for p in res.predictions]
    n = len(own)
    seen = [s for c in calls for s in c]
    assert seen[:n] == own  # model pass: own slides
    shuffled = seen[n:]
    assert len(shuffled) == n and all(a != b for a, b in zip(shuffled, own, strict=True))
    assert sorted(set(shuffled)) == sorted(set(own))  # a permutation of the same slides
    # an oracle reading its visual input is perfect on facts and BLEU; shuffled it is not
    m, s = res.metrics["model"], res.metrics["shuffled"]
    assert m["BLEU-4"] == pytest.approx(1.0) and m["facts"]["mean_accuracy"] == 1.0
    assert m["facts"]["facts"]["diagnosis"]["accuracy"] == 1.0
    assert s["facts"]["facts"]["diagnosis"]["accuracy"] == 0.0  # test slides all have different diagnoses
    assert s["BLEU-4"] < 0.9
    # the real visual tokens differ between a slide and its replacement
    from hwsi.eval.model_outputs import SlideInputCache
    from hwsi.model.inputs import collate_slides

    sl = SlideInputCache(model, data, EvalConfig())
    perm = res.metrics["shuffle"]["mapping"]
    with torch.no_grad():
        for a, b in perm.items():
            va = model.visual_tokens(collate_slides([sl.get(a)]))[0]
            vb = model.visual_tokens(collate_slides([sl.get(b)]))[0]
            assert va.shape != vb.shape or not torch.allclose(va, vb)


def test_run_all_is_deterministic_and_writes_summary(cohort: Path, model: MLLMHWSI, tmp_path: Path) -> None:
    data = load_eval_data(cohort)
    cfg = EvalConfig(limit=4, max_new_tokens=5, meteor=False, convention="coco", coco_tokenizer="simple")
    tasks = ["zero_shot", "report", "vqa"]
    a = run_all(model, data, cfg, tasks=tasks, out=tmp_path / "a", text_encoder=HashTextEncoder())
    b = run_all(model, data, cfg, tasks=tasks, out=tmp_path / "b", text_encoder=HashTextEncoder())
    for t in tasks:
        assert dumps(a[t].to_dict()) == dumps(b[t].to_dict())
        assert (tmp_path / "a" / f"{t}.json").read_text() == (tmp_path / "b" / f"{t}.json").read_text()
    assert a["report"].metrics["model"]["convention"] == "coco" and "CIDEr" in a["report"].metrics["model"]
    summary = (tmp_path / "a" / "summary.md").read_text()
    assert "## Zero-shot classification" in summary and "## Report generation" in summary and "## VQA" in summary


def test_tasks_needing_heads_are_skipped_with_a_reason(cohort: Path, llm_dir: Path) -> None:
    model = make_model(llm_dir, text_dim=0)
    data = load_eval_data(cohort)
    res = run_all(model, data, FAST, tasks=["zero_shot", "cross_modal_retrieval", "linear_probe"],
                  text_encoder=HashTextEncoder())
    assert "alignment head" in res["zero_shot"].skipped and "alignment head" in res["cross_modal_retrieval"].skipped
    assert not res["linear_probe"].skipped and res["linear_probe"].metrics["embedding"] == "slide_token"
    with pytest.raises(TaskError, match="unknown task"):
        run_task("nope", model, data)


def test_cli_writes_json_and_markdown(cohort: Path, model: MLLMHWSI, tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    import hwsi.eval.model_outputs as model_outputs
    import hwsi.eval.tasks as tasks_mod
    from hwsi.cli import main

    from hwsi.train.config import TrainConfig, save_train_config

    monkeypatch.setattr(tasks_mod, "load_model", lambda run_dir, placement=None: model)  # un-mocked: test_ask.py
    monkeypatch.setitem(model_outputs._TEXT_ENCODERS, "hash", HashTextEncoder())
    run_cfg = TrainConfig()
    run_cfg.data.patch_encoder, run_cfg.data.region_input = "enc", "rin"  # the run's config names the store datasets
    (tmp_path / "run").mkdir()
    save_train_config(run_cfg, tmp_path / "run" / "config.yaml")
    out = tmp_path / "out"
    rc = main(["eval", "--task", "caption", "--task", "slide_retrieval", "--data", str(cohort), "--model",
               str(tmp_path / "run"), "--out", str(out), "--limit", "3", "--max-new-tokens", "4", "--no-meteor",
               "--text-encoder", "hash"])
    assert rc in (0, None)
    for t in ("caption", "slide_retrieval"):
        saved = json.loads((out / f"{t}.json").read_text())
        assert saved["task"] == t
        assert (saved["config"]["device"], saved["config"]["dtype"]) == ("cpu", "float32")  # docs/devices.md
        assert (out / f"{t}.md").read_text().startswith("## ")
    assert main(["eval", "--task", "bogus", "--data", str(cohort), "--model", str(tmp_path)]) == 2


def test_load_model_reads_a_run_folder_with_the_train_loader(cohort: Path, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    """`hwsi eval --model RUN` reaches hwsi.train.inference (it once looked in hwsi.train/hwsi.train.stages and
    failed on every run); a folder that is no run is one line naming it, exit 2."""
    from hwsi.cli import main
    from hwsi.eval.tasks import load_model
    from hwsi.train.engine import TrainError

    with pytest.raises(TrainError, match="config.yaml"):
        load_model(tmp_path)
    rc = main(["eval", "--task", "vqa", "--data", str(cohort), "--model", str(tmp_path / "no_run"),
               "--out", str(tmp_path / "e")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert "no_run" in err and "not a training run folder" in err
