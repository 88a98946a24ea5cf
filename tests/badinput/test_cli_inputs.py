"""Bad-input corpus of `hwsi tile / extract / train / eval / ask / cells`.

Every input is generated here at test time. Each exit-2 case runs the real CLI (``hwsi.cli.main``) and asserts:
exit code 2, ONE stderr line naming the file or option and the reason, no traceback, and no file written in the
command's output folder. The batch cases (exit 1) assert the failing slide's error record, that the good slides of
the same batch finished, and that nothing half-written is left.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hwsi.store import has_stage
from hwsi.synth.pyramid import write_pyramid_tiff

def files_under(path: Path) -> list[Path]:
    """Every file below ``path`` (none when it does not exist): a refused command must leave none."""
    return sorted(p for p in path.rglob("*") if not p.is_dir()) if path.exists() else []


def _tissue(x0: int, y0: int, w: int, h: int) -> np.ndarray:
    """Pink H&E-like texture everywhere (the whole slide is tissue)."""
    yy, xx = np.mgrid[y0 : y0 + h, x0 : x0 + w]
    return np.stack([200 + 0 * xx, 110 + (xx % 40), 170 + (yy % 30)], -1).astype(np.uint8)


def _records_jsonl(n: int = 1) -> str:
    rec = {"question_id": 1, "image": "s1.svs", "question": "What is the grade?", "T-answer": "2", "metadata": "Grade"}
    return "\n".join(json.dumps({**rec, "question_id": i}) for i in range(n)) + "\n"


BENCH_HEADER = "ID,Slide,Tumor,Broad Category,Narrow Category,Question,A,B,C,D,Answer\n"
CONVERSATION = [{"id": "r1", "image": "s1.pt", "conversations": [
    {"from": "human", "value": "<image>\nWhat is the grade?"}, {"from": "gpt", "value": "Grade 2."}]}]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder of generated bad (and a few good) inputs; names are the ones the cases below use."""
    c = tmp_path_factory.mktemp("corpus")
    write_pyramid_tiff(c / "s.tiff", 768, 768, 0.5, _tissue)
    (c / "slides").mkdir()
    write_pyramid_tiff(c / "slides" / "good.tiff", 768, 768, 0.5, _tissue)
    write_pyramid_tiff(c / "slides" / "tiny.tiff", 96, 96, 0.5, _tissue)
    (c / "slides_bad_bytes.csv").write_bytes(b"slide,mpp\ns\xe9.tiff,0.5\n")
    (c / "slides_inf.csv").write_text("slide,mpp\ns.tiff,inf\n")
    (c / "empty_job" / "stores").mkdir(parents=True)
    # training configs: one wrong value each
    cfgs = {
        "epochs_list": "stage1: {epochs: [1, 2]}\n",
        "batch_str": 'stage2: {batch_size: "4"}\n',
        "betas_scalar": "stage1: {betas: 0.9}\n",
        "scales_nuclei": "stage1: {loss: {scales: [nuclei]}}\n",
        "seed_abc": 'seed: "abc"\n',
        "log_every_0": "stage0: {log_every: 0}\n",
        "use_cells_no": 'model: {hierarchy: {use_cells: "no"}}\n',
        "epochs_neg": "stage1: {epochs: -1}\n",
        "precision_no": "precision: no\n",
        "bad_yaml": "stage1: {lr: 1e-3\nstage2: [\n",
        "deep": "[" * 5000 + "]" * 5000 + "\n",
    }
    for name, text in cfgs.items():
        (c / f"{name}.yaml").write_text(text)
    (c / "bad_bytes.yaml").write_bytes(b"seed: 0\nprecision: \xff\xfe\n")
    (c / "segment.yaml").write_text('segment: {max_tile_px: "8192"}\n')
    # a run folder whose saved config is wrong
    (c / "run" / "stage1").mkdir(parents=True)
    (c / "run" / "config.yaml").write_text("stage1: {betas: [0.9, 1.5]}\n")
    # record files
    (c / "recs.jsonl").write_text(_records_jsonl())
    (c / "recs_bad_line.jsonl").write_text(_records_jsonl(1) + "{bad\n")
    (c / "recs_bad_bytes.jsonl").write_bytes(_records_jsonl(2).encode().replace(b"grade", b"gr\xe0de", 1))
    (c / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    (c / "bench_extra.csv").write_text(BENCH_HEADER + "1,s1,t,b,n,q,a,b,c,d,A\n2,s2,t,b,n,q,a,b,c,d,A,extra\n")
    (c / "bench_latin1.csv").write_bytes((BENCH_HEADER + "1,s1,t,b,n,Tumeur?,a,b,c,d,A\n").encode()
                                         .replace(b"Tumeur", b"Tum\xe9ur"))
    (c / "labels_bad_bytes.csv").write_bytes(b"slide_id,label\ns1,carcinom\xe1\n")
    # a job for stage 0 / stage 1 text errors: valid records, a broken facts / reports file
    tj = c / "tj"
    (tj / "text").mkdir(parents=True)
    (tj / "text" / "train.json").write_text(json.dumps(CONVERSATION))
    (tj / "facts.json").write_text('{"s1": {"grade": 2,}}')
    (tj / "facts_ok.json").write_text('{"s1": {"grade": 2}}')
    (tj / "reports.json").write_bytes(b'{"s1": "Grade 2 carcinoma, caf\xe9-au-lait"}')
    (tj / "c_facts.yaml").write_text("data: {facts: facts.json}\n")
    (tj / "c_reports.yaml").write_text("data: {facts: facts_ok.json, reports: reports.json}\n")
    (c / "vocab.txt").write_bytes(b"gland\nnecros\xeds\n")
    return c


# (case id, argv with {C} = corpus folder and {O} = this case's output folder, needles of the one stderr line)
CASES: list[tuple[str, list[str], list[str]]] = [
    # item 2: usage errors (typer's own click) -> one line, exit 2
    ("tile-missing-out", ["tile", "{C}/s.tiff"], ["hwsi tile", "Missing option '--out'"]),
    ("tile-mpp-not-a-number", ["tile", "{C}/s.tiff", "--out", "{O}", "--mpp", "abc"], ["'--mpp'"]),
    ("unknown-command", ["bogus"], ["No such command 'bogus'"]),
    ("unknown-option", ["tile", "{C}/s.tiff", "--out", "{O}", "--bogus"], ["No such option: --bogus"]),
    ("train-missing-config", ["train", "--stage", "1"], ["hwsi train", "'--config'"]),
    ("train-stage-7", ["train", "--stage", "7", "--config", "{C}/seed_abc.yaml"], ["'--stage'"]),
    ("eval-missing-model", ["eval", "--data", "{C}/recs.jsonl"], ["hwsi eval", "'--model'"]),
    ("ask-missing-run", ["ask", "{C}/s.h5"], ["hwsi ask", "'--run'"]),
    ("extract-k-not-int", ["extract", "{C}/empty_job", "--k", "x"], ["'--k'"]),
    ("tile-out-under-a-file", ["tile", "{C}/s.tiff", "--out", "{C}/s.tiff/job"], ["s.tiff/job", "is a file, not a folder"]),
    # item 8: numbers and non-regular files
    ("tile-mpp-inf", ["tile", "{C}/s.tiff", "--out", "{O}", "--mpp", "inf"], ["'--mpp'", "finite", "inf"]),
    ("tile-mpp-negative", ["tile", "{C}/s.tiff", "--out", "{O}", "--mpp", "-1"], ["'--mpp'", "> 0"]),
    ("tile-target-mpp-inf", ["tile", "{C}/s.tiff", "--out", "{O}", "--target-mpp", "inf"], ["'--target-mpp'"]),
    ("tile-target-mpp-nan", ["tile", "{C}/s.tiff", "--out", "{O}", "--target-mpp", "nan"], ["'--target-mpp'"]),
    ("tile-region-size-0", ["tile", "{C}/s.tiff", "--out", "{O}", "--region-size", "0"], ["'--region-size'"]),
    ("extract-k-0", ["extract", "{C}/empty_job", "--k", "0"], ["'--k'", ">= 1"]),
    ("cells-mpp-inf", ["cells", "{C}/s.tiff", "--out", "{O}/n.csv", "--mpp", "inf"], ["'--mpp'"]),
    ("slides-csv-mpp-inf", ["tile", "{C}/slides_inf.csv", "--out", "{O}"], ["slides_inf.csv (line 2)", "mpp"]),
    # item 4: the typed config reader (file, key, expected type)
    ("cfg-epochs-list", ["train", "--stage", "1", "--config", "{C}/epochs_list.yaml", "--out", "{O}"],
     ["epochs_list.yaml", "stage1.epochs", "expected an integer"]),
    ("cfg-batch-size-str", ["train", "--stage", "1", "--config", "{C}/batch_str.yaml", "--out", "{O}"],
     ["batch_str.yaml", "stage2.batch_size", "expected an integer", "'4'"]),
    ("cfg-betas-scalar", ["train", "--stage", "1", "--config", "{C}/betas_scalar.yaml", "--out", "{O}"],
     ["betas_scalar.yaml", "stage1.betas", "a list of 2 items"]),
    ("cfg-scales-nuclei", ["train", "--stage", "1", "--config", "{C}/scales_nuclei.yaml", "--out", "{O}"],
     ["scales_nuclei.yaml", "stage1.loss.scales[0]", "'cells'", "'nuclei'"]),
    ("cfg-seed-abc", ["train", "--stage", "1", "--config", "{C}/seed_abc.yaml", "--out", "{O}"],
     ["seed_abc.yaml", "seed", "expected an integer"]),
    ("cfg-log-every-0", ["train", "--stage", "1", "--config", "{C}/log_every_0.yaml", "--out", "{O}"],
     ["log_every_0.yaml", "stage0.log_every", "must be > 0"]),
    ("cfg-use-cells-no", ["train", "--stage", "1", "--config", "{C}/use_cells_no.yaml", "--out", "{O}"],
     ["use_cells_no.yaml", "model.hierarchy.use_cells", "true or false"]),
    ("cfg-epochs-negative", ["train", "--stage", "1", "--config", "{C}/epochs_neg.yaml", "--out", "{O}"],
     ["epochs_neg.yaml", "stage1.epochs", ">= 0"]),
    ("cfg-precision-unquoted-no", ["train", "--stage", "1", "--config", "{C}/precision_no.yaml", "--out", "{O}"],
     ["precision_no.yaml", "precision", "quote it"]),
    ("cfg-invalid-yaml", ["train", "--stage", "1", "--config", "{C}/bad_yaml.yaml", "--out", "{O}"],
     ["bad_yaml.yaml (line", "not valid YAML"]),
    ("cfg-deep-yaml", ["train", "--stage", "1", "--config", "{C}/deep.yaml", "--out", "{O}"],
     ["deep.yaml", "nested too deeply"]),
    ("cfg-not-utf8", ["train", "--stage", "1", "--config", "{C}/bad_bytes.yaml", "--out", "{O}"],
     ["bad_bytes.yaml (line 2)", "not UTF-8", "byte 0xff at byte offset 19"]),
    ("cfg-unknown-preset", ["train", "--stage", "1", "--config", "tinyy", "--out", "{O}"],
     ["tinyy: no such file, and no preset of that name", "demo, paper, tiny"]),
    ("eval-convention-literal", ["eval", "--data", "{C}/recs.jsonl", "--model", "{C}/run", "--convention", "bleu"],
     ["hwsi eval options", "convention", "'wsi-bench', 'coco'", "'bleu'"]),
    ("gates-stem-literal", ["gates", "{C}", "--stem", "cnn"], ["gates options", "stem", "'conv'", "'cnn'"]),
    ("ask-run-config-bad", ["ask", "{C}/s.h5", "--run", "{C}/run", "-q", "x"],
     ["run/config.yaml", "stage1.betas[1]", "[0, 1)"]),
    ("cells-config-str-int", ["cells", "{C}/s.tiff", "--out", "{O}/n.csv", "--config", "{C}/segment.yaml"],
     ["segment.yaml", "segment.max_tile_px", "expected an integer"]),
    # item 5: loaders (records, slide CSV, labels, facts, reports, vocabulary)
    ("eval-jsonl-bad-line", ["eval", "--data", "{C}/recs_bad_line.jsonl", "--job", "{C}/empty_job",
                             "--model", "{C}/run", "--out", "{O}"], ["recs_bad_line.jsonl (line 2", "not valid JSON"]),
    ("eval-jsonl-not-utf8", ["eval", "--data", "{C}/recs_bad_bytes.jsonl", "--job", "{C}/empty_job",
                             "--model", "{C}/run", "--out", "{O}"],
     ["recs_bad_bytes.jsonl (line 1)", "not UTF-8", "byte offset"]),
    ("eval-json-deep", ["eval", "--data", "{C}/deep.json", "--job", "{C}/empty_job", "--model", "{C}/run",
                        "--out", "{O}"], ["deep.json", "nested too deeply"]),
    ("eval-slidebench-extra-field", ["eval", "--data", "{C}/bench_extra.csv", "--job", "{C}/empty_job",
                                     "--model", "{C}/run", "--out", "{O}"],
     ["bench_extra.csv (line 3)", "12 fields", "header has 11"]),
    ("eval-slidebench-not-utf8", ["eval", "--data", "{C}/bench_latin1.csv", "--job", "{C}/empty_job",
                                  "--model", "{C}/run", "--out", "{O}"], ["bench_latin1.csv (line 2)", "not UTF-8"]),
    ("eval-labels-not-utf8", ["eval", "--data", "{C}/recs.jsonl", "--job", "{C}/empty_job", "--model", "{C}/run",
                              "--labels", "{C}/labels_bad_bytes.csv", "--out", "{O}"],
     ["labels_bad_bytes.csv (line 2)", "byte 0xe1"]),
    ("train-facts-invalid-json", ["train", "--stage", "0", "--config", "{C}/tj/c_facts.yaml", "--job", "{C}/tj",
                                  "--out", "{O}"], ["facts.json (line 1, column 20)", "not valid JSON"]),
    ("train-reports-not-utf8", ["train", "--stage", "0", "--config", "{C}/tj/c_reports.yaml", "--job", "{C}/tj",
                                "--out", "{O}"], ["reports.json (line 1)", "not UTF-8"]),
    ("slides-csv-not-utf8", ["tile", "{C}/slides_bad_bytes.csv", "--out", "{O}"],
     ["slides_bad_bytes.csv (line 2)", "byte 0xe9 at byte offset 11"]),
]


@pytest.mark.parametrize("case_id,argv,needles", CASES, ids=[c[0] for c in CASES])
def test_bad_input_exit_2(case_id: str, argv: list[str], needles: list[str], corpus: Path, tmp_path: Path,
                          hwsi, assert_one_line_error) -> None:  # noqa: ANN001 - fixtures of badinput/conftest.py
    out = tmp_path / "out"
    args = [a.replace("{C}", str(corpus)).replace("{O}", str(out)) for a in argv]
    rc, _, err = hwsi(*args)
    assert_one_line_error(rc, err, 2, *needles)
    assert files_under(out) == []


def test_extract_bad_vocabulary_fails_before_loading_models(corpus: Path, tmp_path: Path, hwsi,  # noqa: ANN001
                                                             assert_one_line_error) -> None:  # noqa: ANN001
    job = tmp_path / "job"
    assert hwsi("tile", corpus / "s.tiff", "--out", job, "--region-size", "256", "--patch-size", "64", "-q")[0] == 0
    before = files_under(job)
    rc, _, err = hwsi("extract", job, "--vocab", corpus / "vocab.txt", "-q")
    assert_one_line_error(rc, err, 2, "vocab.txt (line 2)", "not UTF-8", "byte 0xed at byte offset 12")
    assert files_under(job) == before


def _batch_checks(job: Path, failed: str, needles: list[str], good: list[str]) -> None:
    rec = json.loads((job / "errors" / f"{failed}.tile.json").read_text())
    assert "\n" not in rec["message"] and "traceback" not in rec, rec
    for needle in needles:
        assert needle in rec["message"], rec["message"]
    assert all(has_stage(job / "stores" / f"{g}.h5", "tile") for g in good)
    assert not (job / "stores" / f"{failed}.h5").exists()
    assert [p for p in files_under(job) if ".tmp-" in p.name] == []


def _hwsi_subprocess(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """The CLI in a child process with a timeout: before the FIFO fix, opening a FIFO blocked forever."""
    import hwsi

    env = {**os.environ, "PYTHONPATH": str(Path(hwsi.__file__).parents[1]), "OMP_NUM_THREADS": "1"}  # this hwsi
    return subprocess.run([sys.executable, "-m", "hwsi.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=120, env=env)


def test_fifo_named_like_a_slide_is_refused(tmp_path: Path, assert_one_line_error) -> None:  # noqa: ANN001
    os.mkfifo(tmp_path / "f.svs")
    p = _hwsi_subprocess("tile", tmp_path / "f.svs", "--out", tmp_path / "out")
    assert_one_line_error(p.returncode, p.stderr, 2, "f.svs", "not a regular file")
    assert files_under(tmp_path / "out") == []


def test_batch_fifo_among_slides_is_recorded_not_opened(corpus: Path, tmp_path: Path) -> None:
    """A FIFO named like a slide in a folder: recorded as failed, the other slide finishes, nothing hangs."""
    src = tmp_path / "in"
    src.mkdir()
    (src / "good.tiff").write_bytes((corpus / "s.tiff").read_bytes())
    os.mkfifo(src / "pipe.svs")
    job = tmp_path / "job"
    p = _hwsi_subprocess("tile", src, "--out", job, "--region-size", "256", "--patch-size", "64", "-q")
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
    _batch_checks(job, "pipe", ["pipe.svs", "not a regular file"], ["good"])


def test_batch_region_larger_than_slide(corpus: Path, tmp_path: Path, hwsi) -> None:  # noqa: ANN001
    job = tmp_path / "job"
    rc, _, err = hwsi("tile", corpus / "slides", "--out", job, "--region-size", "1024", "--patch-size", "64", "-q")
    assert rc == 1 and "Traceback" not in err
    _batch_checks(job, "tiny", ["tiny.tiff", "no tissue possible", "of one region",
                                "--region-size"], ["good"])


def test_batch_target_mpp_astronomical(corpus: Path, tmp_path: Path, hwsi) -> None:  # noqa: ANN001
    """--target-mpp 1e300 is finite: each slide fails with a clear message (before: OverflowError)."""
    job = tmp_path / "job"
    rc, _, err = hwsi("tile", corpus / "s.tiff", "--out", job, "--target-mpp", "1e300", "-q")
    assert rc == 1 and "Traceback" not in err and "OverflowError" not in err
    _batch_checks(job, "s", ["s.tiff", "no tissue possible", "one patch", "--target-mpp"], [])
