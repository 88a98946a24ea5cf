"""Common interface of image and text encoders, and hwsi's own checkpoint format.

An :class:`ImageEncoder` is a ``torch.nn.Module`` that maps RGB uint8 images to one embedding per image::

    enc = create_encoder("hwsi_small_patch", checkpoint="ckpt_dir")
    x = enc.preprocess(images_uint8)          # (B, 3, S, S) float, resized to enc.input_size, normalised
    z = enc(x)                                # (B, enc.embed_dim)
    z = enc.encode(images_uint8, batch_size=64)   # numpy float32, no grad, eval mode

hwsi's own checkpoint format (written by :func:`save_encoder`) is a folder with ``encoder.json`` (registry name,
the full config, embedding size) and ``model.safetensors`` (the state dict). Foreign checkpoints (CONCH, HIPT) are
read by the builders through :func:`hwsi.features.encoders.checkpoints.load_foreign_state_dict`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hwsi.config import from_dict
from hwsi.errors import ConfigError, HwsiError

OWN_FORMAT = "hwsi-encoder"
OWN_FORMAT_VERSION = 1
OWN_META = "encoder.json"
OWN_WEIGHTS = "model.safetensors"

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

C = TypeVar("C")


class EncoderError(HwsiError):
    """An encoder cannot be built or its checkpoint cannot be used; names the file where there is one."""

    def __init__(self, reason: str, path: str | Path | None = None) -> None:
        self.path = None if path is None else str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}" if self.path else reason)


def make_config(cls: type[C], overrides: dict[str, Any], where: str = "") -> C:
    """Config dataclass ``cls`` with ``overrides``, read by the project's one typed reader
    (:func:`hwsi.config.from_dict`: unknown keys, wrong types and values out of range are refused, naming the key;
    JSON lists become tuples); its :class:`~hwsi.errors.ConfigError` comes back as an :class:`EncoderError`."""
    try:
        return from_dict(cls, overrides, where or cls.__name__)
    except ConfigError as exc:
        raise EncoderError(str(exc)) from None


@contextlib.contextmanager
def seeded_init(seed: int) -> Iterator[None]:
    """Run the body (an encoder's module construction) under ``torch.manual_seed(seed)``, leaving the caller's CPU
    RNG state untouched afterwards (random-weight encoders are reproducible per config ``seed``)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def check_patch_grid(cfg: Any, where: str) -> None:
    """A ViT config's ``input_size`` must be a whole number of ``patch_size`` patches (:class:`EncoderError`)."""
    if cfg.input_size % cfg.patch_size:
        raise EncoderError(f"{where}: input_size {cfg.input_size} is not a multiple of patch {cfg.patch_size}")


def _to_float_images(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 (B,H,W,3) or (H,W,3), numpy or torch -> float (B,3,H,W) in [0,1]."""
    if isinstance(images, np.ndarray):
        t = torch.from_numpy(np.ascontiguousarray(images))
    elif isinstance(images, torch.Tensor):
        t = images
    else:
        raise EncoderError(f"images must be a numpy array or torch tensor, got {type(images).__name__}")
    if t.ndim == 3:
        t = t.unsqueeze(0)
    if t.ndim != 4 or t.shape[-1] != 3:
        raise EncoderError(f"images must be (B, H, W, 3) RGB, got shape {tuple(t.shape)}")
    if t.dtype != torch.uint8:
        raise EncoderError(f"images must be uint8 (0..255), got {t.dtype}")
    return t.permute(0, 3, 1, 2).float().div_(255.0)


def resize_center_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    """Bicubic (antialiased) resize of the shorter side to ``size`` then centre crop, as CLIP/CONCH transforms do.

    ``x`` is float (B, 3, H, W) in [0, 1]; the result is clamped to [0, 1] like a uint8 image would be.
    """
    h, w = x.shape[-2:]
    if (h, w) == (size, size):
        return x
    if h != w:
        scale = size / min(h, w)
        nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    else:
        nh = nw = size
    if (nh, nw) != (h, w):
        x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True)
    top, left = (nh - size) // 2, (nw - size) // 2
    return x[..., top : top + size, left : left + size].clamp_(0.0, 1.0)


class ImageEncoder(nn.Module):
    """Base class of every registered image encoder.

    Subclasses set ``config`` (a dataclass with at least ``input_size``, ``mean``, ``std``), ``embed_dim``, and
    implement :meth:`forward` on preprocessed tensors.
    """

    name: str = ""
    embed_dim: int
    config: Any

    @property
    def input_size(self) -> int:
        """Side in pixels of the square network input."""
        return int(self.config.input_size)

    @property
    def mean(self) -> tuple[float, float, float]:
        return tuple(float(v) for v in self.config.mean)  # type: ignore[return-value]

    @property
    def std(self) -> tuple[float, float, float]:
        return tuple(float(v) for v in self.config.std)  # type: ignore[return-value]

    @property
    def device(self) -> torch.device:
        for p in self.parameters():
            return p.device
        return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        """dtype of the weights (float32 unless the encoder was moved: hwsi.devices); inputs are cast to it."""
        for p in self.parameters():
            return p.dtype
        return torch.float32

    def preprocess(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 RGB (B,H,W,3) -> float (B,3,S,S): bicubic resize to ``input_size``, centre crop, normalise (in
        float32), then cast to the weights' dtype."""
        x = _to_float_images(images).to(self.device)
        x = resize_center_crop(x, self.input_size)
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        return ((x - mean) / std).to(self.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    @torch.no_grad()
    def encode(self, images: np.ndarray | torch.Tensor, batch_size: int = 64) -> np.ndarray:
        """Embed uint8 images in batches (no grad, eval mode); returns float32 (N, embed_dim)."""
        n = int(images.shape[0]) if images.ndim == 4 else 1
        if images.ndim == 3:
            images = images[None]
        was_training = self.training
        self.eval()
        out = np.empty((n, self.embed_dim), dtype=np.float32)
        try:
            for s in range(0, n, max(1, batch_size)):
                x = self.preprocess(images[s : s + batch_size])
                out[s : s + x.shape[0]] = self(x).float().cpu().numpy()
        finally:
            self.train(was_training)
        return out


# ---------------------------------------------------------------- own checkpoint format


def is_own_checkpoint(path: str | Path) -> bool:
    """True if ``path`` is a folder written by :func:`save_encoder` (or its ``encoder.json``)."""
    p = Path(path)
    return (p.is_dir() and (p / OWN_META).is_file()) or (p.is_file() and p.name == OWN_META)


def _own_dir(path: str | Path) -> Path:
    p = Path(path)
    return p.parent if p.is_file() and p.name == OWN_META else p


def save_encoder(module: nn.Module, out_dir: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Write ``module`` (an ImageEncoder or TextEncoder) as hwsi's own checkpoint folder; returns the folder.

    ``encoder.json`` holds the registry name, kind, the full config and ``extra`` (e.g. training metrics);
    ``model.safetensors`` the state dict (contiguous copies of every tensor).
    """
    from safetensors.torch import save_file

    name = getattr(module, "name", "")
    if not name:
        raise EncoderError("cannot save an encoder without a registry name (build it with create_encoder)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous().clone() for k, v in module.state_dict().items()}
    tmp = out / (OWN_WEIGHTS + ".tmp")
    save_file(state, str(tmp))
    tmp.chmod(0o644)
    tmp.replace(out / OWN_WEIGHTS)
    meta = {
        "format": OWN_FORMAT,
        "version": OWN_FORMAT_VERSION,
        "name": name,
        "kind": "text" if getattr(module, "is_text_encoder", False) else "image",
        "embed_dim": int(getattr(module, "embed_dim")),
        "config": dataclasses.asdict(module.config),  # type: ignore[arg-type]
        "extra": extra or {},
    }
    (out / (OWN_META + ".tmp")).write_text(json.dumps(meta, indent=2))
    (out / (OWN_META + ".tmp")).replace(out / OWN_META)
    return out


def read_own_meta(path: str | Path) -> dict[str, Any]:
    """Read and check ``encoder.json`` of an own-format checkpoint folder."""
    d = _own_dir(path)
    meta_path = d / OWN_META
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as exc:
        raise EncoderError(f"cannot read encoder metadata ({exc})", meta_path) from exc
    if meta.get("format") != OWN_FORMAT:
        raise EncoderError(f"not an hwsi encoder checkpoint (format={meta.get('format')!r})", meta_path)
    if int(meta.get("version", -1)) > OWN_FORMAT_VERSION:
        raise EncoderError(f"written by a newer hwsi (version {meta.get('version')})", meta_path)
    for key in ("name", "config"):
        if key not in meta:
            raise EncoderError(f"missing key {key!r}", meta_path)
    return meta


def load_own_weights(module: nn.Module, path: str | Path) -> None:
    """Load ``model.safetensors`` of an own-format folder into ``module``: every key must match exactly."""
    from safetensors.torch import load_file

    wpath = _own_dir(path) / OWN_WEIGHTS
    if not wpath.is_file():
        raise EncoderError("weights file missing", wpath)
    try:
        state = load_file(str(wpath))
    except Exception as exc:  # safetensors raises several types on corrupt files
        raise EncoderError(f"cannot read safetensors ({exc})", wpath) from exc
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise EncoderError(f"state dict does not match the config: missing {missing[:8]}, unexpected {unexpected[:8]}", wpath)
    for k, v in state.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise EncoderError(f"{k}: shape {tuple(v.shape)} in file, {tuple(own[k].shape)} in model", wpath)
    module.load_state_dict(state, strict=True)
