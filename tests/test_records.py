"""Record loaders: every record of the real text files in ../shared/data/text, plus small hand-written cases."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from hwsi.errors import HwsiError
from hwsi.data import (
    HISTGEN_REPORT_PROMPT,
    WSI_BENCH_CATEGORIES,
    Conversation,
    QAItem,
    RecordError,
    detect_format,
    load_records,
    match_records_to_stores,
    parse_options_from_question,
    slide_id_from_image_ref,
    slide_ids_from_image_ref,
    strip_image_token,
    tcga_barcode,
)


# ------------------------------------------------------------------------------------------ real files, all records
def test_wsi_bench_test_every_record(shared_data: Path) -> None:
    path = shared_data / "text/wsi-bench/WSI-Bench-test.jsonl"
    assert detect_format(path) == "wsi-bench-test"
    recs = load_records(path)
    assert len(recs) == 2838 and all(isinstance(r, QAItem) for r in recs)
    cats = Counter(r.category for r in recs)
    assert cats == {
        "Morphology": 950, "Feature": 208, "Classification": 208, "Report": 208, "Caption": 208, "cellular": 207,
        "tissue": 204, "Stage": 191, "infiltration": 182, "Grade": 128, "Subtype": 48, "Treatment": 48,
        "Prognosis": 48,
    }
    assert set(cats) == set(WSI_BENCH_CATEGORIES)
    assert len({r.question_id for r in recs}) == 2838
    assert len({r.slide_id for r in recs}) == 527
    assert all(r.source == "wsi-bench" and r.slide_id.startswith("TCGA-") and not r.slide_id.endswith(".pt")
               for r in recs)
    first = recs[0]
    assert first.slide_id == "TCGA-BH-A18U-01Z-00-DX1.63940315-59BC-462B-87A8-2BBB33C9503E"
    assert first.metadata["image"].startswith("TCGA-BRCA/")
    # closed-ended options parsed out of the question text
    kinds = Counter((r.category, r.metadata["option_kind"]) for r in recs if r.options)
    assert kinds == {("Morphology", "yes-no"): 866, ("Prognosis", "either-or"): 48, ("Grade", "yes-no"): 1}
    prog = [r for r in recs if r.category == "Prognosis"]
    assert all(r.options == ["good", "poor"] for r in prog)
    resolved = Counter((r.metadata["option_kind"], r.answer_index) for r in recs if r.options)
    assert resolved == {("yes-no", 0): 717, ("yes-no", 1): 89, ("yes-no", None): 61,
                        ("either-or", 1): 29, ("either-or", 0): 14, ("either-or", None): 5}
    for r in prog:
        if r.answer_index is not None:
            assert r.options[r.answer_index] in r.answer.lower()
    assert all(r.options is None for r in recs if r.category in ("Report", "Caption", "Treatment"))


def test_wsi_bench_report_only(shared_data: Path) -> None:
    recs = load_records(shared_data / "text/wsi-bench/WSI-Bench-Report-only.jsonl")
    assert len(recs) == 208
    assert {r.category for r in recs} == {"Report"}  # type: ignore[union-attr]
    full = load_records(shared_data / "text/wsi-bench/WSI-Bench-test.jsonl")
    reports = {r.question_id: r.answer for r in full if r.category == "Report"}  # type: ignore[union-attr]
    assert {r.question_id: r.answer for r in recs} == reports  # type: ignore[union-attr]


def test_slidebench_every_question(shared_data: Path) -> None:
    path = shared_data / "text/slidebench/slidebench_test.json"
    assert detect_format(path) == "slidebench-json"
    recs = load_records(path)
    assert len(recs) == 1494 and all(isinstance(r, QAItem) for r in recs)
    assert len({r.slide_id for r in recs}) == 591
    assert len({r.question_id for r in recs}) == 1494
    assert all(r.options is not None and len(r.options) == 4 for r in recs)  # type: ignore[union-attr]
    letters = Counter(r.metadata["answer_letter"] for r in recs)
    assert letters == {"B": 618, "C": 540, "A": 224, "D": 112}
    assert all(r.answer == r.options[r.answer_index] for r in recs)  # type: ignore[union-attr,index]
    assert not any(o[:3] in ("A) ", "B) ", "C) ", "D) ") for r in recs for o in r.options)  # type: ignore[union-attr]
    cats = Counter(r.category for r in recs)  # type: ignore[union-attr]
    assert len(cats) == 13 and cats["Diagnosis - Disease Classification"] == 359
    assert sum(v for k, v in cats.items() if k.startswith("Clinical")) == 101
    r0 = recs[0]
    assert r0.slide_id == "TCGA-05-4244-01Z-00-DX1" and r0.answer == "Papillary adenocarcinoma"  # type: ignore[union-attr]


def test_wsi_vqa_every_record(shared_data: Path) -> None:
    path = shared_data / "text/wsi-vqa/WsiVQA_test.json"
    assert detect_format(path) == "wsi-vqa"
    recs = load_records(path)
    assert len(recs) == 735
    closed = [r for r in recs if r.options]  # type: ignore[union-attr]
    assert len(closed) == 390 and Counter(len(r.options) for r in closed) == {4: 388, 2: 2}  # type: ignore[union-attr]
    assert all(r.answer_index is not None and r.options[r.answer_index] == r.answer for r in closed)  # type: ignore
    assert Counter(r.category for r in recs) == {"closed": 390, "open": 345}  # type: ignore[union-attr]
    # WSI-VQA names TCGA patients, not slides
    assert len({r.slide_id for r in recs}) == 86
    assert all(len(r.slide_id) == 12 and tcga_barcode(r.slide_id) == (r.slide_id, r.slide_id) for r in recs)


def test_slidechat_every_record(shared_data: Path) -> None:
    path = shared_data / "text/slidechat/train_data_example.json"
    assert detect_format(path) == "slidechat"
    recs = load_records(path)
    assert len(recs) == 3 and all(isinstance(r, Conversation) for r in recs)
    assert [r.slide_id for r in recs] == [
        "TCGA-A7-A0CJ-01Z-00-DX2", "TCGA-AR-A255-01Z-00-DX1", "TCGA-A7-A6VV-01Z-00-DX2"]
    for r in recs:
        assert [t.role for t in r.turns] == ["human", "gpt"]  # type: ignore[union-attr]
        assert "<image>" in r.turns[0].text and "<image>" not in strip_image_token(r.turns[0].text)  # type: ignore
        assert r.source == "slidechat"


# ------------------------------------------------------------------------------------------------ hand-made files
def test_wsi_bench_train_llava(tmp_path: Path) -> None:
    data = [
        {"id": "a1", "image": "TCGA-BRCA/TCGA-AA-0001-01Z-00-DX1.abc-def.pt",
         "conversations": [{"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": "Tumour."},
                           {"from": "human", "value": "Grade?"}, {"from": "gpt", "value": "G2."}]},
    ]
    p = tmp_path / "train.json"
    p.write_text(json.dumps(data))
    assert detect_format(p) == "wsi-bench-train"
    (rec,) = load_records(p)
    assert isinstance(rec, Conversation)
    assert rec.slide_id == "TCGA-AA-0001-01Z-00-DX1.abc-def" and rec.source == "wsi-bench"
    assert [t.role for t in rec.turns] == ["human", "gpt", "human", "gpt"]
    assert strip_image_token(rec.turns[0].text) == "Describe."


def test_histgen(tmp_path: Path) -> None:
    data = {
        "train": [{"id": "TCGA-AA-0001-01Z-00-DX1.u1", "report": "Invasive ductal carcinoma.",
                   "image_path": ["feats/TCGA-AA-0001-01Z-00-DX1.u1.pt"], "split": "train"}],
        "val": [{"id": "TCGA-AA-0002-01Z-00-DX1.u2", "report": "Benign breast tissue.",
                 "image_path": ["feats/TCGA-AA-0002-01Z-00-DX1.u2.pt"], "split": "val"}],
        "test": [{"id": "TCGA-AA-0003-01Z-00-DX1.u3", "report": "Lobular carcinoma.",
                  "image_path": ["/x/TCGA-AA-0003-01Z-00-DX1.u3.svs"], "split": "test"}],
    }
    p = tmp_path / "annotation.json"
    p.write_text(json.dumps(data))
    assert detect_format(p) == "histgen"
    recs = load_records(p)
    assert [r.slide_id for r in recs] == [
        "TCGA-AA-0001-01Z-00-DX1.u1", "TCGA-AA-0002-01Z-00-DX1.u2", "TCGA-AA-0003-01Z-00-DX1.u3"]
    assert [r.metadata["split"] for r in recs] == ["train", "val", "test"]
    assert all(isinstance(r, QAItem) and r.question == HISTGEN_REPORT_PROMPT and r.category == "Report" for r in recs)
    (t,) = load_records(p, split="test")
    assert t.answer == "Lobular carcinoma."  # type: ignore[union-attr]
    with pytest.raises(RecordError, match="no split 'dev'"):
        load_records(p, split="dev")


def test_slidebench_csv(tmp_path: Path) -> None:
    p = tmp_path / "SlideBench-VQA(TCGA).csv"
    p.write_text(
        "ID,Slide,Tumor,Broad Category,Narrow Category,Question,A,B,C,D,Answer\n"
        "1,TCGA-AA-0001-01Z-00-DX1.csv,BRCA,Diagnosis,Grading,\"What grade, roughly?\",G1,G2,G3,G4,B\n"
        "2,TCGA-AA-0001-01Z-00-DX1.csv,BRCA,Microscopy,Tumor Characteristics,Necrosis?,Yes,No,,,A\n"
    )
    assert detect_format(p) == "slidebench-csv"
    a, b = load_records(p)
    assert isinstance(a, QAItem) and a.question == "What grade, roughly?" and a.options == ["G1", "G2", "G3", "G4"]
    assert a.answer_index == 1 and a.answer == "G2" and a.category == "Diagnosis - Grading"
    assert a.slide_id == "TCGA-AA-0001-01Z-00-DX1" and a.metadata["tumor"] == "BRCA"
    assert b.options == ["Yes", "No"] and b.answer_index == 0  # type: ignore[union-attr]
    bad = tmp_path / "bad.csv"
    bad.write_text("ID,Slide,Tumor,Broad Category,Narrow Category,Question,A,B,C,D,Answer\n"
                   "1,s.csv,BRCA,D,G,Q?,x,y,z,w,E\n")
    with pytest.raises(RecordError, match=r"bad\.csv \(line 2\).*'E'"):
        load_records(bad)
    nocol = tmp_path / "nocol.csv"
    nocol.write_text("ID,Slide,Question\n1,s,Q\n")
    with pytest.raises(RecordError, match="missing column"):
        load_records(nocol)


# ------------------------------------------------------------------------------------------------------ errors
def test_malformed_jsonl_names_file_and_line(tmp_path: Path) -> None:
    good = {"question_id": "q1", "image": "d/TCGA-AA-0001-01Z-00-DX1.x.pt", "question": "Q?", "T-answer": "A",
            "metadata": "Report"}
    p = tmp_path / "t.jsonl"
    p.write_text(json.dumps(good) + "\n\n" + '{"question_id": "q2", "image": \n')
    with pytest.raises(RecordError) as ei:
        load_records(p)
    assert str(p) in str(ei.value) and "line 3" in str(ei.value)
    assert isinstance(ei.value, HwsiError)
    p2 = tmp_path / "t2.jsonl"
    bad = dict(good, question_id="q9")
    del bad["T-answer"]
    p2.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(RecordError, match=r"t2\.jsonl \(line 2 \(question_id=q9\)\): missing field 'T-answer'"):
        load_records(p2)


def test_malformed_json_and_unknown_format(tmp_path: Path) -> None:
    p = tmp_path / "x.json"
    p.write_text('[{"id": 1,\n "image": ]')
    with pytest.raises(RecordError, match=r"x\.json \(line 2, column"):
        load_records(p)
    p.write_text(json.dumps([{"foo": 1}]))
    with pytest.raises(RecordError, match="unknown record format"):
        load_records(p)
    p.write_text(json.dumps([{"id": "c", "image": "s.pt", "conversations": [{"from": "gpt", "value": "x"}]}]))
    with pytest.raises(RecordError, match=r"record 0 \(id=c\), turn 0.*alternate"):
        load_records(p)
    p.write_text(json.dumps([{"id": "c", "image": "s.pt", "conversations": [{"from": "robot", "value": "x"}]}]))
    with pytest.raises(RecordError, match="unknown role 'robot'"):
        load_records(p)
    with pytest.raises(RecordError, match="not found"):
        load_records(tmp_path / "missing.json")
    with pytest.raises(RecordError, match="unknown format"):
        load_records(p, fmt="nope")
    sb = tmp_path / "sb.json"
    sb.write_text(json.dumps({"samples": [{"slide_id": "s", "question": "q", "choices": ["A) x", "B) y"],
                                           "answer": "C", "category": "c"}]}))
    with pytest.raises(RecordError, match=r"sample 0.*'C' is not one of the option letters A\.\.B"):
        load_records(sb)


# ------------------------------------------------------------------------------------------------- slide ids
def test_slide_id_from_image_ref() -> None:
    assert slide_id_from_image_ref("TCGA-LUSC/TCGA-21-1083-01Z-00-DX1.8288ca92-b611.pt") == \
        "TCGA-21-1083-01Z-00-DX1.8288ca92-b611"
    assert slide_id_from_image_ref(["TCGA-A7-A0CJ-01Z-00-DX2.csv"]) == "TCGA-A7-A0CJ-01Z-00-DX2"
    # a dotted name without a known extension keeps its dots
    assert slide_id_from_image_ref("TCGA-21-1083-01Z-00-DX1.8288ca92") == "TCGA-21-1083-01Z-00-DX1.8288ca92"
    assert slide_id_from_image_ref("C:\\data\\slide_7.SVS") == "slide_7"
    assert slide_id_from_image_ref("/x/y/z.h5") == "z"
    assert slide_ids_from_image_ref(["a.csv", "b.csv", "a.pt"]) == ["a", "b"]
    with pytest.raises(ValueError):
        slide_id_from_image_ref([])
    with pytest.raises(ValueError):
        slide_id_from_image_ref("  ")


def test_tcga_barcode() -> None:
    assert tcga_barcode("TCGA-21-1083-01Z-00-DX1.8288ca92") == ("TCGA-21-1083", "TCGA-21-1083-01Z-00-DX1")
    assert tcga_barcode("tcga-ld-a74u") == ("TCGA-LD-A74U", "TCGA-LD-A74U")
    assert tcga_barcode("CMU-1-Small-Region") is None


def test_match_records_to_stores() -> None:
    def qa(qid: str, sid: str) -> QAItem:
        return QAItem(qid, sid, "q", "a", None, "c")

    stores = ["TCGA-AA-0001-01Z-00-DX1.u1", "TCGA-AA-0002-01Z-00-DX1.u2", "TCGA-AA-0002-01Z-00-DX2.u3", "local_7"]
    recs = [
        qa("1", "TCGA-AA-0001-01Z-00-DX1.u1"),  # exact
        qa("2", "TCGA-AA-0001-01Z-00-DX1"),  # slide barcode
        qa("3", "TCGA-AA-0002"),  # patient, two candidate slides
        qa("4", "TCGA-ZZ-9999-01Z-00-DX1"),  # no store
        qa("5", "local_7"),
        qa("6", "other"),
    ]
    matched, rep = match_records_to_stores(recs, stores)
    assert [r.record_id for r in matched] == ["1", "2", "3", "5"]
    assert [r.slide_id for r in matched] == [
        "TCGA-AA-0001-01Z-00-DX1.u1", "TCGA-AA-0001-01Z-00-DX1.u1", "TCGA-AA-0002-01Z-00-DX1.u2", "local_7"]
    assert matched[1].metadata["record_slide_id"] == "TCGA-AA-0001-01Z-00-DX1"
    assert recs[1].slide_id == "TCGA-AA-0001-01Z-00-DX1"  # input not mutated
    assert rep.levels == {"exact": 2, "slide": 1, "patient": 1}
    assert rep.unmatched == [("4", "TCGA-ZZ-9999-01Z-00-DX1"), ("6", "other")]
    assert rep.ambiguous == {"TCGA-AA-0002": ["TCGA-AA-0002-01Z-00-DX1.u2", "TCGA-AA-0002-01Z-00-DX2.u3"]}
    assert "4/6 records matched" in rep.summary()
    matched2, rep2 = match_records_to_stores(recs, stores, on_multiple="skip")
    assert [r.record_id for r in matched2] == ["1", "2", "5"] and rep2.n_unmatched == 3


def test_match_real_records_to_stores(shared_data: Path) -> None:
    """WSI-VQA patients and SlideBench slide barcodes against store ids named like WSI-Bench's slides."""
    wb = load_records(shared_data / "text/wsi-bench/WSI-Bench-test.jsonl")
    stores = sorted({r.slide_id for r in wb})
    sb = load_records(shared_data / "text/slidebench/slidebench_test.json")
    matched, rep = match_records_to_stores(sb, stores)
    assert (rep.n_matched, rep.n_unmatched, len(rep.missing_slide_ids)) == (97, 1397, 551)
    assert rep.levels == {"slide": 97} and all(r.slide_id in stores for r in matched)
    vqa = load_records(shared_data / "text/wsi-vqa/WsiVQA_test.json")
    matched, rep = match_records_to_stores(vqa, stores)
    assert (rep.n_matched, rep.n_unmatched) == (113, 622) and rep.levels == {"patient": 113}
    matched, rep = match_records_to_stores(vqa, [])
    assert rep.n_matched == 0 and len(rep.missing_slide_ids) == 86


# ----------------------------------------------------------------------------------------------- question options
@pytest.mark.parametrize(
    ("question", "options", "kind"),
    [
        ("Which grade?\nA. G1\nB. G2\nC. G3", ["G1", "G2", "G3"], "lettered"),
        ("Which one? (A) lepidic (B) acinar (C) solid", ["lepidic", "acinar", "solid"], "lettered"),
        ("Given X, is the prognosis good or poor?", ["good", "poor"], "either-or"),
        ("Is there evidence of necrosis or calcification?", ["yes", "no"], "yes-no"),
        ("Do the tumor cells show pleomorphism?", ["yes", "no"], "yes-no"),
        ("Can you describe the pattern of tumor infiltration?", None, "open"),
        ("What is the grade?", None, "open"),
    ],
)
def test_parse_options_from_question(question: str, options: list[str] | None, kind: str) -> None:
    stem, opts, k = parse_options_from_question(question)
    assert (opts, k) == (options, kind)
    if kind == "lettered":
        assert stem in ("Which grade?", "Which one?")
