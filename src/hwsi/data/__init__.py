"""Text records of the public WSI instruction / VQA / report data sets, shared by training and evaluation.

One parser module per record format, all parsing into the typed model of :mod:`hwsi.data.records`:

=========================== ==================================================================================
:mod:`hwsi.data.llava`      ``wsi-bench-train``, ``slidechat`` (LLaVA conversation json) and ``wsi-llava-test``
:mod:`hwsi.data.wsi_bench`  ``wsi-bench-test`` (jsonl of questions with ``T-answer``)
:mod:`hwsi.data.slidebench` ``slidebench-json`` and ``slidebench-csv`` (SlideBench-VQA)
:mod:`hwsi.data.wsi_vqa`    ``wsi-vqa``
:mod:`hwsi.data.histgen`    ``histgen`` (reports)
=========================== ==================================================================================

:func:`load_records` (:mod:`hwsi.data.load`) detects a file's format and dispatches to its parser
(:func:`load_records_report` also says which malformed records ``skip_bad=True`` left out);
:func:`match_records_to_stores` (:mod:`hwsi.data.matching`) binds records to the available per-slide stores;
:mod:`hwsi.data.choices` reads the answer options of closed-ended questions. This package sits below
``hwsi.train`` and ``hwsi.eval`` and imports neither.
"""

from hwsi.data.records import (
    FORMATS,
    BadRecords,
    Conversation,
    QAItem,
    Record,
    RecordError,
    RecordLoad,
    Turn,
    slide_id_from_image_ref,
    slide_ids_from_image_ref,
    strip_image_token,
    tcga_barcode,
)
from hwsi.data.choices import parse_options_from_question, strip_option_letter
from hwsi.data.histgen import HISTGEN_REPORT_PROMPT
from hwsi.data.slidebench import SLIDEBENCH_CSV_COLUMNS
from hwsi.data.wsi_bench import WSI_BENCH_CATEGORIES
from hwsi.data.load import detect_format, load_records, load_records_report
from hwsi.data.matching import MatchReport, match_records_to_stores

__all__ = [
    "FORMATS",
    "BadRecords",
    "HISTGEN_REPORT_PROMPT",
    "SLIDEBENCH_CSV_COLUMNS",
    "WSI_BENCH_CATEGORIES",
    "Conversation",
    "MatchReport",
    "QAItem",
    "Record",
    "RecordError",
    "RecordLoad",
    "Turn",
    "detect_format",
    "load_records",
    "load_records_report",
    "match_records_to_stores",
    "parse_options_from_question",
    "slide_id_from_image_ref",
    "slide_ids_from_image_ref",
    "strip_image_token",
    "strip_option_letter",
    "tcga_barcode",
]
