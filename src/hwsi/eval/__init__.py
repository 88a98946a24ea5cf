"""hwsi.eval: model-agnostic evaluation (generation metrics, VQA, classification, retrieval).

Every result dict names its convention (``"convention"`` key); see each module's docstring. Heavy dependencies
(nltk, rouge-score, pycocoevalcap, sklearn) are imported inside the functions that use them.
"""

from hwsi.eval.classification import (
    classification_scores,
    linear_probe,
    load_prompt_set,
    load_prompt_sets,
    zero_shot_classify,
)
from hwsi.eval.metrics import generation_scores
from hwsi.eval.retrieval import cross_modal_recall, slide_retrieval
from hwsi.eval.vqa import evaluate_items, open_answer_scores, parse_choice, vqa_accuracy

__all__ = [
    "classification_scores",
    "cross_modal_recall",
    "evaluate_items",
    "generation_scores",
    "linear_probe",
    "load_prompt_set",
    "load_prompt_sets",
    "open_answer_scores",
    "parse_choice",
    "slide_retrieval",
    "vqa_accuracy",
    "zero_shot_classify",
]
