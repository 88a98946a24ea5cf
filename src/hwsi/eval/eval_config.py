"""Settings of an evaluation run (:class:`EvalConfig`, every field recorded in each task's JSON), of scoring another
tool's answers (:class:`ScoreConfig`, ``hwsi score``), and the error a task raises when it cannot run on this
model/data (:class:`TaskError`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import numpy as np

from hwsi.config import PositiveInt
from hwsi.errors import HwsiError

#: record categories of the generation tasks (compared case-insensitively); vqa = every other category
TASK_CATEGORIES: dict[str, tuple[str, ...]] = {"report": ("report",), "caption": ("caption",)}
DEFAULT_MAX_NEW_TOKENS: dict[str, int] = {"report": 256, "caption": 96, "vqa": 64}
SYNTHPATH_PROMPTS = Path(__file__).with_name("prompts") / "synthpath.json"


class TaskError(HwsiError):
    """A task cannot run on this model/data (the message says what is missing)."""


class TextEncoderLike(Protocol):
    """Anything with ``encode(list[str]) -> (N, D)`` (hwsi.features.encoders text encoders)."""

    def encode(self, texts: list[str]) -> np.ndarray: ...  # pragma: no cover


@dataclass
class EvalConfig:
    """Settings of an evaluation run (every field is recorded in each task's JSON)."""

    convention: Literal["wsi-bench", "coco"] = "wsi-bench"  # generation metrics (hwsi.eval.metrics)
    coco_tokenizer: Literal["ptb", "simple"] = "ptb"  # coco only: "ptb" (Java) | "simple"
    meteor: bool = True
    limit: int = 0  # N test samples: slides (sorted ids) or items (round-robin over slides, file order); 0 = all
    batch_size: int = 4
    answer_batch_size: PositiveInt = 32  # questions per batched greedy generation (hwsi.model.generate)
    max_new_tokens: int = 0  # 0 = DEFAULT_MAX_NEW_TOKENS[task]
    shuffled_baseline: bool = True
    shuffle_seed: int = 0
    text_encoder: str = "minilm"
    prompt_file: str = ""  # zero-shot prompts; "" = packaged SynthPath prompts
    prompt_set: int = 0
    label_key: str = "diagnosis"  # SynthPath: a fact name ("diagnosis", "extent", ...) or "label" (9 classes)
    embedding: Literal["auto", "z_wsi", "slide_token"] = "auto"
    probe_Cs: tuple[float, ...] = tuple(float(c) for c in np.logspace(-4, 4, 9))
    retrieval_ks: tuple[int, ...] = (1, 3, 5)
    recall_ks: tuple[int, ...] = (1, 3, 5, 10)
    patch_encoder: str = ""  # override the store's recorded encoder names
    region_input: str = ""
    # docs/devices.md: where the model runs and the LLM's dtype ("" = the run's llm_dtype); each task's JSON
    # records the resolved values (hwsi.devices.resolve_placement)
    device: str = "cpu"  # cpu | cuda | cuda:N | auto
    dtype: Literal["", "float32", "bfloat16", "float16"] = ""

    def tokens_for(self, task: str) -> int:
        return self.max_new_tokens or DEFAULT_MAX_NEW_TOKENS.get(task, 128)


@dataclass
class ScoreConfig:
    """Settings of ``hwsi score`` (hwsi.eval.score; every field recorded in each result JSON)."""

    convention: Literal["wsi-bench", "coco"] = "wsi-bench"  # text metrics (hwsi.eval.metrics)
    coco_tokenizer: Literal["ptb", "simple"] = "ptb"  # coco only
    meteor: bool = True
    missing: Literal["skip", "wrong"] = "skip"  # questions without an answer: left out, or scored as empty answers
    split: str = "test"  # SynthPath cohort folder: the records of text/<split>.jsonl
