"""Visual question answering scores: a closed-ended answer parser with its failure rate, open-ended matching.

Closed-ended convention (``"closed-choice"``): a model answer is mapped to an option index by :func:`parse_choice`;
an answer that cannot be mapped counts as wrong *and* as a parse failure, and the failure rate is reported next to
the accuracy. A yes/no question (``option_kind`` ``"yes-no"``: WSI-Bench's polar questions, whose answers are
sentences such as "Yes, ... no evidence of ...") is first read by its answer's leading word, the rule that resolves
the references (:func:`parse_item_choice`). Open-ended convention (``"open-normalised"``): SQuAD-style normalisation
(lower case, punctuation and the articles a/an/the removed, whitespace collapsed), then exact match, normalised match
and token F1.
"""

from __future__ import annotations

import re
import string
from collections import Counter, defaultdict
from collections.abc import Sequence
from typing import Any

from hwsi.data import QAItem, strip_option_letter
from hwsi.data.choices import resolve_answer_index
from hwsi.errors import HwsiError
from hwsi.eval.metrics import generation_scores


class VQAError(HwsiError):
    """Bad VQA scoring input (length mismatch, item without options)."""


_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT_TABLE = str.maketrans({c: " " for c in string.punctuation + "“”‘’–—"})


def normalize_answer(text: str) -> str:
    """Lower case, punctuation -> space, articles a/an/the removed, whitespace collapsed."""
    t = text.lower().translate(_PUNCT_TABLE)
    t = _ARTICLES.sub(" ", t)
    return " ".join(t.split())


def _letters(n: int) -> str:
    return "".join(chr(ord("A") + i) for i in range(n))


def _letter_patterns(n: int) -> list[re.Pattern[str]]:
    L = _letters(n)
    cls = f"[{L}]"
    return [
        # the whole answer is a letter: "B", "(B)", "B)", "B.", "B:", "**B**"
        re.compile(rf"^\W*\(?({cls})\)?\W*$", re.IGNORECASE),
        # starts with a letter followed by a bracket / period / colon: "B) acinar", "(B) acinar", "B. acinar"
        re.compile(rf"^\W*\(?({cls})[\).:](?:\s|$)"),
        re.compile(rf"^\W*\(({cls})\)"),
    ]


def _letter_patterns_ci(n: int) -> list[re.Pattern[str]]:
    L = _letters(n) + _letters(n).lower()
    cls = f"[{L}]"
    cue = r"(?i:\b(?:answer|option|choice)(?:\s+(?:is|would\s+be|should\s+be))?)\s*[:=]?\s*"
    return [
        # "Answer: (B) acinar", "option (c)"
        re.compile(cue + rf"\(({cls})\)"),
        # "Answer: B", "the answer is b.", "option C, acinar": a bare letter must end there (not "is a tumour")
        re.compile(cue + rf"({cls})(?=\s*(?:$|[.,;:!)\]]))"),
    ]


def parse_choice(answer_text: str, options: Sequence[str]) -> int | None:
    """Index of the option a free-text answer picks, or None when it cannot be told without ambiguity.

    Order: (1) an option letter -- the whole answer (``"B"``, ``"(b)"``, ``"B)"``), a leading ``"B) ..."``/``"B. ..."``,
    or a cue ``"Answer: B"`` / ``"the answer is b"`` / ``"option C"`` (lower-case letters only after such a cue,
    since ``"a"`` is an article); (2) the option text: normalised equality, then the options whose normalised text
    occurs as a whole phrase in the answer -- the longest one wins if it contains every other hit (``"invasive
    ductal carcinoma"`` over ``"carcinoma"``); two unrelated hits are ambiguous -> None. Negations are not
    interpreted (``"not B"`` parses as B).
    """
    if not options:
        raise VQAError("parse_choice needs at least one option")
    text = answer_text.strip()
    if not text:
        return None
    n = min(len(options), 26)
    for pat in _letter_patterns(n):
        m = pat.search(text)
        if m:
            return ord(m.group(1).upper()) - ord("A")
    for pat in _letter_patterns_ci(n):
        hits = {ord(m.group(1).upper()) - ord("A") for m in pat.finditer(text)}
        if len(hits) == 1:
            return hits.pop()
    norm_opts = [normalize_answer(strip_option_letter(o)) for o in options]
    norm_ans = normalize_answer(text)
    exact = [i for i, o in enumerate(norm_opts) if o and o == norm_ans]
    if len(exact) == 1:
        return exact[0]
    padded = f" {norm_ans} "
    hits = [i for i, o in enumerate(norm_opts) if o and f" {o} " in padded]
    if not hits:
        return None
    if len(hits) == 1:
        return hits[0]
    longest = max(hits, key=lambda i: len(norm_opts[i]))
    if sum(len(norm_opts[i]) == len(norm_opts[longest]) for i in hits) > 1:
        return None
    if all(f" {norm_opts[i]} " in f" {norm_opts[longest]} " for i in hits):
        return longest
    return None


def parse_item_choice(answer_text: str, item: QAItem) -> int | None:
    """The option of ``item`` an answer picks: for a yes/no item (``metadata["option_kind"] == "yes-no"``) its
    leading word first (``Yes``/``Indeed``/``Correct`` -> yes, ``No``/``Neither``/``There is no`` -> no, as
    :func:`hwsi.data.choices.resolve_answer_index` reads the references), else :func:`parse_choice`."""
    assert item.options is not None
    if item.metadata.get("option_kind") == "yes-no":
        lead = resolve_answer_index(answer_text.strip(), item.options, "yes-no")
        if lead is not None:
            return lead
    return parse_choice(answer_text, item.options)


def _gold_index(item: QAItem) -> int | None:
    if item.answer_index is not None:
        return item.answer_index
    assert item.options is not None
    return parse_choice(item.answer, item.options)


def vqa_accuracy(preds: Sequence[str], items: Sequence[QAItem]) -> dict[str, Any]:
    """Closed-ended accuracy of model answers ``preds`` on ``items`` (each with ``options``).

    Returns ``accuracy``, ``n``, ``n_correct``, ``parse_failures``, ``parse_failure_rate``, ``no_gold`` (items whose
    reference could not be mapped to an option: left out of ``n``), ``by_category`` (accuracy and n per
    category), ``correct`` (question_id -> 0/1, for paired comparisons) and ``convention``.
    """
    if len(preds) != len(items):
        raise VQAError(f"{len(preds)} predictions but {len(items)} items")
    n = correct = failures = no_gold = 0
    per_cat: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    per_item: dict[str, int] = {}
    for pred, item in zip(preds, items, strict=True):
        if not item.options:
            raise VQAError(f"item {item.question_id} has no options (open-ended): use open_answer_scores")
        gold = _gold_index(item)
        if gold is None:
            no_gold += 1
            continue
        n += 1
        choice = parse_item_choice(pred, item)
        if choice is None:
            failures += 1
        ok = int(choice == gold)
        per_item[str(item.question_id)] = ok
        correct += ok
        per_cat[item.category][0] += ok
        per_cat[item.category][1] += 1
    return {
        "convention": "closed-choice: option letter or option text (hwsi.eval.vqa.parse_choice; yes/no questions by "
        "the answer's leading word first); unparsed answers count as wrong",
        "accuracy": correct / n if n else float("nan"),
        "n": n,
        "n_correct": correct,
        "parse_failures": failures,
        "parse_failure_rate": failures / n if n else float("nan"),
        "no_gold": no_gold,
        "by_category": {c: {"accuracy": v[0] / v[1], "n": v[1]} for c, v in sorted(per_cat.items())},
        "correct": per_item,
    }


def token_f1(pred: str, ref: str) -> float:
    """SQuAD-style token F1 of the normalised strings (1.0 when both are empty)."""
    p = normalize_answer(pred).split()
    r = normalize_answer(ref).split()
    if not p or not r:
        return float(p == r)
    common = Counter(p) & Counter(r)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(p), same / len(r)
    return 2 * precision * recall / (precision + recall)


def open_answer_scores(preds: Sequence[str], refs: Sequence[str]) -> dict[str, Any]:
    """Open-ended answers: ``exact_match`` (stripped strings equal), ``normalized_match``, mean ``token_f1``."""
    if len(preds) != len(refs):
        raise VQAError(f"{len(preds)} predictions but {len(refs)} references")
    n = len(preds)
    if n == 0:
        raise VQAError("no answers to score")
    em = sum(p.strip() == r.strip() for p, r in zip(preds, refs, strict=True))
    nm = sum(normalize_answer(p) == normalize_answer(r) for p, r in zip(preds, refs, strict=True))
    f1 = sum(token_f1(p, r) for p, r in zip(preds, refs, strict=True))
    return {
        "convention": "open-normalised: lower case, punctuation and articles removed (SQuAD style)",
        "exact_match": em / n,
        "normalized_match": nm / n,
        "token_f1": f1 / n,
        "n": n,
    }


def evaluate_items(
    preds: Sequence[str],
    items: Sequence[QAItem],
    generation_convention: str = "wsi-bench",
    meteor: bool = True,
) -> dict[str, Any]:
    """Score model answers on a mixed benchmark (e.g. WSI-Bench test): closed items by accuracy, open ones by text.

    Items with ``options`` go to :func:`vqa_accuracy`; the others get :func:`open_answer_scores` and
    :func:`hwsi.eval.metrics.generation_scores` (``generation_convention``), overall and per category.
    """
    if len(preds) != len(items):
        raise VQAError(f"{len(preds)} predictions but {len(items)} items")
    closed = [(p, it) for p, it in zip(preds, items, strict=True) if it.options]
    open_ = [(p, it) for p, it in zip(preds, items, strict=True) if not it.options]
    out: dict[str, Any] = {"convention": f"closed: closed-choice accuracy; open: {generation_convention}",
                           "n_closed": len(closed), "n_open": len(open_)}
    if closed:
        out["closed"] = vqa_accuracy([p for p, _ in closed], [it for _, it in closed])
    if open_:
        by_cat: dict[str, list[tuple[str, QAItem]]] = defaultdict(list)
        for p, it in open_:
            by_cat[it.category].append((p, it))

        def score(pairs: list[tuple[str, QAItem]]) -> dict[str, Any]:
            ps, rs = [p for p, _ in pairs], [it.answer for _, it in pairs]
            res = generation_scores(ps, rs, convention=generation_convention, meteor=meteor)  # type: ignore[arg-type]
            res.update({k: v for k, v in open_answer_scores(ps, rs).items() if k != "convention"})
            return res

        out["open"] = score(open_)
        out["open_by_category"] = {c: score(v) for c, v in sorted(by_cat.items())}
    return out


__all__ = ["VQAError", "evaluate_items", "normalize_answer", "open_answer_scores", "parse_choice", "parse_item_choice",
           "token_f1", "vqa_accuracy"]
