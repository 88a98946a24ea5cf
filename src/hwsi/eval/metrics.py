"""Report / caption generation metrics (BLEU-1..4, ROUGE-L, METEOR, CIDEr) in two named conventions.

Every result dict carries ``"convention"`` and ``"tokenizer"`` keys so numbers from the two are never mixed up.

``wsi-bench`` (per-sample, averaged; the convention of the WSI-Bench / WSI-LLaVA papers):
    * tokens: text lower-cased, split into sentences at ``.!?`` + whitespace, each sentence tokenised with NLTK's
      ``NLTKWordTokenizer`` (the improved Treebank tokenizer that ``nltk.word_tokenize`` uses after its Punkt
      sentence split; the regex sentence split replaces Punkt so no model download is needed);
    * BLEU-n: ``nltk.translate.bleu_score.sentence_bleu`` with uniform weights over 1..n-grams and
      ``SmoothingFunction().method4``, per sample, then the mean over samples (an empty prediction scores 0);
    * ROUGE-L: ``rouge_score`` ``rougeL`` F-measure on the raw strings (its own tokenizer, no stemming), the
      best-scoring reference when several are given, averaged;
    * METEOR: ``nltk.translate.meteor_score.meteor_score`` on the tokens (WordNet synonyms), averaged.

``coco`` (corpus-level; the captioning convention of ``pycocoevalcap``):
    * tokens: ``tokenizer="ptb"`` (default) the Stanford PTBTokenizer shipped with pycocoevalcap (Java), lower
      case, punctuation removed; ``tokenizer="simple"`` a Java-free approximation (lower case, punctuation
      split off and dropped, whitespace split) -- named in the output so it is never mistaken for ``ptb``;
    * BLEU-n: ``pycocoevalcap`` ``Bleu(4)`` corpus score (``option='closest'`` reference length);
    * ROUGE-L: ``pycocoevalcap`` ``Rouge`` (LCS F-measure with beta 1.2), mean over samples;
    * METEOR: ``pycocoevalcap`` ``Meteor`` (meteor-1.5.jar, Java, ``-norm``), the jar's aggregate over all
      samples; one Java process per Python process, reused;
    * CIDEr: ``pycocoevalcap`` ``Cider`` (CIDEr-D style, IDF from the evaluated references).
"""

from __future__ import annotations

import atexit
import os
import re
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from hwsi.errors import HwsiError

Convention = Literal["wsi-bench", "coco"]
CONVENTIONS: tuple[str, ...] = ("wsi-bench", "coco")
BLEU_KEYS: tuple[str, ...] = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4")


class MetricError(HwsiError):
    """Bad metric input (length mismatch, unknown convention) or a missing metric dependency."""


# ------------------------------------------------------------------------------------------------ environment
def ensure_nltk_data() -> str | None:
    """Make NLTK find the WordNet copied into ``<venv>/nltk_data`` by scripts/setup-system.sh.

    Sets ``NLTK_DATA`` when unset and adds the folder to ``nltk.data.path``. Returns the folder used (or None).
    """
    folder = os.environ.get("NLTK_DATA")
    if not folder:
        cand = Path(sys.prefix) / "nltk_data"
        if cand.is_dir():
            folder = str(cand)
            os.environ["NLTK_DATA"] = folder
    if folder:
        import nltk

        for f in folder.split(os.pathsep):
            if f and f not in nltk.data.path:
                nltk.data.path.insert(0, f)
    return folder


# ------------------------------------------------------------------------------------------------- tokenisers
_SENT_SPLIT = re.compile(r"(?<=[.!?])\s+")
_word_tok: Any = None


def wsi_bench_tokenize(text: str) -> list[str]:
    """Tokens of the ``wsi-bench`` convention (see the module docstring)."""
    global _word_tok
    if _word_tok is None:
        from nltk.tokenize import NLTKWordTokenizer

        _word_tok = NLTKWordTokenizer()
    out: list[str] = []
    for sent in _SENT_SPLIT.split(text.lower().strip()):
        if sent:
            out.extend(_word_tok.tokenize(sent))
    return out


_COCO_PUNCT = {"''", "'", "``", "`", ".", "?", "!", ",", ":", "-", "--", "...", ";", "(", ")", "[", "]", "{", "}"}
_SIMPLE_RE = re.compile(r"[a-z0-9]+(?:['’][a-z]+)?|[^\sa-z0-9]")


def simple_coco_tokenize(text: str) -> str:
    """Java-free stand-in for the PTB tokenizer: lower case, punctuation dropped, tokens joined by spaces."""
    toks = _SIMPLE_RE.findall(text.lower().replace("\n", " "))
    return " ".join(t for t in toks if t not in _COCO_PUNCT)


# ------------------------------------------------------------------------------------------------------ input
def _normalise_inputs(preds: Sequence[str], refs: Sequence[str] | Sequence[Sequence[str]]) -> list[list[str]]:
    if isinstance(preds, str):
        raise MetricError("preds must be a list of strings, not one string")
    if len(preds) != len(refs):
        raise MetricError(f"{len(preds)} predictions but {len(refs)} references")
    if not preds:
        raise MetricError("no predictions to score")
    out: list[list[str]] = []
    for i, r in enumerate(refs):
        rl = [r] if isinstance(r, str) else list(r)
        if not rl or not all(isinstance(x, str) for x in rl):
            raise MetricError(f"reference {i} must be a string or a non-empty list of strings")
        out.append(rl)
    for i, p in enumerate(preds):
        if not isinstance(p, str):
            raise MetricError(f"prediction {i} is {type(p).__name__}, not a string")
    return out


# ---------------------------------------------------------------------------------------------- wsi-bench
def _wsi_bench_scores(preds: Sequence[str], refs: list[list[str]], meteor: bool = True) -> dict[str, Any]:
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
    from nltk.translate.meteor_score import meteor_score
    from rouge_score import rouge_scorer

    ensure_nltk_data()
    smooth = SmoothingFunction().method4
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    weights = [(1.0,), (0.5, 0.5), (1 / 3, 1 / 3, 1 / 3), (0.25, 0.25, 0.25, 0.25)]
    sums = dict.fromkeys((*BLEU_KEYS, "ROUGE-L", *(("METEOR",) if meteor else ())), 0.0)
    for pred, rl in zip(preds, refs, strict=True):
        hyp = wsi_bench_tokenize(pred)
        rtoks = [wsi_bench_tokenize(r) for r in rl]
        for key, w in zip(BLEU_KEYS, weights, strict=True):
            sums[key] += float(sentence_bleu(rtoks, hyp, weights=w, smoothing_function=smooth)) if hyp else 0.0
        if len(rl) == 1:
            sums["ROUGE-L"] += scorer.score(rl[0], pred)["rougeL"].fmeasure
        else:
            sums["ROUGE-L"] += scorer.score_multi(rl, pred)["rougeL"].fmeasure
        if not meteor:
            continue
        try:
            sums["METEOR"] += float(meteor_score(rtoks, hyp)) if hyp else 0.0
        except LookupError as exc:  # WordNet missing
            raise MetricError(
                "NLTK METEOR needs WordNet: run scripts/setup-system.sh (it fills <venv>/nltk_data) "
                f"or set NLTK_DATA ({exc.__class__.__name__})"
            ) from exc
    n = len(preds)
    out: dict[str, Any] = {k: v / n for k, v in sums.items()}
    out.update(
        {
            "convention": "wsi-bench",
            "tokenizer": "nltk NLTKWordTokenizer on lower-cased regex-split sentences",
            "aggregation": "mean of per-sample scores; BLEU smoothing method4",
            "n": n,
        }
    )
    return out


# ------------------------------------------------------------------------------------------------------ coco
_meteor_lock = threading.Lock()
_meteor: Any = None


def _coco_meteor() -> Any:
    """One pycocoevalcap Meteor (Java) process per Python process, started on first use."""
    global _meteor
    with _meteor_lock:
        if _meteor is None:
            from pycocoevalcap.meteor.meteor import Meteor

            try:
                _meteor = Meteor()
            except OSError as exc:
                raise MetricError(f"coco METEOR needs Java on PATH ({exc})") from exc
            atexit.register(close_coco_meteor)
        return _meteor


def close_coco_meteor() -> None:
    """Stop the shared METEOR Java process (it is restarted on the next use)."""
    global _meteor
    with _meteor_lock:
        m, _meteor = _meteor, None
    if m is not None:
        try:
            m.meteor_p.stdin.close()
            m.meteor_p.kill()
            m.meteor_p.wait(timeout=10)
        except Exception:  # noqa: BLE001 - best effort at shutdown
            pass


def coco_tokenize(preds: Sequence[str], refs: list[list[str]], tokenizer: str) -> tuple[dict, dict]:
    """``(gts, res)`` dicts ``{i: [tokenised strings]}`` as pycocoevalcap scorers expect them."""
    if tokenizer == "simple":
        gts = {i: [simple_coco_tokenize(r) for r in rl] for i, rl in enumerate(refs)}
        res = {i: [simple_coco_tokenize(p)] for i, p in enumerate(preds)}
        return gts, res
    if tokenizer != "ptb":
        raise MetricError(f"unknown coco tokenizer {tokenizer!r}; use 'ptb' or 'simple'")
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tok = PTBTokenizer()
    # PTB reads one caption per line: an empty caption would shift the lines, so stand in a space-free marker
    # one Java run for references and predictions together (keys ("g", i) / ("r", i))
    both: dict[tuple[str, int], list[dict[str, str]]] = {
        ("g", i): [{"caption": r if r.strip() else "."} for r in rl] for i, rl in enumerate(refs)
    }
    both.update({("r", i): [{"caption": p if p.strip() else "."}] for i, p in enumerate(preds)})
    try:
        out = tok.tokenize(both)
        return (
            {i: out[("g", i)] for i in range(len(refs))},
            {i: out[("r", i)] for i in range(len(preds))},
        )
    except OSError as exc:
        raise MetricError(f"the coco PTB tokenizer needs Java on PATH ({exc}); or use tokenizer='simple'") from exc


def coco_scores_from_tokens(gts: dict, res: dict, meteor: bool = True, cider: bool = True) -> dict[str, float]:
    """pycocoevalcap corpus scores of already tokenised ``gts`` / ``res`` dicts."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    out = {k: float(v) for k, v in zip(BLEU_KEYS, bleu, strict=True)}
    out["ROUGE-L"] = float(Rouge().compute_score(gts, res)[0])
    if meteor:
        # METEOR's line protocol: no newlines or '|||' inside a sentence
        clean = {k: [s.replace("\n", " ") for s in v] for k, v in gts.items()}
        out["METEOR"] = float(_coco_meteor().compute_score(clean, res)[0])
    if cider:
        out["CIDEr"] = float(Cider().compute_score(gts, res)[0])
    return out


def generation_scores(
    preds: Sequence[str],
    refs: Sequence[str] | Sequence[Sequence[str]],
    convention: Convention = "wsi-bench",
    tokenizer: str = "ptb",
    meteor: bool = True,
) -> dict[str, Any]:
    """BLEU-1..4, ROUGE-L, METEOR (and CIDEr for ``coco``) of predictions against one or more references each.

    ``convention`` is ``"wsi-bench"`` or ``"coco"`` (module docstring); ``tokenizer`` applies to ``coco`` only.
    ``meteor=False`` skips METEOR (the slow part: WordNet load or the Java process). Scores are in [0, 1]
    (CIDEr in [0, 10]); the dict also holds ``convention``, ``tokenizer`` and ``n``.
    """
    refs_l = _normalise_inputs(preds, refs)
    if convention == "wsi-bench":
        return _wsi_bench_scores(preds, refs_l, meteor=meteor)
    if convention == "coco":
        gts, res = coco_tokenize(preds, refs_l, tokenizer)
        out: dict[str, Any] = dict(coco_scores_from_tokens(gts, res, meteor=meteor))
        out.update(
            {
                "convention": "coco",
                "tokenizer": "stanford PTBTokenizer (pycocoevalcap), punctuation removed"
                if tokenizer == "ptb"
                else "simple (lower case, punctuation removed; Java-free approximation of PTB)",
                "aggregation": "corpus-level BLEU (closest ref length) and METEOR; mean ROUGE-L / CIDEr",
                "n": len(preds),
            }
        )
        return out
    raise MetricError(f"unknown convention {convention!r}; use one of {CONVENTIONS}")


__all__ = [
    "BLEU_KEYS",
    "CONVENTIONS",
    "MetricError",
    "close_coco_meteor",
    "coco_scores_from_tokens",
    "coco_tokenize",
    "ensure_nltk_data",
    "generation_scores",
    "simple_coco_tokenize",
    "wsi_bench_tokenize",
]
