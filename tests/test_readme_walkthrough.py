"""The README's "Real data, step by step" commands, read from README.md and run in order exactly as written there
(tile → extract → train 1–3 → eval → ask → export) on a small SynthPath job, so the README cannot drift from the
code.

Only placeholders and option VALUES are substituted, each from a table below (every entry must be used, so a
command or option the README drops or renames fails the test): the slide folder becomes a CSV (the form the README
names) of 6 slides of the cached test pipeline's cohort, CONCH/HIPT/CellViT become the pipeline's small patch
encoder, MiniLM and the built-in nuclei, 4096/256 px become the cohort's 1024/64 px, the paper preset becomes
the tiny preset edited as the README says (llm_path: the pipeline's stage-0 LLM; records: the cohort's train
json) with a few epochs. Not run: the `accelerate launch` line (multi-GPU) and `hwsi serve` (a server that does
not return; tests/test_serve*.py cover it). Reuses the cached pipeline's artefacts (cohort, encoder, LLM): ~1 min.
"""

from __future__ import annotations

import csv
import json
import re
import shlex
from pathlib import Path

import pytest

from hwsi.cli import main

REPO = Path(__file__).resolve().parents[1]
TRAIN, TEST, NEW = ["synth_0001", "synth_0002", "synth_0003", "synth_0005"], ["synth_0000", "synth_0014"], "synth_0012"
EXPECTED = ["tile", "extract", "train", "train", "train", "eval", "ask", "ask", "export", "serve"]


def readme_commands(readme: Path = REPO / "README.md") -> list[list[str]]:
    """argv (after ``hwsi``) of every ``hwsi`` line of the bash block of "Real data, step by step"."""
    section = readme.read_text(encoding="utf-8").split("## Real data, step by step", 1)[1].split("\n## ", 1)[0]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0].replace("\\\n", " ")
    cmds = []
    for line in block.splitlines():
        argv = shlex.split(line, comments=True)
        if argv and argv[0] == "hwsi":
            cmds.append(argv[1:])
    return cmds


def test_readme_lists_the_steps_in_order() -> None:
    cmds = readme_commands()
    assert [c[0] for c in cmds] == EXPECTED
    assert [c[c.index("--stage") + 1] for c in cmds if c[0] == "train"] == ["1", "2", "3"]


def tiny_config(path: Path, llm: Path, records: Path) -> Path:
    """The tiny preset with the README's step-3 edits (llm_path, records; stores stays JOB/stores) and few epochs."""
    from hwsi.train.config import load_train_config, save_train_config

    cfg = load_train_config("tiny")
    cfg.model.llm_path, cfg.data.records, cfg.data.facts = str(llm), str(records), ""
    cfg.stage1.epochs, cfg.stage2.epochs, cfg.stage3.epochs = 3, 2, 2
    save_train_config(cfg, path)
    return path


def test_readme_walkthrough(test_pipeline, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                            capsys: pytest.CaptureFixture[str]) -> None:
    p = test_pipeline.paths
    slides = p.cohort / "slides"
    listing = tmp_path / "slides.csv"
    with listing.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["slide", "mpp"])
        w.writerows([[str(slides / f"{s}.tiff"), ""] for s in TRAIN + TEST])
    job, run, ev = tmp_path / "JOB", tmp_path / "RUN", tmp_path / "EVAL"
    config = tiny_config(tmp_path / "tiny.yaml", p.runs / "stage0" / "llm", p.cohort / "text" / "train.json")
    values = {  # (option, value in the README) -> value here
        ("--region-size", "4096"): "1024",
        ("--patch-size", "256"): "64",
        ("--patch-encoder", "conch_vit_b16:/w/conch/pytorch_model.bin"): f"hwsi_small_patch:{p.encoder}",
        ("--text-encoder", "conch_text:/w/conch/pytorch_model.bin"): "minilm",
        ("--region-input", "hipt_vit256:/w/hipt/vit256_small_dino.pth"): "same",
        ("--cells", "cellvit:/data/cellvit"): "builtin",
        ("--config", "paper.yaml"): str(config),
        ("--data", "WSI-Bench-test.jsonl"): str(p.cohort / "text" / "test.jsonl"),
    }
    paths = {"/data/slides": str(listing), "/data/new/SLIDE.svs": str(slides / f"{NEW}.tiff")}
    words = {"JOB": str(job), "RUN": str(run), "EVAL": str(ev), "SLIDE": TEST[1]}
    used: set = set()

    def substitute(argv: list[str]) -> list[str]:
        out = []
        for i, tok in enumerate(argv):
            key = (argv[i - 1] if i else "", tok)
            if key in values:
                used.add(key)
                tok = values[key]
            elif tok in paths:
                used.add(tok)
                tok = paths[tok]
            else:
                tok = re.sub(r"\b(JOB|RUN|EVAL|SLIDE)\b", lambda m: (used.add(m[1]), words[m[1]])[1], tok)
            out.append(tok)
        return out

    monkeypatch.chdir(tmp_path)  # relative outputs (SLIDE.geojson) land here
    outputs = {}
    for argv in readme_commands():
        if argv[0] == "serve":
            continue
        argv = substitute(argv)
        capsys.readouterr()
        rc = main(argv)
        out = capsys.readouterr()
        assert rc == 0, f"hwsi {shlex.join(argv)} -> {rc}\n{out.err[-2000:]}"
        outputs.setdefault(argv[0], []).append(out.out)
    assert used == set(values) | set(paths) | set(words), "a README option/placeholder the test maps has gone"

    # 1-2: one extracted store per slide, made with the substituted settings
    from hwsi.train.bundle import check_store, load_bundle, read_store_settings

    stores = sorted(q.stem for q in (job / "stores").glob("*.h5"))
    assert stores == sorted(TRAIN + TEST)
    sig, _ = read_store_settings(job / "stores" / f"{TEST[0]}.h5")
    assert (sig["region_size"], sig["patch_size"], sig["target_mpp"], sig["patch_encoder"]) == (
        1024, 64, 0.5, "hwsi_small_patch")
    # 3: the run bundles what it was trained with
    bundle = load_bundle(run)
    assert bundle is not None and bundle.n_stores == 6 and bundle.signature == sig
    assert (run / "bundle" / bundle.checkpoints["patch"]["bundled"] / "model.safetensors").is_file()
    assert all((run / f"stage{s}" / "result.json").is_file() for s in (1, 2, 3))
    # 4: evaluation written, generation tasks ran on the two test slides
    vqa = json.loads((ev / "vqa.json").read_text())
    assert not vqa["skipped"] and {r["slide_id"] for r in vqa["predictions"]} == set(TEST)
    assert (ev / "summary.md").is_file()
    # 5: the new slide was tiled + extracted the run's way into RUN/ask and answered; the job's slide by its store
    check_store(run / "ask" / "stores" / f"{NEW}.h5", bundle)
    new_answer, store_answer = outputs["ask"]
    assert new_answer.startswith("Q: What is the histological grade?") and "Q: Is there necrosis?" in new_answer
    assert store_answer.strip() and "evidence" in store_answer
    geo = json.loads((tmp_path / f"{TEST[1]}.geojson").read_text())
    assert geo["type"] == "FeatureCollection" and geo["features"]
