"""WSI-LLaVA's per-task WSI-Bench files (../shared/data/text/wsi-llava, XinhengLyu/WSI-LLaVA @4935038 dataset/) as
closed items, and bad records: per-record errors, skipped on request with their count and where
(docs/formats-checkpoints-records.md)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from hwsi.data import QAItem, RecordError, detect_format, load_records, load_records_report, parse_options_from_question
from hwsi.data.choices import resolve_lettered_answer
from hwsi.eval.vqa import vqa_accuracy

STAGING_1814 = "record 1814 (id=TCGA-D3-A3C1-06Z-00-DX1.F6C5DABC-9FEB-4A55-A764-6958046CFE39-1), turn 0"


def _raw(path: Path) -> list[dict]:
    return json.loads(path.read_text())


@pytest.mark.parametrize("name, n, category, closed", [
    ("Diagnosis_choice_test.json", 413, "Diagnosis", True),
    ("Morphology_choice_test.json", 682, "Morphology", True),
    ("Staging_test.json", 191, "Staging", False),
    ("1_Report_test.json", 208, "Report", False),
])
def test_wsi_llava_test_files(shared_data: Path, name: str, n: int, category: str, closed: bool) -> None:
    path = shared_data / "text/wsi-llava" / name
    assert detect_format(path) == "wsi-llava-test"
    items = load_records(path)
    raw = _raw(path)
    assert len(items) == n and all(isinstance(r, QAItem) for r in items)
    assert [r.question_id for r in items] == [x["id"] for x in raw]
    assert {r.category for r in items} == {category}  # type: ignore[union-attr]
    assert all(r.slide_id.startswith("TCGA-") and not r.slide_id.endswith(".pt") for r in items)
    assert all("<image>" not in r.question for r in items)  # type: ignore[union-attr]
    if not closed:
        assert all(r.options is None and r.answer == x["conversations"][1]["value"]  # type: ignore[union-attr]
                   for r, x in zip(items, raw, strict=True))
        return
    for r, x in zip(items, raw, strict=True):
        assert isinstance(r, QAItem) and r.options is not None and len(r.options) == 4
        letter = x["conversations"][1]["value"].strip()[0]
        assert r.metadata["answer_letter"] == letter and r.answer_index == "ABCD".index(letter)
        assert r.answer == r.options[r.answer_index]
        stem = r.metadata["question_stem"]
        assert stem and " A) " not in f" {stem} " and stem.endswith("?")
        for o in r.options:  # every option's text is in the question, in order, after its letter
            assert o and " B) " not in o
        assert r.question.index(f"A) {r.options[0]}") < r.question.index(f"D) {r.options[3]}")


def test_wsi_llava_closed_items_can_be_scored(shared_data: Path) -> None:
    items = [r for r in load_records(shared_data / "text/wsi-llava/Diagnosis_choice_test.json")
             if isinstance(r, QAItem)]
    gold = [r.metadata["answer_letter"] for r in items]
    perfect = vqa_accuracy(gold, items)
    assert perfect["accuracy"] == 1.0 and perfect["n"] == 413 and perfect["no_gold"] == 0
    by_text = vqa_accuracy([r.answer for r in items], items)
    assert by_text["accuracy"] == 1.0
    always_a = vqa_accuracy(["A"] * len(items), items)
    assert always_a["n_correct"] == 31  # the file's answer letters: C 193, B 146, D 43, A 31
    assert Counter(gold) == {"C": 193, "B": 146, "D": 43, "A": 31}


def test_answers_with_stray_characters_resolve(shared_data: Path) -> None:
    raw = _raw(shared_data / "text/wsi-llava/Morphology_choice_test.json")
    odd = [i for i, x in enumerate(raw) if x["conversations"][1]["value"] == 'B "']
    assert len(odd) == 1
    items = load_records(shared_data / "text/wsi-llava/Morphology_choice_test.json")
    assert items[odd[0]].answer_index == 1  # type: ignore[union-attr]
    opts = ["T1 N0 M0", "T2 N1 M0", "T3 N0 M0"]
    for answer, idx in [("C ```", 2), ("(b).", 1), ("B) T2 N1 M0", 1), ("t3 n0 m0", 2), ("D", None), ("B) T3", None),
                        ("T1", None)]:
        assert resolve_lettered_answer(answer, opts) == idx, answer


def test_inline_bare_options() -> None:
    stem, opts, kind = parse_options_from_question("What stage? A) T1 N0 M0 B) T2 (see B) above) C) T3 N1 M0")
    assert kind == "lettered" and stem == "What stage?"
    assert opts == ["T1 N0 M0", "T2 (see B) above)", "T3 N1 M0"]
    stem, opts, kind = parse_options_from_question("Which TNM stage? A. T1 N1 M0 B. T2 N0 M0 C. T2 N1 M0")
    assert kind == "lettered" and opts == ["T1 N1 M0", "T2 N0 M0", "T2 N1 M0"]
    assert parse_options_from_question("Is vitamin A) relevant here?")[2] == "yes-no"


# ------------------------------------------------------------------------------------------------ bad records
def test_staging_train_fails_on_record_1814_by_default(shared_data: Path) -> None:
    path = shared_data / "text/wsi-llava/Staging_choice_train.json"
    with pytest.raises(RecordError) as err:
        load_records(path)
    assert str(err.value) == (f"{path} ({STAGING_1814}): turns must alternate human/gpt starting with human; "
                              "got 'gpt' here")


def test_staging_train_skips_record_1814_on_request(shared_data: Path) -> None:
    path = shared_data / "text/wsi-llava/Staging_choice_train.json"
    loaded = load_records_report(path, skip_bad=True)
    assert loaded.format == "wsi-bench-train" and len(loaded.records) == 2749
    assert loaded.skipped_where == [STAGING_1814]
    assert loaded.summary() == ("2749 records (wsi-bench-train); skipped 1 bad record(s): "
                                f"{STAGING_1814}: turns must alternate human/gpt starting with human; got 'gpt' here")
    assert len(load_records(path, skip_bad=True)) == 2749
    # the same file read as closed items: 2749 four-option items, record 213's "A. x B. y" options included
    closed = load_records_report(path, fmt="wsi-llava-test", skip_bad=True)
    assert closed.skipped_where == [STAGING_1814]
    assert all(isinstance(r, QAItem) and r.options and len(r.options) == 4 and r.answer_index is not None
               for r in closed.records)
    assert Counter(r.metadata["answer_letter"] for r in closed.records) == {"B": 1103, "C": 919, "A": 550, "D": 177}


def _write(path: Path, data: object) -> Path:
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize("fmt, body, bad_where", [
    ("wsi-vqa", [{"Id": "TCGA-A1-A0SB", "Question": "q?", "Answer": "a"}, {"Id": "TCGA-A1-A0SD", "Answer": "x"}],
     "record 1"),
    ("slidebench-json", {"samples": [{"slide_id": "TCGA-A", "question": "q", "choices": ["A) x", "B) y"],
                                      "answer": "E", "category": "c"},
                                     {"slide_id": "TCGA-B", "question": "q", "choices": ["A) x", "B) y"],
                                      "answer": "B", "category": "c"}]}, "sample 0"),
    ("histgen", {"train": [{"id": "TCGA-A", "report": "r"}], "test": [{"id": "TCGA-B"}]}, "test[0] (id=TCGA-B)"),
    ("wsi-llava-test", [{"id": "x-1", "image": "T/TCGA-A.pt", "conversations": [
        {"from": "human", "value": "<image>\nWhich? A) p B) q"}, {"from": "gpt", "value": "Z"}]},
        {"id": "x-2", "image": "T/TCGA-B.pt", "conversations": [
            {"from": "human", "value": "<image>\nWhich? A) p B) q"}, {"from": "gpt", "value": "q"}]}],
     "record 0 (id=x-1)"),
])
def test_every_format_skips_bad_records_on_request(tmp_path: Path, fmt: str, body: object, bad_where: str) -> None:
    path = _write(tmp_path / "f.json", body)
    with pytest.raises(RecordError) as err:
        load_records(path, fmt)
    assert str(err.value).startswith(f"{path} ({bad_where}): ")
    loaded = load_records_report(path, fmt, skip_bad=True)
    assert len(loaded.records) == 1 and loaded.skipped_where == [bad_where]
    assert "skipped 1 bad record(s)" in loaded.summary()


def test_jsonl_and_csv_skip_bad_lines(tmp_path: Path) -> None:
    good = {"question_id": 1, "image": "T/TCGA-A.pt", "question": "Is it?", "T-answer": "Yes.", "metadata": "Grade"}
    bad = {"question_id": 2, "image": "T/TCGA-B.pt", "question": "Is it?", "metadata": "Grade"}
    p = tmp_path / "t.jsonl"
    p.write_text("\n".join(json.dumps(x) for x in (good, bad, good | {"question_id": 3})) + "\n")
    with pytest.raises(RecordError, match=r"t.jsonl \(line 2 \(question_id=2\)\): missing field 'T-answer'"):
        load_records(p)
    assert load_records_report(p, skip_bad=True).skipped_where == ["line 2 (question_id=2)"]
    c = tmp_path / "sb.csv"
    head = "ID,Slide,Tumor,Broad Category,Narrow Category,Question,A,B,C,D,Answer\n"
    c.write_text(head + "1,TCGA-A,BRCA,x,y,q?,a,b,c,d,B\n2,TCGA-B,BRCA,x,y,q?,a,b,c,d,F\n")
    with pytest.raises(RecordError, match=r"sb.csv \(line 3\): answer 'F' is not one of the option letters A..D"):
        load_records(c)
    loaded = load_records_report(c, skip_bad=True)
    assert [r.record_id for r in loaded.records] == ["1"] and loaded.skipped_where == ["line 3"]


def test_a_broken_file_is_never_skipped(tmp_path: Path) -> None:
    p = tmp_path / "x.json"
    p.write_text("[{")
    with pytest.raises(RecordError, match="x.json"):
        load_records(p, skip_bad=True)


# ------------------------------------------------------------------------------------------------ every shared file
def test_every_shared_text_file_loads(shared_data: Path) -> None:
    from hwsi.eval.classification import load_prompt_sets

    text = shared_data / "text"
    seen = []
    for path in sorted(p for p in text.rglob("*") if p.is_file()):
        seen.append(path.relative_to(text).as_posix())
        if path.parent.name == "prompts":
            assert load_prompt_sets(path), path
            continue
        skip = path.name == "Staging_choice_train.json"  # its record 1814 is bad (the tests above)
        loaded = load_records_report(path, skip_bad=skip)
        assert loaded.records and len(loaded.skipped) == int(skip), path
    assert len(seen) >= 16, seen  # 6 prompt files, 10 record files today


# ------------------------------------------------------------------------------------------------ train / eval
def test_train_text_skips_bad_records_when_configured(shared_data: Path, tmp_path: Path) -> None:
    from hwsi.train.config import DataConfig
    from hwsi.train.data import load_train_text

    path = str(shared_data / "text/wsi-llava/Staging_choice_train.json")
    with pytest.raises(RecordError, match="record 1814"):
        load_train_text(tmp_path, DataConfig(records=path), need_stores=False)
    text = load_train_text(tmp_path, DataConfig(records=path, skip_bad_records=True), need_stores=False)
    assert len(text.samples) == 2749 and text.skipped_records == [STAGING_1814]


def test_eval_cli_bad_record_one_line_exit_2_and_skip(shared_data: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture) -> None:
    from hwsi.cli import main

    data = shared_data / "text/wsi-llava/Staging_choice_train.json"
    (tmp_path / "job" / "stores").mkdir(parents=True)
    args = ["eval", "--data", str(data), "--model", str(tmp_path / "no-run"), "--job", str(tmp_path / "job"),
            "--out", str(tmp_path / "ev")]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {data} ({STAGING_1814}): turns must alternate human/gpt starting with human; got 'gpt' "
                   "here"]
    assert main(args + ["--skip-bad-records"]) == 2  # goes on to the (missing) run folder
    err = capsys.readouterr().err
    assert (f"warning: {data}: 2749 records (wsi-bench-train); skipped 1 bad record(s): {STAGING_1814}: "
            in err)
    assert "no-run" in err.strip().splitlines()[-1]


def test_train_and_eval_offer_the_option() -> None:
    from typer.testing import CliRunner

    from hwsi.cli import app

    for cmd in ("train", "eval"):
        res = CliRunner().invoke(app, [cmd, "--help"], env={"COLUMNS": "200"})
        assert res.exit_code == 0 and "--skip-bad-records" in res.output, cmd
