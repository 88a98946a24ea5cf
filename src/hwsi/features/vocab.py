"""The fixed SPF text vocabulary (docs/design.md §5) and the paper's report-entity variant (§3.3, Eq. 2).

SPF ranks patches by their mean cosine similarity to M text entities t_m (Eq. 2). The paper takes the entities
from the slide's report; that leaks the answer into the visual tokens during training and has no counterpart at
inference. hwsi's default is ONE fixed, configurable pathology vocabulary used for training, evaluation and
inference, so a slide's visual prefix is the same for every question and can be cached.

* :data:`DEFAULT_VOCABULARY` — short morphology terms covering cells, patches and architecture;
* :func:`load_vocabulary` — a user vocabulary from a text file (one term per line, ``#`` comments) or a YAML file
  (a list, or a mapping with a ``terms`` list);
* :func:`vocabulary_fingerprint` — a short hash recorded in the store, so a changed vocabulary re-runs SPF;
* :func:`entities_from_report` — the report-entity option: stop-word/punctuation chunking into short noun-phrase
  like entities, without any network model.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from pathlib import Path

from hwsi import textio
from hwsi.config import read_yaml
from hwsi.errors import ConfigError, ConfigFileError

DEFAULT_VOCABULARY: tuple[str, ...] = (
    # cells
    "nuclear atypia",
    "nuclear pleomorphism",
    "enlarged hyperchromatic nuclei",
    "prominent nucleoli",
    "mitotic figures",
    "apoptotic bodies",
    "lymphocytes",
    "plasma cells",
    "neutrophils",
    "eosinophils",
    "macrophages",
    "tumor cells",
    "signet ring cells",
    "multinucleated giant cells",
    # patches: tissue patterns
    "gland formation",
    "well formed glands",
    "poorly formed glands",
    "cribriform architecture",
    "papillary structures",
    "solid sheets of tumor cells",
    "single cell infiltration",
    "tumor nests",
    "stroma",
    "desmoplastic stroma",
    "fibrosis",
    "smooth muscle",
    "adipose tissue",
    "blood vessels",
    "hemorrhage",
    "necrosis",
    "comedo necrosis",
    "mucin",
    "keratin pearls",
    "calcification",
    "inflammation",
    "lymphoid aggregates",
    "normal epithelium",
    "squamous epithelium",
    "dysplasia",
    # regions and beyond
    "invasive carcinoma",
    "carcinoma in situ",
    "tumor budding",
    "lymphovascular invasion",
    "perineural invasion",
    "infiltrative growth pattern",
    "tumor stroma interface",
    "benign tissue",
    "high grade tumor",
    "low grade tumor",
)

_STOPWORDS = frozenset(
    """
    a about above after again against all also am an and any are as at be because been before being below between
    both but by can could did do does doing down during each either few for from further had has have having he her
    here hers herself him himself his how i if in into is it its itself just may me might more most must my myself
    neither no nor not now of off on once only or other our ours out over own per same she should shows show showing
    shown so some such than that the their theirs them themselves then there these they this those through to too
    under until up upon very was we were what when where which while who whom why will with within without would you
    your yours is are seen noted identified present presents presenting observed consistent compatible
    demonstrate demonstrates demonstrating reveal reveals revealing contain contains containing appear appears
    there's it's slide section sections specimen image whole area areas
    """.split()
)

_SPLIT = re.compile(r"[.,;:!?()\[\]{}\"/\n\r\t]+|\s-\s")
_WORD = re.compile(r"[a-z][a-z0-9+\-']*")


def _clean_terms(terms: Sequence[str], where: str) -> tuple[str, ...]:
    out: list[str] = []
    seen: set[str] = set()
    for t in terms:
        if not isinstance(t, str):
            raise ConfigError(f"{where}: vocabulary terms must be strings, got {t!r}")
        t = " ".join(t.split())
        if t and t.lower() not in seen:
            seen.add(t.lower())
            out.append(t)
    if not out:
        raise ConfigError(f"{where}: the vocabulary is empty")
    return tuple(out)


def load_vocabulary(path: str | Path | None = None) -> tuple[str, ...]:
    """The SPF vocabulary: :data:`DEFAULT_VOCABULARY` if ``path`` is None, else the terms in ``path``.

    ``.yaml``/``.yml``: a list of strings or a mapping with key ``terms``; anything else: one term per line, blank
    lines and ``#`` comments ignored. Duplicates (case-insensitive) are dropped, order kept.
    """
    if path is None:
        return DEFAULT_VOCABULARY
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: vocabulary file not found")
    text = textio.read_text(p, ConfigFileError)
    if p.suffix.lower() in (".yaml", ".yml"):
        data = read_yaml(p)
        if isinstance(data, dict):
            if "terms" not in data:
                raise ConfigError(f"{p}: a YAML vocabulary mapping needs a 'terms' list")
            data = data["terms"]
        if not isinstance(data, list):
            raise ConfigError(f"{p}: expected a list of terms (or a mapping with 'terms')")
        return _clean_terms(data, str(p))
    lines = [ln.split("#", 1)[0].strip() for ln in text.splitlines()]
    return _clean_terms([ln for ln in lines if ln], str(p))


def vocabulary_fingerprint(terms: Sequence[str]) -> str:
    """Short stable hash of the terms (order matters only through the set: sorted, lower-cased)."""
    joined = "\n".join(sorted(t.lower() for t in terms))
    return hashlib.sha256(joined.encode()).hexdigest()[:16]


def entities_from_report(report: str, max_words: int = 4, max_entities: int = 64) -> list[str]:
    """Split a pathology report into short entity phrases (the paper's D = {w_1..w_M}, Eq. 2), offline.

    Text is lower-cased and cut at punctuation and stop words; each remaining run of content words is an entity,
    runs longer than ``max_words`` are cut into ``max_words`` pieces; tokens that are only digits are dropped.
    Duplicates are removed keeping first occurrence; at most ``max_entities`` are returned.
    Example: "Sections show invasive carcinoma with cribriform architecture and necrosis." →
    ["invasive carcinoma", "cribriform architecture", "necrosis"].
    """
    if max_words < 1:
        raise ConfigError(f"entities_from_report: max_words must be >= 1, got {max_words}")
    entities: list[str] = []
    seen: set[str] = set()

    def emit(run: list[str]) -> None:
        for s in range(0, len(run), max_words):
            phrase = " ".join(run[s : s + max_words])
            if phrase and phrase not in seen:
                seen.add(phrase)
                entities.append(phrase)

    for piece in _SPLIT.split(report.lower()):
        run: list[str] = []
        for tok in piece.split():
            w = _WORD.search(tok)
            word = w.group(0).strip("-'") if w else ""
            if not word or word in _STOPWORDS or word.isdigit() or len(word) < 2:
                if run:
                    emit(run)
                run = []
            else:
                run.append(word)
        if run:
            emit(run)
    return entities[:max_entities]
