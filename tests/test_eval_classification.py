"""Classification scores, prompt files, zero-shot classification and the linear probe."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np
import pytest

from hwsi.eval.classification import (
    DEFAULT_TEMPLATES,
    ClassificationError,
    build_class_prompts,
    class_embeddings,
    classification_scores,
    linear_probe,
    load_prompt_set,
    load_prompt_sets,
    zero_shot_classify,
)


def test_classification_scores_hand_values() -> None:
    y_true = [0, 0, 0, 0, 1, 1]
    y_pred = [0, 0, 0, 1, 1, 0]
    s = classification_scores(y_true, y_pred)
    # recalls 3/4 and 1/2 -> 0.625; F1 0.75 (support 4) and 0.5 (support 2) -> 4/6
    assert s["balanced_accuracy"] == pytest.approx(0.625)
    assert s["weighted_f1"] == pytest.approx(4 / 6)
    assert s["accuracy"] == pytest.approx(4 / 6)
    assert s["confusion_matrix"] == [[3, 1], [1, 1]] and s["labels"] == [0, 1] and s["n"] == 6
    assert "balanced_accuracy" in s["convention"]
    from sklearn.metrics import balanced_accuracy_score

    assert s["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y_true, y_pred))
    s2 = classification_scores(["b", "a", "c"], ["b", "a", "a"], labels=["c", "b", "a"])
    assert s2["confusion_matrix"] == [[0, 0, 1], [0, 1, 0], [0, 0, 1]]
    assert s2["balanced_accuracy"] == pytest.approx(2 / 3)
    with pytest.raises(ClassificationError):
        classification_scores([0, 1], [0])


def test_zero_shot_uses_mean_of_normalised_prompt_embeddings() -> None:
    # class A prompts point along x (long) and y (short); normalised mean is the diagonal
    prompts = {"A": np.array([[10.0, 0, 0], [0, 1.0, 0]]), "B": np.array([[0.8, 0.6, 0]])}
    _, w = class_embeddings(prompts)
    assert w[0] == pytest.approx([2**-0.5, 2**-0.5, 0])
    # slide along y: cos to A = 0.707, to B = 0.6 (an un-normalised mean of A's prompts would give 0.0995 -> B)
    assert zero_shot_classify(np.array([[0, 3.0, 0], [1.0, 0, 0], [0, 0, 1.0]]), prompts) == ["A", "B", "A"]
    with pytest.raises(ClassificationError, match="width"):
        zero_shot_classify(np.ones((1, 2)), prompts)


EXPECTED = {
    # file: (n sets, n templates of set 0, classes of set 0, names per class of set 0)
    "brca_prompts.json": (50, 11, ["IDC", "ILC"], [1, 1]),
    "nsclc_prompts.json": (50, 9, ["LUAD", "LUSC"], [1, 1]),
    "rcc_prompts.json": (50, 5, ["CHRCC", "CCRCC", "PRCC"], [1, 1, 1]),
    "crc100k_prompts_all_per_class.json": (1, 22, ["ADI", "BACK", "DEB", "LYM", "MUC", "MUS", "NORM", "STR", "TUM"],
                                           None),
    "nsclc_prompts_all_per_class.json": (1, 22, ["LUAD", "LUSC"], [4, 4]),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_load_real_conch_mizero_prompts(shared_data: Path, name: str) -> None:
    path = shared_data / "text/prompts" / name
    n_sets, n_tmpl, classes, n_names = EXPECTED[name]
    sets = load_prompt_sets(path)
    assert len(sets) == n_sets
    templates, names = load_prompt_set(path)
    assert len(templates) == n_tmpl and list(names) == classes
    if n_names is not None:
        assert [len(v) for v in names.values()] == n_names
    for s in sets:  # every set: same classes, every template has the placeholder
        assert list(s.classnames) == classes and all("CLASSNAME" in t for t in s.templates)
        prompts = s.prompts()
        assert all(len(prompts[c]) == len(s.templates) * len(s.classnames[c]) for c in classes)
        assert not any("CLASSNAME" in p for ps in prompts.values() for p in ps)
    with pytest.raises(ClassificationError, match=f"prompt set {n_sets} requested"):
        load_prompt_set(path, index=n_sets)


def test_load_real_titan_yaml(shared_data: Path) -> None:
    path = shared_data / "text/prompts/titan_config_tcga-ot.yaml"
    templates, names = load_prompt_set(path)
    assert templates == list(DEFAULT_TEMPLATES)
    assert len(names) == 46 and list(names)[:3] == ["AASTR", "ACC", "AOAST"] and list(names)[-1] == "USC"
    assert names["AASTR"] == ["anaplastic astrocytoma", "astrocytoma, anaplastic", "grade III astrocytoma", "AASTR"]
    assert len(names["ASTR"]) == 7


def test_prompt_file_errors(tmp_path: Path) -> None:
    p = tmp_path / "p.json"
    p.write_text('{"0": {"classnames": {"A": "a"}, "templates": ["no placeholder"]}}')
    with pytest.raises(ClassificationError, match=r"p\.json: set '0': templates"):
        load_prompt_sets(p)
    p.write_text("{bad")
    with pytest.raises(ClassificationError, match=r"p\.json \(line 1, column 2\): not valid JSON"):
        load_prompt_sets(p)
    y = tmp_path / "t.yaml"
    y.write_text("label_dict: {A: 0, B: 1}\nprompts: {A: [a]}\n")
    with pytest.raises(ClassificationError, match=r"classes \['B'\] of label_dict have no prompts"):
        load_prompt_sets(y)
    with pytest.raises(ClassificationError, match="not found"):
        load_prompt_sets(tmp_path / "none.json")


def _bow(texts: list[str], dim: int = 256) -> np.ndarray:
    """A deterministic bag-of-words 'text encoder' (hashed word counts)."""
    out = np.zeros((len(texts), dim))
    for i, t in enumerate(texts):
        for w in re.findall(r"[a-z]+", t.lower()):
            out[i, int(hashlib.md5(w.encode()).hexdigest(), 16) % dim] += 1
    return out


def test_zero_shot_end_to_end_on_real_prompts(shared_data: Path) -> None:
    """RCC prompt set 1 through a bag-of-words encoder: slides 'described' by their class name are recovered."""
    templates, names = load_prompt_set(shared_data / "text/prompts/rcc_prompts.json", index=1)
    prompts = build_class_prompts(templates, names)
    emb = {c: _bow(p) for c, p in prompts.items()}
    slides = _bow(["chromophobe renal cell carcinoma", "clear cell renal cell carcinoma",
                   "papillary renal cell carcinoma"])
    assert zero_shot_classify(slides, emb) == ["CHRCC", "CCRCC", "PRCC"]


def test_linear_probe_deterministic_and_selects_on_validation() -> None:
    rng = np.random.default_rng(0)
    n, d = 120, 8
    y = rng.integers(0, 3, n)
    centers = rng.normal(size=(3, d)) * 3
    X = centers[y] + rng.normal(size=(n, d))
    tr, va, te = slice(0, 60), slice(60, 90), slice(90, 120)
    Cs = (1e-4, 1e-2, 1.0, 100.0)
    r1 = linear_probe(X[tr], y[tr], X[va], y[va], X[te], y[te], Cs=Cs)
    r2 = linear_probe(X[tr], y[tr], X[va], y[va], X[te], y[te], Cs=Cs)
    assert r1.best_C == r2.best_C and np.array_equal(r1.test_pred, r2.test_pred)
    assert set(r1.val_balanced_accuracy) == set(Cs)
    best = max(r1.val_balanced_accuracy.values())
    assert r1.val_balanced_accuracy[r1.best_C] == best
    assert r1.best_C == min(c for c, v in r1.val_balanced_accuracy.items() if v == best)  # ties -> smaller C
    assert r1.test["balanced_accuracy"] > 0.9 and r1.classes == [0, 1, 2]
    assert "validation" in r1.convention
    with pytest.raises(ClassificationError, match="single class"):
        linear_probe(X[tr], np.zeros(60), X[va], y[va], X[te], y[te])
    with pytest.raises(ClassificationError, match="widths differ"):
        linear_probe(X[tr], y[tr], X[va, :4], y[va], X[te], y[te])
