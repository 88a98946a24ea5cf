"""The training loop behind ``hwsi train-encoder`` (registered in :mod:`hwsi.train.commands`): train the small
patch encoder CLIP-style against the FROZEN MiniLM text encoder.

Data: SynthPath patch–caption pairs (``hwsi.synth.patches.sample_patch_dataset``). The text tower is frozen, so each
distinct caption is embedded once (cached) and training only runs the small CNN. Loss: symmetric InfoNCE with a
learnable temperature; samples that share the exact same caption count as positives of each other (templated
captions repeat, and a repeated caption is not a negative). Augmentation: the 8 dihedral flips/rotations (tissue has
no orientation) and a mild per-sample brightness/contrast jitter.

Evaluation: zero-shot patch classification on HELD-OUT patches never trained on — by default
``n * val_fraction`` patches drawn from OTHER SynthPath scenes (seed + 7919), because SynthPath's patch set reuses
each rendered patch under 8 flips/rotations and a random split would leak them; each label is turned into prompts (``prompt_templates``) through MiniLM, prompts are averaged per
class, and each patch is assigned the class of highest cosine similarity. Accuracy, balanced accuracy and chance
(1 / n_classes) are written to ``encoder.json["extra"]`` and ``train_metrics.json``.

The checkpoint folder loads by name: ``create_encoder("hwsi_small_patch", checkpoint=OUT)``.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from hwsi.errors import HwsiError

if TYPE_CHECKING:  # torch and the encoders load lazily: `hwsi --help` must stay fast
    import torch

    from hwsi.features.encoders.text import TextEncoder


def _encoder_error(msg: str) -> HwsiError:
    from hwsi.features.encoders import EncoderError

    return EncoderError(msg)

DEFAULT_TEMPLATES: tuple[str, ...] = (
    "an H&E image patch of {}.",
    "a histology patch showing {}.",
    "{}.",
)


class PatchDatasetLike(Protocol):
    """What the trainer needs from ``hwsi.synth.PatchDataset``."""

    images: np.ndarray  # (n, P, P, 3) uint8
    captions: list[str]
    labels: list[str]


@dataclass
class TrainEncoderConfig:
    """Training of ``hwsi_small_patch``. Defaults: the demo configuration (~1 min on 2 CPU cores)."""

    n: int = 4000
    epochs: int = 8
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_fraction: float = 0.05
    temperature: float = 0.07
    seed: int = 0
    patch_px: int = 256
    mpp: float = 0.5
    val_fraction: float = 0.2
    text_encoder: str = "minilm"
    prompt_templates: tuple[str, ...] = DEFAULT_TEMPLATES
    jitter: float = 0.1
    encoder_overrides: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainEncoderResult:
    """Outcome of :func:`train_small_encoder` (also written to ``OUT/train_metrics.json``)."""

    out_dir: str
    n_train: int
    n_val: int
    held_out: str
    classes: list[str]
    zero_shot_accuracy: float
    zero_shot_balanced_accuracy: float
    chance: float
    train_seconds: float
    unique_captions: int
    epoch_losses: list[float]
    confusion: list[list[int]]


def label_to_text(label: str) -> str:
    """``"adenocarcinoma_low_grade"`` -> ``"adenocarcinoma low grade"``."""
    return label.replace("_", " ").strip()


def class_text_embeddings(text_encoder: TextEncoder, classes: list[str], templates: tuple[str, ...]) -> np.ndarray:
    """(C, D) unit vectors: per class, the mean of its L2-normalised prompt embeddings, re-normalised."""
    if not templates:
        raise _encoder_error("at least one prompt template is needed for zero-shot classification")
    prompts = [t.format(label_to_text(c)) for c in classes for t in templates]
    emb = text_encoder.encode(prompts).reshape(len(classes), len(templates), -1)
    emb /= np.linalg.norm(emb, axis=-1, keepdims=True) + 1e-12
    mean = emb.mean(axis=1)
    return mean / (np.linalg.norm(mean, axis=-1, keepdims=True) + 1e-12)


def zero_shot_classify(image_features: np.ndarray, class_embeddings: np.ndarray) -> np.ndarray:
    """Index of the class whose text embedding has the highest cosine similarity to each image feature."""
    f = image_features / (np.linalg.norm(image_features, axis=-1, keepdims=True) + 1e-12)
    return np.argmax(f @ class_embeddings.T, axis=1)


def zero_shot_metrics(pred: np.ndarray, true: np.ndarray, n_classes: int) -> dict[str, Any]:
    """Accuracy, balanced accuracy (mean recall over present classes), chance and the confusion matrix."""
    conf = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(conf, (true, pred), 1)
    support = conf.sum(axis=1)
    present = support > 0
    recall = np.diag(conf)[present] / support[present]
    return {
        "accuracy": float((pred == true).mean()) if len(true) else float("nan"),
        "balanced_accuracy": float(recall.mean()) if present.any() else float("nan"),
        "chance": 1.0 / n_classes,
        "confusion": conf.tolist(),
    }


def stratified_split(labels: list[str], val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Train / held-out indices, stratified by label (each label with >= 2 samples has >= 1 held out)."""
    if not 0.0 < val_fraction < 1.0:
        raise _encoder_error(f"val_fraction must be in (0, 1), got {val_fraction}")
    rng = np.random.default_rng(seed)
    arr = np.asarray(labels)
    train, val = [], []
    for lab in sorted(set(labels)):
        idx = np.flatnonzero(arr == lab)
        rng.shuffle(idx)
        k = int(round(len(idx) * val_fraction))
        k = min(max(k, 1 if len(idx) >= 2 else 0), len(idx) - 1) if len(idx) > 1 else 0
        val.extend(idx[:k])
        train.extend(idx[k:])
    return np.sort(np.asarray(train, dtype=np.int64)), np.sort(np.asarray(val, dtype=np.int64))


def _augment(x: torch.Tensor, jitter: float, gen: torch.Generator) -> torch.Tensor:
    """Random dihedral transform per sample, plus brightness/contrast jitter in normalised space."""
    import torch
    b = x.shape[0]
    flips = torch.rand(b, 3, generator=gen) < 0.5
    x = torch.where(flips[:, 0, None, None, None], x.flip(-1), x)
    x = torch.where(flips[:, 1, None, None, None], x.flip(-2), x)
    x = torch.where(flips[:, 2, None, None, None], x.transpose(-1, -2), x)
    if jitter > 0:
        scale = 1.0 + jitter * torch.randn(b, 3, 1, 1, generator=gen)
        shift = jitter * torch.randn(b, 3, 1, 1, generator=gen)
        x = x * scale + shift
    return x


def _contrastive_loss(z: torch.Tensor, t: torch.Tensor, caption_ids: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric multi-positive InfoNCE between unit image vectors ``z`` and unit caption vectors ``t``."""
    import torch
    logits = logit_scale.exp() * z @ t.T
    pos = caption_ids[:, None] == caption_ids[None, :]
    neg_inf = torch.finfo(logits.dtype).min
    i2t = torch.logsumexp(logits, dim=1) - torch.logsumexp(logits.masked_fill(~pos, neg_inf), dim=1)
    t2i = torch.logsumexp(logits, dim=0) - torch.logsumexp(logits.masked_fill(~pos, neg_inf), dim=0)
    return 0.5 * (i2t.mean() + t2i.mean())


VAL_SEED_OFFSET = 7919


def _load_synth(cfg: TrainEncoderConfig, n: int, seed: int) -> PatchDatasetLike:
    from hwsi.synth.patches import sample_patch_dataset

    return sample_patch_dataset(n, seed=seed, patch_px=cfg.patch_px, mpp=cfg.mpp)


def _check_dataset(data: PatchDatasetLike) -> None:
    n = len(data.captions)
    if data.images.ndim != 4 or data.images.shape[0] != n or len(data.labels) != n:
        raise _encoder_error(
            f"dataset sizes disagree: images {tuple(data.images.shape)}, {n} captions, {len(data.labels)} labels"
        )
    if n < 4:
        raise _encoder_error(f"need at least 4 patch-caption pairs, got {n}")


def _log(progress: bool, msg: str) -> None:
    if progress:
        print(msg, flush=True)


def train_small_encoder(
    cfg: TrainEncoderConfig,
    out_dir: str | Path,
    dataset: PatchDatasetLike | None = None,
    val_dataset: PatchDatasetLike | None = None,
    text_encoder: TextEncoder | None = None,
    progress: bool = True,
) -> TrainEncoderResult:
    """Train ``hwsi_small_patch`` against the frozen text encoder; save to ``out_dir``; return held-out metrics.

    ``dataset`` defaults to ``hwsi.synth.patches.sample_patch_dataset(cfg.n, cfg.seed, cfg.patch_px, cfg.mpp)`` and the
    held-out set then to ``n * val_fraction`` patches of another seed (other scenes). With a given ``dataset`` and no
    ``val_dataset``, a stratified ``val_fraction`` of it is held out. ``text_encoder`` defaults to
    ``create_text_encoder(cfg.text_encoder)`` (pass one in to reuse a loaded model).
    """
    import torch
    import torch.nn.functional as F

    from hwsi.features.encoders import create_encoder, create_text_encoder, save_encoder
    from hwsi.features.encoders.small import SmallPatchEncoder

    t_start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    if dataset is None:
        # held out = patches of OTHER SynthPath scenes (another seed): the train set's flipped/rotated copies
        # of one rendered patch never leak into the evaluation
        data = _load_synth(cfg, cfg.n, cfg.seed)
        val_data = val_dataset or _load_synth(cfg, max(4, round(cfg.n * cfg.val_fraction)), cfg.seed + VAL_SEED_OFFSET)
    else:
        data, val_data = dataset, val_dataset
    _check_dataset(data)
    if val_data is None:
        train_idx, val_idx = stratified_split(list(data.labels), cfg.val_fraction, cfg.seed)
        val_images, val_labels = data.images[val_idx], [data.labels[i] for i in val_idx]
        held_out = f"stratified {cfg.val_fraction:.0%} of the given dataset"
    else:
        _check_dataset(val_data)
        train_idx = np.arange(len(data.labels))
        val_images, val_labels = val_data.images, list(val_data.labels)
        held_out = "a separate dataset" if dataset is not None or val_dataset is not None else (
            f"SynthPath seed {cfg.seed + VAL_SEED_OFFSET}")
    text = text_encoder if text_encoder is not None else create_text_encoder(cfg.text_encoder)
    text.eval()
    for p in text.parameters():
        p.requires_grad_(False)

    encoder = create_encoder("hwsi_small_patch", **{"seed": cfg.seed, **cfg.encoder_overrides})
    if not isinstance(encoder, SmallPatchEncoder):  # pragma: no cover - registry invariant
        raise _encoder_error("hwsi_small_patch did not build a SmallPatchEncoder")
    if encoder.embed_dim != text.embed_dim:
        raise _encoder_error(f"image embed_dim {encoder.embed_dim} != text embed_dim {text.embed_dim}")
    encoder.config.text_encoder = cfg.text_encoder
    classes = sorted(set(data.labels) | set(val_labels))
    val_true = np.asarray([classes.index(lab) for lab in val_labels], dtype=np.int64)

    # inputs: resized + normalised once (the network sees 64 px); captions: embedded once (frozen tower)
    with torch.no_grad():
        x_all = torch.cat([encoder.preprocess(data.images[s : s + 256]) for s in range(0, len(data.labels), 256)])
        x_val = torch.cat([encoder.preprocess(val_images[s : s + 256]) for s in range(0, len(val_labels), 256)]) \
            if len(val_labels) else torch.zeros(0, 3, encoder.input_size, encoder.input_size)
    uniq, cap_ids = np.unique(np.asarray(data.captions, dtype=object).astype(str), return_inverse=True)
    t0 = time.perf_counter()
    cap_emb = torch.from_numpy(text.encode(list(uniq), batch_size=128))
    cap_emb = F.normalize(cap_emb, dim=-1)
    _log(progress, f"train-encoder: {len(train_idx)} training patches, {len(val_labels)} held out ({held_out}); "
         f"{len(uniq)} distinct captions embedded in {time.perf_counter() - t0:.1f}s")
    cap_ids_t = torch.from_numpy(cap_ids.astype(np.int64))

    logit_scale = torch.nn.Parameter(torch.tensor(math.log(1.0 / cfg.temperature)))
    params = [p for p in encoder.parameters()] + [logit_scale]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = max(1, math.ceil(len(train_idx) / cfg.batch_size))
    total = steps_per_epoch * cfg.epochs
    warm = max(1, int(total * cfg.warmup_fraction))

    def lr_at(step: int) -> float:
        if step < warm:
            return cfg.lr * (step + 1) / warm
        return 0.5 * cfg.lr * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))

    encoder.train()
    step = 0
    losses: list[float] = []
    train_t = torch.from_numpy(train_idx)
    for epoch in range(cfg.epochs):
        perm = train_t[torch.randperm(len(train_t), generator=gen)]
        tot, cnt = 0.0, 0
        for s in range(0, len(perm), cfg.batch_size):
            idx = perm[s : s + cfg.batch_size]
            if len(idx) < 2:
                continue
            for g in opt.param_groups:
                g["lr"] = lr_at(step)
            z = F.normalize(encoder(_augment(x_all[idx], cfg.jitter, gen)), dim=-1)
            ids = cap_ids_t[idx]
            loss = _contrastive_loss(z, cap_emb[ids], ids, logit_scale)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                logit_scale.clamp_(0.0, math.log(100.0))
            tot += float(loss.detach()) * len(idx)
            cnt += len(idx)
            step += 1
        losses.append(tot / max(cnt, 1))
        _log(progress, f"  epoch {epoch + 1}/{cfg.epochs}: loss {losses[-1]:.4f}  "
             f"temperature {math.exp(-logit_scale.item()):.4f}  ({time.perf_counter() - t_start:.0f}s)")
    encoder.eval()
    train_seconds = time.perf_counter() - t_start

    # zero-shot classification of the held-out patches with class-name prompts
    class_emb = class_text_embeddings(text, classes, cfg.prompt_templates)
    with torch.no_grad():
        val_feats = torch.cat([encoder(x_val[s : s + 256]) for s in range(0, len(x_val), 256)]).numpy() \
            if len(x_val) else np.zeros((0, encoder.embed_dim), np.float32)
    pred = zero_shot_classify(val_feats, class_emb)
    metrics = zero_shot_metrics(pred, val_true, len(classes))
    result = TrainEncoderResult(
        out_dir=str(out_dir),
        n_train=len(train_idx),
        n_val=len(val_labels),
        held_out=held_out,
        classes=classes,
        zero_shot_accuracy=metrics["accuracy"],
        zero_shot_balanced_accuracy=metrics["balanced_accuracy"],
        chance=metrics["chance"],
        train_seconds=train_seconds,
        unique_captions=len(uniq),
        epoch_losses=losses,
        confusion=metrics["confusion"],
    )
    cfg_dict = asdict(cfg)
    cfg_dict["prompt_templates"] = list(cfg.prompt_templates)
    out = save_encoder(encoder, out_dir, extra={"train_config": cfg_dict, "metrics": asdict(result)})
    (out / "train_metrics.json").write_text(json.dumps(asdict(result), indent=2))
    _log(progress, f"train-encoder: held-out zero-shot accuracy {result.zero_shot_accuracy:.3f} "
         f"(balanced {result.zero_shot_balanced_accuracy:.3f}, chance {result.chance:.3f}, classes {classes}); "
         f"saved {out}")
    return result
