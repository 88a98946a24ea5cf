"""`hwsi score`: other tools' answer files scored on the REAL benchmark files of ../shared/data/text.

The answer files are stand-ins written the way each tool writes them (same keys, nesting, csv layout):

* WSI-LLaVA ``WSI_LLAVA/llava/eval/model_vqa.py`` (yu5-kim/WSI-LLaVA @8714afc): jsonl, one
  ``json.dumps({"question_id", "image", "question", "answer", "T-answer", "metadata"})`` per line;
* WSI-LLaVA's first ``model_vqa.py`` (XinhengLyu/WSI-LLaVA @4935038 ``Code/eval/model_vqa.py``): jsonl
  ``{"question_id", "prompt", "text", "answer_id" (shortuuid), "metadata"}``;
* SlideChat ``xtuner/tools/test.py`` (uni-medical/SlideChat @aa1ff55): ``DataFrame.to_csv(path)`` of the columns
  ``ID, Slide, Tumor, Broad Category, Narrow Category, Question, A, B, C, D, Answer, Output`` with pandas' unnamed
  index column first (pandas is not installed here: the csv module writes the same bytes, ``\\n`` line ends,
  minimal quoting);
* WSI-LLaVA ``NLP_Metric.py`` input (``question_id``, ``T-answer``, ``Output``) and ``WSI-Metric/
  WSI-Relevance_stage_1.py`` input (csv ``question_id, model_output, metadata``).

Expected numbers are computed from the benchmark files directly (json), not through hwsi's parsers.
"""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import pytest

from hwsi.cli import main
from hwsi.eval.peer_predictions import PredictionFileError, read_peer_predictions
from hwsi.eval.score import ScoreConfig, load_benchmark, score_predictions

LETTERS = "ABCD"


@pytest.fixture(scope="module")
def wsi_bench(shared_data: Path) -> Path:
    return shared_data / "text" / "wsi-bench" / "WSI-Bench-test.jsonl"


@pytest.fixture(scope="module")
def slidebench(shared_data: Path) -> Path:
    return shared_data / "text" / "slidebench" / "slidebench_test.json"


@pytest.fixture(scope="module")
def wsi_vqa(shared_data: Path) -> Path:
    return shared_data / "text" / "wsi-vqa" / "WsiVQA_test.json"


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _wsi_llava_rows(bench: Path, keep, answer) -> list[dict]:
    """model_vqa.py @8714afc: one answer line per question it was given."""
    rows = [json.loads(line) for line in bench.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [{"question_id": r["question_id"], "image": r["image"], "question": r["question"], "answer": answer(r),
             "T-answer": r["T-answer"], "metadata": r["metadata"]} for r in rows if keep(r)]


def _slidechat_csv(path: Path, samples: list[dict], outputs: list[str], ids: list[int]) -> Path:
    """SlideChat test.py: df_test_output.to_csv(path) -- pandas index column (header ''), NaN -> ''."""
    cols = ["ID", "Slide", "Tumor", "Broad Category", "Narrow Category", "Question", "A", "B", "C", "D", "Answer",
            "Output"]
    with path.open("w", encoding="utf-8", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(["", *cols])
        for i, (s, out, qid) in enumerate(zip(samples, outputs, ids, strict=True)):
            broad, _, narrow = s["category"].partition(" - ")
            opts = [c.split(") ", 1)[1] for c in s["choices"]]
            w.writerow([i, qid, s["slide_id"], "BRCA", broad, narrow, s["question"], *opts, s["answer"], out])
    return path


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(["score", *argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


# ------------------------------------------------------------------------------------------------- WSI-Bench
def test_wsi_llava_true_answers_on_a_subset_score_one_and_count_the_rest(wsi_bench: Path, tmp_path: Path,
                                                                         capsys) -> None:
    raw = [json.loads(x) for x in wsi_bench.read_text(encoding="utf-8").splitlines() if x.strip()]
    keep = {r["question_id"] for r in raw if r["metadata"] in ("Morphology", "Prognosis")}
    keep |= {r["question_id"] for r in raw if r["metadata"] == "Report"}
    keep = set(sorted(keep)[::7])
    pred = _jsonl(tmp_path / "WSI-Bench-answers.jsonl",
                  _wsi_llava_rows(wsi_bench, lambda r: r["question_id"] in keep, lambda r: r["T-answer"]))
    out = tmp_path / "out"
    rc, stdout, err = _run(capsys, str(pred), "--data", str(wsi_bench), "--out", str(out), "--no-meteor")
    assert rc == 0, err
    answers = json.loads((out / "answers.json").read_text())["metrics"]
    assert answers["matched"] == len(keep) and answers["missing"] == len(raw) - len(keep)
    assert answers["unknown"] == answers["duplicates"] == answers["empty_answers"] == 0
    vqa = json.loads((out / "vqa.json").read_text())
    closed = vqa["metrics"]["model"]["closed"]
    assert closed["accuracy"] == 1.0 and closed["parse_failures"] == 0 and closed["n"] > 50
    assert vqa["metrics"]["coverage"]["answered"] == sum(1 for r in raw if r["question_id"] in keep
                                                         and r["metadata"] != "Report")
    report = json.loads((out / "report.json").read_text())["metrics"]["model"]
    assert report["BLEU-4"] == pytest.approx(1.0) and report["ROUGE-L"] == pytest.approx(1.0)
    assert report["convention"] == "wsi-bench"
    for name in ("answers.md", "vqa.md", "report.md", "caption.md", "summary.md"):
        assert (out / name).is_file()
    assert json.loads((out / "caption.json").read_text())["skipped"].startswith("no answers for the 208 caption")
    assert "| WSI-Bench-answers.jsonl | 1.000 | 0.000 |" in stdout  # the printed VQA table
    assert f"| missing (no answer) | {len(raw) - len(keep)} |" in stdout
    assert "WSI-Precision and WSI-Relevance" in (out / "report.md").read_text()


def test_yes_no_answers_are_read_by_their_leading_word(wsi_bench: Path) -> None:
    """WSI-Bench answers its polar questions in sentences: "Yes, ... There is no evidence of ..." names both options,
    which parse_choice alone calls ambiguous; the leading word decides (as it resolves the references)."""
    from hwsi.eval.vqa import parse_choice, parse_item_choice

    items = [it for it in load_benchmark(wsi_bench).items if it.metadata.get("option_kind") == "yes-no"
             and it.answer_index is not None]
    both = [it for it in items if parse_choice(it.answer, it.options) is None]
    assert len(both) >= 20  # real references that name yes and no, or start with "Indeed" / "Correct"
    assert all(parse_item_choice(it.answer, it) == it.answer_index for it in items)
    assert parse_item_choice("No. There is no necrosis, yes.", items[0]) == 1


def test_first_wsi_llava_layout_with_a_fixed_answer_scores_the_share_of_that_answer(wsi_bench: Path,
                                                                                    tmp_path: Path) -> None:
    """Every Morphology yes/no question answered "No." (Code/eval/model_vqa.py layout, answer in "text")."""
    raw = [json.loads(x) for x in wsi_bench.read_text(encoding="utf-8").splitlines() if x.strip()]
    morph = [r for r in raw if r["metadata"] == "Morphology" and r["question"].split()[0] in ("Is", "Are", "Does",
                                                                                              "Do", "Can", "Has")]
    rows = [{"question_id": r["question_id"], "prompt": r["question"], "text": "No.", "answer_id": "9XgZ5oQv8eN2rT3kLm7pA1",
             "metadata": r["metadata"]} for r in morph]
    pred = _jsonl(tmp_path / "answer.jsonl", rows)
    preds = read_peer_predictions(pred)
    assert preds.fmt == "llava" and preds.answer_key == "text"
    res = {r.name: r for r in score_predictions(preds, load_benchmark(wsi_bench), ScoreConfig(meteor=False))}
    closed = res["vqa"].metrics["model"]["closed"]
    # independent expectation: references that start with a "no" word among those that start with yes or no
    no_words, yes_words = ("no", "neither", "none", "not", "false"), ("yes", "indeed", "absolutely", "correct", "true")
    first = [r["T-answer"].split()[0].strip(",.").lower() for r in morph]
    n_no = sum(w in no_words or r["T-answer"].lower().startswith("there is no") for w, r in zip(first, morph))
    n_yes = sum(w in yes_words for w in first)
    assert closed["n"] == pytest.approx(n_no + n_yes, abs=3)
    assert closed["accuracy"] == pytest.approx(n_no / (n_no + n_yes), abs=0.01)
    assert closed["parse_failures"] == 0


# ---------------------------------------------------------------------------------------------- SlideBench
def test_slidechat_csv_joins_by_slide_and_question_and_scores_one(slidebench: Path, tmp_path: Path,
                                                                  capsys) -> None:
    samples = json.loads(slidebench.read_text(encoding="utf-8"))["samples"]
    sub = samples[:300]
    outputs = [(f"{s['answer']}. " + s["choices"][LETTERS.index(s["answer"])].split(") ", 1)[1]) if i % 2 else
               s["answer"] for i, s in enumerate(sub)]
    pred = _slidechat_csv(tmp_path / "output_my_test.csv", sub, outputs, ids=[1000 + i for i in range(len(sub))])
    out = tmp_path / "out"
    rc, stdout, err = _run(capsys, str(pred), "--data", str(slidebench), "--out", str(out))
    assert rc == 0, err
    answers = json.loads((out / "answers.json").read_text())["metrics"]
    assert answers["matched"] == 300 and answers["matched_by_content"] == 300
    assert answers["missing"] == len(samples) - 300 and answers["unknown"] == 0
    closed = json.loads((out / "vqa.json").read_text())["metrics"]["model"]["closed"]
    assert closed["accuracy"] == 1.0 and closed["n"] == 300 and closed["chance"] == 0.25
    assert "read as slidechat-csv: id 'ID', answer 'Output'" in stdout
    assert not (out / "report.json").exists()  # SlideBench has no report items


def test_slidechat_fixed_wrong_option_and_shuffled_answers(slidebench: Path, tmp_path: Path) -> None:
    samples = json.loads(slidebench.read_text(encoding="utf-8"))["samples"]
    bench = load_benchmark(slidebench)
    share = {c: sum(s["answer"] == c for s in samples) / len(samples) for c in LETTERS}
    fixed = _slidechat_csv(tmp_path / "fixed.csv", samples, ["A"] * len(samples), list(range(len(samples))))
    res = {r.name: r for r in score_predictions(read_peer_predictions(fixed), bench)}
    assert res["vqa"].metrics["model"]["closed"]["accuracy"] == pytest.approx(share["A"])
    # a shuffled mapping: each question gets the true letter of another question -> sum of squared shares
    letters = [s["answer"] for s in samples]
    random.Random(0).shuffle(letters)
    shuffled = _slidechat_csv(tmp_path / "shuffled.csv", samples, letters, list(range(len(samples))))
    acc = score_predictions(read_peer_predictions(shuffled), bench)[1].metrics["model"]["closed"]["accuracy"]
    expected = sum(p * p for p in share.values())
    assert abs(acc - expected) < 0.05 and acc < 0.45


def test_slidechat_csv_joins_the_released_slidebench_csv_by_id(slidebench: Path, tmp_path: Path) -> None:
    """The released SlideBench-VQA csv (columns of hwsi.data.SLIDEBENCH_CSV_COLUMNS; stand-in built from the json
    copy's questions) carries the ``ID`` SlideChat copies into its output: the join is by id."""
    samples = json.loads(slidebench.read_text(encoding="utf-8"))["samples"][:120]
    bench_csv = tmp_path / "SlideBench-VQA(TCGA).csv"
    with bench_csv.open("w", encoding="utf-8", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(["ID", "Slide", "Tumor", "Broad Category", "Narrow Category", "Question", "A", "B", "C", "D",
                    "Answer"])
        for i, s in enumerate(samples):
            broad, _, narrow = s["category"].partition(" - ")
            w.writerow([i + 1, s["slide_id"], "BRCA", broad, narrow, s["question"],
                        *[c.split(") ", 1)[1] for c in s["choices"]], s["answer"]])
    # the model answered the first 100 with the true letter, the last 20 with the next letter (wrong)
    outs = [s["answer"] if i < 100 else LETTERS[(LETTERS.index(s["answer"]) + 1) % 4] for i, s in enumerate(samples)]
    pred = _slidechat_csv(tmp_path / "out.csv", samples, outs, ids=[i + 1 for i in range(len(samples))])
    res = score_predictions(read_peer_predictions(pred), load_benchmark(bench_csv))
    assert res[0].metrics["matched"] == 120 and res[0].metrics["matched_by_content"] == 0
    assert res[1].metrics["model"]["closed"]["accuracy"] == pytest.approx(100 / 120)


# ------------------------------------------------------------------------------------------------- WSI-VQA
def test_wsi_vqa_generic_csv_closed_and_open(wsi_vqa: Path, tmp_path: Path) -> None:
    bench = load_benchmark(wsi_vqa)
    raw = json.loads(wsi_vqa.read_text(encoding="utf-8"))
    path = tmp_path / "preds.csv"
    with path.open("w", encoding="utf-8", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(["question_id", "prediction"])
        for it, r in zip(bench.items, raw, strict=True):
            w.writerow([it.question_id, r["Answer"]])
    res = {r.name: r for r in score_predictions(read_peer_predictions(path), bench, ScoreConfig(meteor=False))}
    m = res["vqa"].metrics["model"]
    n_closed_resolvable = sum(1 for r in raw if r.get("Choice") and r["Answer"] in r["Choice"])
    assert m["closed"]["accuracy"] == 1.0 and m["closed"]["n"] == n_closed_resolvable
    assert m["open"]["token_f1"] == pytest.approx(1.0) and m["open"]["n"] == sum(1 for r in raw if not r.get("Choice"))


# ------------------------------------------------------------------------------------- bad answers, counted
def test_duplicates_unknown_empty_and_unparseable_answers_are_counted(slidebench: Path, tmp_path: Path) -> None:
    bench = load_benchmark(slidebench)
    items = bench.items[:10]
    rows = [{"question_id": it.question_id, "prediction": LETTERS[it.answer_index or 0]} for it in items[:6]]
    rows += [{"question_id": items[0].question_id, "prediction": "D"}]  # duplicate, different answer
    rows += [{"question_id": items[1].question_id, "prediction": rows[1]["prediction"]}]  # duplicate, same
    rows += [{"question_id": "not-a-question", "prediction": "A"}]  # unknown id
    rows += [{"question_id": items[6].question_id, "prediction": ""}]  # empty
    rows += [{"question_id": items[7].question_id, "prediction": None}]  # null -> empty
    rows += [{"question_id": items[8].question_id, "prediction": "I cannot tell from this slide."}]  # unparseable
    rows += [{"prediction": "B"}]  # no id
    preds = read_peer_predictions(_jsonl(tmp_path / "p.jsonl", rows))
    res = score_predictions(preds, bench, ScoreConfig(meteor=False))
    js = res[0].metrics
    assert (js["matched"], js["duplicates"], js["conflicting_duplicates"]) == (9, 2, 1)
    assert (js["unknown"], js["empty_answers"], js["without_id"]) == (1, 2, 1)
    assert js["missing"] == len(bench.items) - 9 and js["unknown_ids"] == ["not-a-question"]
    closed = res[1].metrics["model"]["closed"]
    assert closed["n"] == 9 and closed["n_correct"] == 6 and closed["parse_failures"] == 3
    assert closed["parse_failure_rate"] == pytest.approx(3 / 9)
    wrong = score_predictions(preds, bench, ScoreConfig(meteor=False, missing="wrong"))[1].metrics["model"]["closed"]
    assert wrong["n"] == len(bench.items) and wrong["accuracy"] == pytest.approx(6 / len(bench.items))


def test_layouts_are_told_apart(tmp_path: Path) -> None:
    nlp = read_peer_predictions(_jsonl(tmp_path / "a.jsonl", [{"question_id": "q1", "T-answer": "x", "Output": "y"}]))
    assert (nlp.fmt, nlp.answer_key, nlp.answers[0].answer) == ("nlp-metric", "Output", "y")
    rel = tmp_path / "model_outputs.csv"
    rel.write_text("question_id,model_output,metadata\nq1,\"A report, with a comma.\",Report\n", encoding="utf-8")
    r = read_peer_predictions(rel)
    assert (r.fmt, r.answers[0].answer) == ("wsi-relevance-csv", "A report, with a comma.")
    d = tmp_path / "d.json"
    d.write_text(json.dumps({"q1": "yes", "q2": None}), encoding="utf-8")
    g = read_peer_predictions(d)
    assert g.fmt == "generic" and [a.answer for a in g.answers] == ["yes", ""]
    own = tmp_path / "vqa.json"
    own.write_text(json.dumps({"task": "vqa", "predictions": [{"id": "q1", "slide_id": "s", "question": "Q?",
                                                               "prediction": "B"}]}), encoding="utf-8")
    h = read_peer_predictions(own)
    assert (h.fmt, h.answers[0].question_id, h.answers[0].content) == ("hwsi-eval", "q1", ("s", "Q?"))
    k = read_peer_predictions(_jsonl(tmp_path / "k.jsonl", [{"qid_x": "q1", "resp": "A"}]), id_key="qid_x",
                              answer_key="resp")
    assert (k.answers[0].question_id, k.answers[0].answer) == ("q1", "A")


# ---------------------------------------------------------------------------------- malformed files: exit 2
@pytest.mark.parametrize("name, text, says", [
    ("bad.jsonl", '{"question_id": "q1", "answer": "A"}\n{"question_id": \n', "(line 2, column 17): not valid JSON"),
    ("num.json", "42", "expected a list of answer records"),
    ("list.jsonl", '["q1", "A"]\n', "(line 1): expected an object per answer, got list"),
    ("noans.csv", "question_id,slide\nq1,s1\n", "no answer column"),
    ("noid.jsonl", '{"answer": "A"}\n', "no question id column"),
    ("nested.jsonl", '{"question_id": "q1", "answer": {"text": "A"}}\n', "answer 'answer' is a dict"),
    ("empty.jsonl", "\n", "holds no answer records"),
])
def test_malformed_prediction_files_are_one_line_and_exit_2(name: str, text: str, says: str, slidebench: Path,
                                                            tmp_path: Path, capsys) -> None:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    rc, _, err = _run(capsys, str(path), "--data", str(slidebench), "--out", str(tmp_path / "o"))
    assert rc == 2
    assert len(err.strip().splitlines()) == 1 and str(path) in err and says in err, err
    assert not (tmp_path / "o").exists()


def test_wrong_benchmark_missing_files_and_bad_options_exit_2(slidebench: Path, wsi_bench: Path, tmp_path: Path,
                                                              capsys) -> None:
    raw = [json.loads(x) for x in wsi_bench.read_text(encoding="utf-8").splitlines()[:5]]
    pred = _jsonl(tmp_path / "p.jsonl", [{"question_id": r["question_id"], "answer": "x"} for r in raw])
    rc, _, err = _run(capsys, str(pred), "--data", str(slidebench), "--out", str(tmp_path / "o"))
    assert rc == 2 and "none of its 5 answers matches a question of" in err and "--data" in err
    rc, _, err = _run(capsys, str(tmp_path / "absent.jsonl"), "--data", str(slidebench), "--out", str(tmp_path / "o"))
    assert rc == 2 and "absent.jsonl: file not found" in err
    rc, _, err = _run(capsys, str(pred), "--data", str(tmp_path / "nobench.json"), "--out", str(tmp_path / "o"))
    assert rc == 2 and "nobench.json" in err
    rc, _, err = _run(capsys, str(pred), "--data", str(wsi_bench), "--convention", "bleu", "--out", str(tmp_path / "o"))
    assert rc == 2 and "convention" in err
    rc, _, err = _run(capsys, str(pred), "--data", str(wsi_bench), "--missing", "zero", "--out", str(tmp_path / "o"))
    assert rc == 2 and "missing" in err
    (tmp_path / "file").write_text("x")
    rc, _, err = _run(capsys, str(pred), "--data", str(wsi_bench), "--out", str(tmp_path / "file"))
    assert rc == 2 and "is an existing file, not a folder" in err
    with pytest.raises(PredictionFileError, match="unknown predictions format"):
        read_peer_predictions(pred, fmt="xlsx")


# ------------------------------------------------------------------------- SynthPath: facts; coco convention
@pytest.fixture(scope="module")
def synth_cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SynthPath cohort folder as hwsi.synth.cohort writes it (cohort.json + text/test.jsonl), 5 test slides."""
    from hwsi.synth.classes import DIAGNOSES, SlideClasses
    from hwsi.synth.text import bench_records, slide_text

    root = tmp_path_factory.mktemp("cohort")
    (root / "text").mkdir()
    slides, texts = [], []
    for i, dx in enumerate(DIAGNOSES):
        cls = SlideClasses(dx, "none" if dx == "benign" else ("focal", "extensive")[i % 2])
        facts = cls.facts()
        facts.update(n_tissue_regions=3, n_lesion_regions=1 if cls.extent == "focal" else 2)
        sid = f"synth_{i:04d}"
        slides.append({"slide_id": sid, "classes": cls.to_dict(), "label": cls.label, "split": "test", "facts": facts})
        texts.append(slide_text(sid, facts, seed=0))
    (root / "cohort.json").write_text(json.dumps({"seed": 0, "n": len(slides), "slides": slides}))
    (root / "text" / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in bench_records(texts, 0)))
    return root


def test_synthpath_reports_get_fact_accuracy(synth_cohort: Path, tmp_path: Path, capsys) -> None:
    recs = [json.loads(x) for x in (synth_cohort / "text" / "test.jsonl").read_text().splitlines()]
    reports = [r for r in recs if r["metadata"] == "Report"]
    true = _jsonl(tmp_path / "true.jsonl", [{"question_id": r["question_id"], "image": r["image"],
                                             "question": r["question"], "answer": r["T-answer"],
                                             "T-answer": r["T-answer"], "metadata": r["metadata"]} for r in reports])
    rc, stdout, err = _run(capsys, str(true), "--data", str(synth_cohort), "--out", str(tmp_path / "a"),
                           "--no-meteor")
    assert rc == 0, err
    facts = json.loads((tmp_path / "a" / "report.json").read_text())["metrics"]["model"]["facts"]
    assert facts["mean_accuracy"] == 1.0 and facts["all_correct"] == 1.0
    assert "| true.jsonl | 1.000 | 1.000 | 1.000 | 1.000 | 1.000 | - | 1.000 | 1.000 |" in stdout
    # each slide given the next slide's report (five different diagnoses): the diagnosis fact is always wrong
    rolled = [dict(r, answer=reports[(i + 1) % len(reports)]["T-answer"]) for i, r in
              enumerate(json.loads(x) for x in true.read_text().splitlines())]
    _jsonl(tmp_path / "rolled.jsonl", rolled)
    rc, _, err = _run(capsys, str(tmp_path / "rolled.jsonl"), "--data", str(synth_cohort), "--out",
                      str(tmp_path / "b"), "--no-meteor")
    assert rc == 0, err
    facts = json.loads((tmp_path / "b" / "report.json").read_text())["metrics"]["model"]["facts"]
    assert facts["facts"]["diagnosis"]["accuracy"] == 0.0 and facts["all_correct"] == 0.0


def test_coco_convention_gives_cider(synth_cohort: Path, tmp_path: Path, capsys) -> None:
    recs = [json.loads(x) for x in (synth_cohort / "text" / "test.jsonl").read_text().splitlines()]
    caps = [{"question_id": r["question_id"], "answer": r["T-answer"]} for r in recs if r["metadata"] == "Caption"]
    pred = _jsonl(tmp_path / "caps.jsonl", caps)
    rc, _, err = _run(capsys, str(pred), "--data", str(synth_cohort), "--convention", "coco", "--coco-tokenizer",
                      "simple", "--no-meteor", "--out", str(tmp_path / "o"))
    assert rc == 0, err
    m = json.loads((tmp_path / "o" / "caption.json").read_text())["metrics"]["model"]
    assert m["convention"] == "coco" and m["tokenizer"].startswith("simple") and "CIDEr" in m
    assert m["BLEU-4"] == pytest.approx(1.0, abs=1e-6) and m["ROUGE-L"] == pytest.approx(1.0)
    table = (tmp_path / "o" / "caption.md").read_text()
    assert "| METEOR | CIDEr | fact acc (mean) |" in table
