"""Answer options of closed-ended questions: written inside a question, given as letters, or stated by an answer."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from hwsi.data.records import fail

_LETTER_LINE_RE = re.compile(r"^\s*\(?([A-Ha-h])[\)\.:]\s+(.+?)\s*$")
_INLINE_OPT_RE = re.compile(r"(?:^|\s)\(([A-H])\)\s*")
# WSI-LLaVA's test questions: "... of the tumor? A) Adenocarcinoma B) Squamous cell carcinoma, keratinizing type ..."
_INLINE_BARE_RES = (re.compile(r"(?:^|(?<=\s))([A-H])\)\s+"), re.compile(r"(?:^|(?<=\s))([A-H])\.\s+"))
# an answer that is an option letter, maybe with stray quotes/backticks after it ('B "', 'C ```', '(c).')
_LETTER_ANSWER_RE = re.compile(r"^\W*\(?([A-Ha-h])\)?[\s\W]*$")
# an answer that starts with a letter and repeats its option ('C) Squamous cell carcinoma', 'C. ...')
_LETTER_PREFIX_RE = re.compile(r"^\s*\(?([A-H])[\).:]\s+(.+?)\s*$", re.S)
_EITHER_OR_RE = re.compile(r"\bis\s+(?:the|it|this)\b[^?]*?\b([\w-]+)\s+or\s+([\w-]+)\s*\?\s*$", re.I)
_POLAR_RE = re.compile(r"^\s*(is|are|do|does|did|can|could|was|were|has|have|had|will|would|should)\b", re.I)
_REQUEST_RE = re.compile(r"^\s*(can|could|would|will)\s+you\b", re.I)
_YES_RE = re.compile(r"^\W*(yes|indeed|absolutely|correct|true)\b", re.I)
_NO_RE = re.compile(r"^\W*(no|neither|none|not|false|there (?:is|are) no)\b", re.I)


def strip_option_letter(option: str) -> str:
    """``"A) Squamous cell carcinoma"`` -> ``"Squamous cell carcinoma"`` (also ``"A." / "(A)" / "A:"``)."""
    m = re.match(r"^\s*\(?[A-Ha-h][\)\.:]\s+(.*)$", option, re.S)
    return m.group(1).strip() if m else option.strip()


def _inline_bare_options(question: str) -> tuple[str, list[str]] | None:
    """``stem A) x B) y ...`` (or ``A. x B. y``, one delimiter throughout): the options (letters A, B, ... in order;
    a later out-of-order ``X)`` stays inside the option text), or None when fewer than two are found."""
    for pattern in _INLINE_BARE_RES:
        marks: list[re.Match[str]] = []
        for m in pattern.finditer(question):
            if m.group(1) == chr(ord("A") + len(marks)):
                marks.append(m)
        if len(marks) < 2:
            continue
        ends = [m.start() for m in marks[1:]] + [len(question)]
        options = [question[m.end():end].strip() for m, end in zip(marks, ends, strict=True)]
        if all(options):
            return question[: marks[0].start()].strip(), options
    return None


def parse_options_from_question(question: str) -> tuple[str, list[str] | None, str]:
    """Find the answer options written inside a question.

    Returns ``(stem, options, kind)`` with kind one of:

    * ``"lettered"`` -- option lines ``A. text`` / ``(A) text`` / ``A) text`` (at least two, consecutive
      letters from A), inline ``(A) x (B) y`` or inline ``A) x B) y`` / ``A. x B. y`` (WSI-LLaVA's files); the stem is the
      text before the options;
    * ``"either-or"`` -- a final ``... is the prognosis good or poor?`` -> ``["good", "poor"]``;
    * ``"yes-no"`` -- a polar question (starts with is/are/do/does/can/...; not a request such as
      "Can you describe ...") -> ``["yes", "no"]``;
    * ``"open"`` -- none of these (options None).
    """
    lines = question.splitlines()
    opts: list[str] = []
    first_opt_line = None
    for i, line in enumerate(lines):
        m = _LETTER_LINE_RE.match(line)
        if m and m.group(1).upper() == chr(ord("A") + len(opts)):
            if first_opt_line is None:
                first_opt_line = i
            opts.append(m.group(2).strip())
        elif opts and line.strip():
            break
    if len(opts) >= 2 and first_opt_line is not None:
        return "\n".join(lines[:first_opt_line]).strip(), opts, "lettered"
    parts = _INLINE_OPT_RE.split(question)
    # parts = [stem, "A", text, "B", text, ...]
    if len(parts) >= 5:
        letters = parts[1::2]
        if letters == [chr(ord("A") + i) for i in range(len(letters))]:
            return parts[0].strip(), [p.strip() for p in parts[2::2]], "lettered"
    bare = _inline_bare_options(question)
    if bare is not None:
        return bare[0], bare[1], "lettered"
    m = _EITHER_OR_RE.search(question)
    if m:
        return question.strip(), [m.group(1).lower(), m.group(2).lower()], "either-or"
    if _POLAR_RE.match(question) and not _REQUEST_RE.match(question):
        return question.strip(), ["yes", "no"], "yes-no"
    return question.strip(), None, "open"


def resolve_answer_index(answer: str, options: Sequence[str], kind: str) -> int | None:
    """Index of the option a free-text reference answer states, or None when it cannot be told unambiguously."""
    if kind == "yes-no":
        if _YES_RE.match(answer):
            return 0
        if _NO_RE.match(answer):
            return 1
        return None
    low = " " + re.sub(r"[^a-z0-9]+", " ", answer.lower()) + " "
    hits = [i for i, o in enumerate(options) if " " + re.sub(r"[^a-z0-9]+", " ", o.lower()).strip() + " " in low]
    return hits[0] if len(hits) == 1 else None


def resolve_lettered_answer(answer: str, options: Sequence[str]) -> int | None:
    """Index of the option a closed answer names: a letter (``"C"``, ``"(c)"``, ``'B "'``), a letter with its option
    (``"C) text"``), or one option's text (case and punctuation ignored); None when it names none or several."""
    m = _LETTER_ANSWER_RE.match(answer)
    if m:
        i = ord(m.group(1).upper()) - ord("A")
        return i if i < len(options) else None
    m = _LETTER_PREFIX_RE.match(answer)
    if m:
        i = ord(m.group(1)) - ord("A")
        if i < len(options) and _norm(m.group(2)) == _norm(options[i]):
            return i
        return None
    same = [i for i, o in enumerate(options) if _norm(o) == _norm(answer)]
    return same[0] if len(same) == 1 else None


def _norm(text: str) -> str:
    return " ".join(re.sub(r"[^a-z0-9]+", " ", text.lower()).split())


def letter_index(letter: str, n: int, path: Path, where: str) -> int:
    """Index of an answer letter (``"C"``, ``"(c)"``, ``"C."``) among ``n`` options; else a :class:`RecordError`."""
    s = letter.strip().strip("().:").upper()
    if len(s) != 1 or not ("A" <= s <= chr(ord("A") + n - 1)):
        raise fail(path, where, f"answer {letter!r} is not one of the option letters A..{chr(ord('A') + n - 1)}")
    return ord(s) - ord("A")
