"""SynthPath text and cohorts: WSI-Bench record formats, varied wording, determinism, CLI, patch dataset."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np

from hwsi.synth.classes import SlideClasses, all_classes
from hwsi.synth.text import CATEGORIES, slide_text, bench_records, train_records
import hwsi.data as records


def _facts(cls: SlideClasses, n: int = 3, m: int = 9) -> dict:
    f = cls.facts()
    f.update(n_lesion_regions=n if cls.extent == "extensive" else int(cls.extent == "focal"), n_tissue_regions=m,
             lesion_location="none" if cls.extent == "none" else "upper right")
    return f


def test_every_fact_is_asked_closed_for_every_slide_with_count_and_location() -> None:
    """Each slide gets a closed question per fact; count for all, location only for focal lesions (docs/design.md §8)."""
    for i, c in enumerate(all_classes()):
        t = slide_text(f"s{i}", _facts(c), seed=1)
        closed = {qa.kind: qa for qa in t.qas if qa.closed}
        want = {"glands", "atypia", "architecture", "diagnosis", "grade", "extent", "count"}
        assert want <= set(closed) and (("location" in closed) == (c.extent == "focal")), (c, sorted(closed))
        truth = closed["count"].answer.split(") ", 1)[1]
        assert truth == {"none": "none", "focal": "one", "extensive": "three"}[c.extent]
        if c.extent == "focal":
            assert closed["location"].answer.endswith("upper right") and closed["location"].category == "Location"


def test_reports_are_varied_and_deterministic() -> None:
    f = _facts(SlideClasses("adenocarcinoma_high_grade", "extensive"))
    reports = [slide_text(f"s{i}", f, seed=0).report for i in range(20)]
    assert len(set(reports)) >= 18
    assert slide_text("s1", f, 0).report == slide_text("s1", f, 0).report
    assert slide_text("s1", f, 0).report != slide_text("s1", f, 1).report
    for r in reports:
        assert "adenocarcinoma, high grade, extensive" in r


def test_record_formats_and_closed_answers() -> None:
    texts = [slide_text(f"s{i}", _facts(c), seed=3) for i, c in enumerate(all_classes())]
    train = train_records(texts, 3)
    for r in train:
        assert set(r) == {"id", "image", "conversations"}
        assert r["conversations"][0]["from"] == "human" and r["conversations"][0]["value"].startswith("<image>\n")
        assert r["conversations"][1]["from"] == "gpt" and r["conversations"][1]["value"]
    test = bench_records(texts, 3)
    cats = {r["metadata"] for r in test}
    assert set(CATEGORIES) | {"Report", "Caption"} == cats
    closed = [r for r in test if "options" in r]
    assert closed
    for r in closed:
        letter = r["answer_option"]
        opt = r["options"]["ABCD".index(letter)]
        assert r["T-answer"] == f"{letter}) {opt}"
        assert f"{letter}) {opt}" in r["question"]
    assert len({r["question_id"] for r in test}) == len(test)
    # the facts can be recovered from closed answers
    dx = {r["image"]: r["T-answer"][3:] for r in closed if r["metadata"] == "Classification"}
    for t in texts:
        if t.slide_id in dx:
            assert dx[t.slide_id] == t.facts["diagnosis_text"]


def test_records_parse_with_project_loader(tmp_path: Path) -> None:
    texts = [slide_text(f"s{i}", _facts(c), seed=3) for i, c in enumerate(all_classes())]
    p = tmp_path / "test.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in bench_records(texts, 3)))
    items = records.load_records(p)
    assert len(items) == len(bench_records(texts, 3))
    closed = [it for it in items if getattr(it, "options", None) and it.question_id.startswith("Classification")]
    assert closed and all(it.answer_index is not None for it in closed)
    q = tmp_path / "train.json"
    q.write_text(json.dumps(train_records(texts, 3)))
    assert len(records.load_records(q)) == len(train_records(texts, 3))


def _h5(path: Path) -> dict:
    out: dict = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda n, o: out.__setitem__(n, o[()]) if isinstance(o, h5py.Dataset) else None)
        out["attrs"] = dict(f.attrs)
    return out


def test_cohort_cli_deterministic(tmp_path: Path) -> None:
    from hwsi.cli import main

    args = ["synth", "--cohort", "6", "--size", "1536", "--region-size", "512", "--patch-size", "32",
            "--workers", "1"]
    assert main([*args, "--out", str(tmp_path / "a"), "--seed", "7"]) == 0
    assert main([*args, "--out", str(tmp_path / "b"), "--seed", "7"]) == 0
    assert main([*args, "--out", str(tmp_path / "c"), "--seed", "8"]) == 0
    meta = json.loads((tmp_path / "a" / "cohort.json").read_text())
    assert len(meta["slides"]) == 6
    assert {s["classes"]["diagnosis"] for s in meta["slides"]} >= {"benign", "dysplasia", "solid_carcinoma"}
    assert {s["split"] for s in meta["slides"]} == {"train", "val", "test"}
    for name in ("facts.json", "text/reports.json", "text/captions.json", "text/train.json", "text/test.jsonl"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert (tmp_path / "a" / "text/reports.json").read_bytes() != (tmp_path / "c" / "text/reports.json").read_bytes()
    s0 = meta["slides"][0]
    ta, tb = _h5(tmp_path / "a" / s0["truth"]), _h5(tmp_path / "b" / s0["truth"])
    tc = _h5(tmp_path / "c" / s0["truth"])
    for k in ta:
        if k != "attrs":
            np.testing.assert_array_equal(ta[k], tb[k])
    assert not np.array_equal(ta["cells/x"], tc["cells/x"]) or ta["cells/x"].size != tc["cells/x"].size
    test_ids = {json.loads(line)["image"] for line in (tmp_path / "a" / "text/test.jsonl").read_text().splitlines()}
    assert test_ids == {s["slide_id"] for s in meta["slides"] if s["split"] == "test"}
    # the cohort's SPF vocabulary file reads back through hwsi extract's loader
    from hwsi.features.vocab import load_vocabulary
    from hwsi.synth.text import SYNTHPATH_VOCABULARY

    assert load_vocabulary(tmp_path / "a" / "vocab.txt") == SYNTHPATH_VOCABULARY


def test_single_slide_cli(tmp_path: Path) -> None:
    from hwsi.cli import main

    rc = main(["synth", "--out", str(tmp_path), "--size", "1536", "--region-size", "512", "--classes",
               "solid_carcinoma:extensive", "--slide-id", "x"])
    assert rc == 0 and (tmp_path / "x.tiff").is_file() and (tmp_path / "x.truth.h5").is_file()
    assert main(["synth", "--out", str(tmp_path), "--classes", "nonsense"]) == 2


def test_sample_patch_dataset() -> None:
    from hwsi.synth.patches import sample_patch_dataset

    d = sample_patch_dataset(160, seed=0, patch_px=128)
    assert d.images.shape == (160, 128, 128, 3) and d.images.dtype == np.uint8
    assert len(d.captions) == len(d.labels) == 160
    assert set(d.labels) <= {"gland", "solid", "stroma", "background"} and len(set(d.labels)) >= 3
    assert len(set(d.captions)) >= 40
    e = sample_patch_dataset(160, seed=0, patch_px=128)
    np.testing.assert_array_equal(d.images, e.images)
    assert d.captions == e.captions
    # patterns differ in content: solid patches hold more haematoxylin than stroma patches
    lab = np.array(d.labels)
    dark = (d.images.astype(float).mean(-1) < 170).mean(axis=(1, 2))
    if (lab == "solid").any() and (lab == "stroma").any():
        assert dark[lab == "solid"].mean() > dark[lab == "stroma"].mean()


def test_lesion_location_follows_the_lesional_region() -> None:
    from hwsi.synth.scene import Scene, SceneConfig
    from hwsi.synth.truth import lesion_location

    for seed in (1, 2, 3):
        sc = Scene(SceneConfig(width=2048, height=2048, mpp=0.5, region_size=1024, patch_size=64, seed=seed,
                               classes=SlideClasses("dysplasia", "focal")))
        ys, xs = np.nonzero(sc.region_lesion)
        assert len(ys) == 1
        assert lesion_location(sc) == f"{'upper' if ys[0] == 0 else 'lower'} {'left' if xs[0] == 0 else 'right'}"
    benign = Scene(SceneConfig(width=2048, height=2048, mpp=0.5, region_size=1024, patch_size=64, seed=1))
    assert lesion_location(benign) == "none"


def test_location_drills_add_train_records_only() -> None:
    """A focal slide's TRAIN records ask its location in every phrasing, open and closed (the truth among the
    options); its other texts and its held-out records are the same with and without the drills."""
    from hwsi.synth.text import _Q

    for i, c in enumerate(all_classes()):
        f = _facts(c)
        with_, without = slide_text(f"s{i}", f, seed=1), slide_text(f"s{i}", f, seed=1, location_drills=False)
        assert (with_.report, with_.caption, with_.qas) == (without.report, without.caption, without.qas)
        assert bench_records([with_], 1) == bench_records([without], 1)
        extra = train_records([with_], 1)[len(train_records([without], 1)):]
        if c.extent != "focal":
            assert extra == []
            continue
        asked = [r["conversations"][0]["value"].removeprefix("<image>\n") for r in extra]
        answers = [r["conversations"][1]["value"] for r in extra]
        assert len(extra) == 2 * len(_Q["location"]) and {a.split("\n")[0] for a in asked} == set(_Q["location"])
        assert all("upper right" in a for a in answers)
        closed = [q for q in asked if "\nA) " in q]
        assert len(closed) == len(_Q["location"]) and all("upper right" in q for q in closed)


def test_region_records_ask_each_region_of_a_mixed_train_slide_its_own_truth(tmp_path: Path) -> None:
    """hwsi.synth.roi_text: train slides with lesional AND benign tissue regions get, per tissue region, the closed
    architecture (where it has glands) and atypia questions with that region's truth and its box as ``roi``; other
    slides and the held-out records get none; the records read back through the project's loader with the roi."""
    from hwsi.cli import main
    from hwsi.data import load_records
    from hwsi.synth.classes import ARCHITECTURES
    from hwsi.synth.truth import read_truth

    out = tmp_path / "c"
    assert main(["synth", "--cohort", "10", "--size", "2048", "--workers", "1", "--out", str(out), "--seed", "3"]) == 0
    meta = json.loads((out / "cohort.json").read_text())
    recs = json.loads((out / "text" / "train.json").read_text())
    roi = [r for r in recs if "roi" in r]
    assert roi and all(r["id"].startswith(r["image"] + "_roi") for r in roi)
    assert recs[-len(roi):] == roi  # after every whole-slide record
    by_slide: dict[str, list[dict]] = {}
    for r in roi:
        by_slide.setdefault(r["image"], []).append(r)
    for s in meta["slides"]:
        t = read_truth(out / s["truth"])
        tissue = t.data["regions/tissue"] > 0.3
        lesion = t.data["regions/lesion"].astype(bool)
        mixed = bool((lesion & tissue).any() and (~lesion & tissue).any())
        got = by_slide.get(s["slide_id"], [])
        assert bool(got) == (mixed and s["split"] == "train"), s["slide_id"]
        side = int(t.attrs["region_size"])
        boxes = {tuple(c) + (side, side): i for i, c in enumerate(t.data["regions/coords"].tolist())}
        for r in got:
            i = boxes[tuple(r["roi"])]
            q, a = r["conversations"][0]["value"], r["conversations"][1]["value"].split(") ", 1)[1]
            if "nuclei" in q or "nuclear" in q:
                assert a == ("yes" if t.data["regions/atypia"][i] else "no")
            else:
                assert a == ARCHITECTURES[int(t.data["regions/architecture"][i])] != "background"
            assert f") {a}" in q  # the truth is among the options
    assert len(by_slide) >= 1
    for split in ("val", "test"):
        assert all("roi" not in json.loads(line) for line in (out / "text" / f"{split}.jsonl").read_text().splitlines())
    loaded = [r for r in load_records(out / "text" / "train.json") if "roi" in r.metadata]
    assert [tuple(float(v) for v in r["roi"]) for r in roi] == [r.metadata["roi"] for r in loaded]
