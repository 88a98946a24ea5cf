"""Slide classification scores, zero-shot classification from prompt embeddings, and the linear probe.

* :func:`classification_scores` -- balanced accuracy (mean per-class recall, sklearn), weighted F1, accuracy and
  the confusion matrix (rows: true class, columns: predicted class, in ``labels`` order).
* Zero-shot (CONCH / MI-Zero convention): each class prompt is ``template.replace("CLASSNAME", name)`` for every
  template x class name; the text embeddings of one class are L2-normalised, averaged and re-normalised into a
  class embedding; a slide is assigned the class of highest cosine similarity with its L2-normalised embedding.
  :func:`load_prompt_set` reads the CONCH/MI-Zero prompt json (``{"0": {"classnames": {cls: name | [names]},
  "templates": [...]}, ...}``) and the TITAN task yaml (``prompts: {cls: [names]}``, ``label_dict`` order, no
  templates -- :data:`DEFAULT_TEMPLATES` are used).
* Linear probe: L2-regularised multinomial logistic regression (sklearn ``lbfgs``) on standardised features
  (mean/std of the training split); ``C`` chosen by balanced accuracy on the validation split (ties -> smaller
  C, i.e. stronger regularisation), refit on the training split only, then scored on the test split.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hwsi import textio
from hwsi.config import read_yaml
from hwsi.errors import HwsiError, InputFileError


class ClassificationError(HwsiError):
    """Bad classification input or prompt file (the message names the file)."""


#: Templates used when a prompt file has none (TITAN's yaml); CLASSNAME is replaced by each class name.
DEFAULT_TEMPLATES: tuple[str, ...] = (
    "CLASSNAME.",
    "an image of CLASSNAME.",
    "an image showing CLASSNAME.",
    "an example of CLASSNAME.",
    "CLASSNAME is shown.",
    "this is CLASSNAME.",
    "there is CLASSNAME.",
    "a histopathological image of CLASSNAME.",
    "a histopathological image showing CLASSNAME.",
    "a histopathological photograph of CLASSNAME.",
    "a photomicrograph of CLASSNAME.",
    "presence of CLASSNAME.",
    "an H&E stained image of CLASSNAME.",
)


# ---------------------------------------------------------------------------------------------------- scores
def classification_scores(
    y_true: Sequence[Any] | np.ndarray, y_pred: Sequence[Any] | np.ndarray, labels: Sequence[Any] | None = None
) -> dict[str, Any]:
    """Balanced accuracy, weighted F1, accuracy, confusion matrix (``labels`` order; default sorted union)."""
    from sklearn.metrics import balanced_accuracy_score, confusion_matrix, f1_score

    yt, yp = np.asarray(y_true), np.asarray(y_pred)
    if yt.shape != yp.shape or yt.ndim != 1:
        raise ClassificationError(f"y_true {yt.shape} and y_pred {yp.shape} must be equal-length 1-D arrays")
    if yt.size == 0:
        raise ClassificationError("no samples to score")
    labs = list(labels) if labels is not None else sorted(set(yt.tolist()) | set(yp.tolist()))
    return {
        "convention": "sklearn balanced_accuracy (mean recall over classes present in y_true), weighted F1",
        "balanced_accuracy": float(balanced_accuracy_score(yt, yp)),
        "weighted_f1": float(f1_score(yt, yp, labels=labs, average="weighted", zero_division=0)),
        "accuracy": float(np.mean(yt == yp)),
        "confusion_matrix": confusion_matrix(yt, yp, labels=labs).tolist(),
        "labels": labs,
        "n": int(yt.size),
    }


# ------------------------------------------------------------------------------------------------- zero-shot
def _l2n(x: np.ndarray, axis: int = -1) -> np.ndarray:
    n = np.linalg.norm(x, axis=axis, keepdims=True)
    return x / np.maximum(n, 1e-12)


def class_embeddings(class_prompt_emb: Mapping[str, np.ndarray]) -> tuple[list[str], np.ndarray]:
    """``(classes, (C, D) matrix)``: per class the mean of L2-normalised prompt embeddings, re-normalised."""
    classes = list(class_prompt_emb)
    if not classes:
        raise ClassificationError("no classes given")
    rows = []
    dim = None
    for c in classes:
        e = np.asarray(class_prompt_emb[c], dtype=np.float64)
        if e.ndim == 1:
            e = e[None]
        if e.ndim != 2 or e.shape[0] == 0:
            raise ClassificationError(f"class {c!r}: prompt embeddings must be (n_prompts, D), got {e.shape}")
        if dim is not None and e.shape[1] != dim:
            raise ClassificationError(f"class {c!r}: embedding width {e.shape[1]} differs from {dim}")
        dim = e.shape[1]
        rows.append(_l2n(_l2n(e).mean(axis=0)))
    return classes, np.stack(rows)


def zero_shot_scores(slide_emb: np.ndarray, class_prompt_emb: Mapping[str, np.ndarray]) -> tuple[list[str], np.ndarray]:
    """``(classes, (N, C) cosine similarities)`` of slides to the class embeddings."""
    x = np.asarray(slide_emb, dtype=np.float64)
    if x.ndim != 2:
        raise ClassificationError(f"slide embeddings must be (N, D), got {x.shape}")
    classes, w = class_embeddings(class_prompt_emb)
    if w.shape[1] != x.shape[1]:
        raise ClassificationError(f"slide embedding width {x.shape[1]} != prompt embedding width {w.shape[1]}")
    return classes, _l2n(x) @ w.T


def zero_shot_classify(slide_emb: np.ndarray, class_prompt_emb: Mapping[str, np.ndarray]) -> list[str]:
    """Predicted class per slide (argmax cosine similarity; ties -> the first class in dict order)."""
    classes, sims = zero_shot_scores(slide_emb, class_prompt_emb)
    return [classes[i] for i in sims.argmax(axis=1)]


@dataclass
class PromptSet:
    """Templates and class names of one zero-shot prompt set (classes in file order)."""

    templates: list[str]
    classnames: dict[str, list[str]]
    source: str = ""

    def prompts(self) -> dict[str, list[str]]:
        """Every template x name per class (``CLASSNAME`` replaced)."""
        return build_class_prompts(self.templates, self.classnames)


def build_class_prompts(templates: Sequence[str], classnames: Mapping[str, Sequence[str]]) -> dict[str, list[str]]:
    """``{class: [template with CLASSNAME -> name, for name in names for template in templates]}``."""
    return {c: [t.replace("CLASSNAME", n) for n in names for t in templates] for c, names in classnames.items()}


def _names(v: Any, path: Path, where: str) -> list[str]:
    if isinstance(v, str):
        return [v]
    if isinstance(v, list) and v and all(isinstance(x, str) for x in v):
        return list(v)
    raise ClassificationError(f"{path}: {where}: class names must be a string or a list of strings, got {v!r}")


def load_prompt_sets(path: str | Path) -> list[PromptSet]:
    """All prompt sets of a file: one per key of a CONCH / MI-Zero json (MI-Zero files hold 50), one for TITAN yaml."""
    path = Path(path)
    if not path.is_file():
        raise ClassificationError(f"{path}: prompt file not found")
    try:
        text = textio.read_text(path)
    except InputFileError as exc:
        raise ClassificationError(str(exc)) from None
    if path.suffix.lower() in (".yaml", ".yml"):
        data = read_yaml(path, ClassificationError)
        if not isinstance(data, dict) or not isinstance(data.get("prompts"), dict):
            raise ClassificationError(f"{path}: expected a 'prompts' mapping {{class: [names]}} (TITAN task yaml)")
        prompts = data["prompts"]
        order = list(prompts)
        if isinstance(data.get("label_dict"), dict):
            ld = data["label_dict"]
            missing = [c for c in ld if c not in prompts]
            if missing:
                raise ClassificationError(f"{path}: classes {missing} of label_dict have no prompts")
            order = sorted(ld, key=lambda c: ld[c])
        names = {c: _names(prompts[c], path, f"prompts.{c}") for c in order}
        templates = data.get("templates") or list(DEFAULT_TEMPLATES)
        return [PromptSet(list(templates), names, f"{path.name}")]
    try:
        data = textio.parse_json(text, path)
    except InputFileError as exc:
        raise ClassificationError(str(exc)) from None
    if isinstance(data, dict) and "classnames" in data:
        data = {"0": data}
    if not isinstance(data, dict) or not data:
        raise ClassificationError(f"{path}: expected {{'0': {{'classnames': ..., 'templates': [...]}}, ...}}")
    sets = []
    for key, entry in data.items():
        if not isinstance(entry, dict) or "classnames" not in entry or "templates" not in entry:
            raise ClassificationError(f"{path}: set {key!r} needs 'classnames' and 'templates'")
        tmpl = entry["templates"]
        if not isinstance(tmpl, list) or not tmpl or not all(isinstance(t, str) and "CLASSNAME" in t for t in tmpl):
            raise ClassificationError(f"{path}: set {key!r}: templates must be strings containing CLASSNAME")
        cn = entry["classnames"]
        if not isinstance(cn, dict) or not cn:
            raise ClassificationError(f"{path}: set {key!r}: classnames must be a non-empty mapping")
        sets.append(PromptSet(list(tmpl), {c: _names(v, path, f"set {key}, class {c}") for c, v in cn.items()},
                              f"{path.name}#{key}"))
    return sets


def load_prompt_set(path: str | Path, index: int = 0) -> tuple[list[str], dict[str, list[str]]]:
    """``(templates, {class: [names]})`` of prompt set ``index`` of a CONCH / MI-Zero json or TITAN yaml."""
    sets = load_prompt_sets(path)
    if not 0 <= index < len(sets):
        raise ClassificationError(f"{path}: prompt set {index} requested, the file holds {len(sets)}")
    return sets[index].templates, sets[index].classnames


# ----------------------------------------------------------------------------------------------- linear probe
@dataclass
class LinearProbeResult:
    """Outcome of :func:`linear_probe`."""

    best_C: float
    val_balanced_accuracy: dict[float, float]
    test: dict[str, Any]
    test_pred: np.ndarray
    classes: list[Any] = field(default_factory=list)
    model: Any = None
    convention: str = (
        "sklearn LogisticRegression(lbfgs, L2) on train-standardised features; C by validation balanced accuracy "
        "(ties -> smaller C); refit on train"
    )


def linear_probe(
    train_X: np.ndarray,
    train_y: Sequence[Any] | np.ndarray,
    val_X: np.ndarray,
    val_y: Sequence[Any] | np.ndarray,
    test_X: np.ndarray,
    test_y: Sequence[Any] | np.ndarray,
    Cs: Sequence[float] = tuple(float(c) for c in np.logspace(-4, 4, 9)),
    max_iter: int = 2000,
    standardize: bool = True,
) -> LinearProbeResult:
    """Logistic-regression linear probe with ``C`` chosen on the validation split (deterministic)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score

    Xtr, Xva, Xte = (np.asarray(a, dtype=np.float64) for a in (train_X, val_X, test_X))
    ytr, yva, yte = (np.asarray(a) for a in (train_y, val_y, test_y))
    for name, X, y in (("train", Xtr, ytr), ("val", Xva, yva), ("test", Xte, yte)):
        if X.ndim != 2 or len(X) != len(y) or len(X) == 0:
            raise ClassificationError(f"{name}: X must be (N, D) with N == len(y) > 0; got {X.shape}, {len(y)}")
    if not (Xtr.shape[1] == Xva.shape[1] == Xte.shape[1]):
        raise ClassificationError("train/val/test feature widths differ")
    if len(np.unique(ytr)) < 2:
        raise ClassificationError("the training split holds a single class")
    if not Cs:
        raise ClassificationError("no C values to try")
    if standardize:
        mu, sd = Xtr.mean(axis=0), Xtr.std(axis=0)
        sd[sd < 1e-12] = 1.0
        Xtr, Xva, Xte = (Xtr - mu) / sd, (Xva - mu) / sd, (Xte - mu) / sd

    def fit(c: float) -> Any:
        return LogisticRegression(C=c, max_iter=max_iter, solver="lbfgs").fit(Xtr, ytr)

    scores: dict[float, float] = {}
    models: dict[float, Any] = {}
    for c in sorted(float(c) for c in Cs):
        m = fit(c)
        scores[c] = float(balanced_accuracy_score(yva, m.predict(Xva)))
        models[c] = m
    best = max(scores.values())
    best_c = min(c for c, s in scores.items() if s == best)
    model = models[best_c]
    pred = model.predict(Xte)
    return LinearProbeResult(
        best_C=best_c,
        val_balanced_accuracy=scores,
        test=classification_scores(yte, pred),
        test_pred=pred,
        classes=list(model.classes_),
        model=model,
    )


__all__ = [
    "DEFAULT_TEMPLATES",
    "ClassificationError",
    "LinearProbeResult",
    "PromptSet",
    "build_class_prompts",
    "class_embeddings",
    "classification_scores",
    "linear_probe",
    "load_prompt_set",
    "load_prompt_sets",
    "zero_shot_classify",
    "zero_shot_scores",
]
