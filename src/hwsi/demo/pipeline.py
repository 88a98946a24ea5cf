"""The whole system on SynthPath, pixels to answers: the main job of `make demo`, and the cached fixture of the tests.

Steps (each resumable: a rerun skips what is finished, so an interrupted demo continues where it stopped)::

    1 synth     SynthPath cohort: pyramidal TIFFs + ground truth + reports/captions/VQA (hwsi.synth)
    2 tile      tissue, region/patch grid, one store per slide (hwsi.slide)
    3 encoder   the small image–text patch encoder, CLIP-style against frozen MiniLM (hwsi.train.patch_encoder)
    4 extract   patch features, SPF (Eq. 1–2), nuclei + cell features in the SPF patches (Eq. 3) (hwsi.features)
    5 train     stage 0 (tiny LM on the train split's text) then stages 1, 2, 3 (hwsi.train)
    6 eval      every task of hwsi.eval on the held-out split, beside a shuffled-visual-tokens baseline
    7 report    OUT/report.md with tables and plots

:class:`PipelineConfig` is a dataclass; :meth:`PipelineConfig.demo` is `make demo`'s default and
:meth:`PipelineConfig.test` the smaller one the test suite builds once and caches.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from hwsi.config import from_dict, preset_path
from hwsi.demo.paths import PipelinePaths
from hwsi.demo.report import write_report
from hwsi.errors import ConfigError, HwsiError
from hwsi.eval.tasks import EvalConfig, load_eval_data, run_all
from hwsi.features.extract import ExtractConfig, run_extract
from hwsi.slide.grid import GridConfig
from hwsi.slide.tile import TileConfig, tile_batch
from hwsi.synth.cohort import write_cohort
from hwsi.synth.scene import SceneConfig
from hwsi.train.bundle import load_bundle, record_bundle
from hwsi.train.config import TrainConfig, load_train_config
from hwsi.train.data import store_ids
from hwsi.train.inference import load_trained_model
from hwsi.train.patch_encoder import TrainEncoderConfig, train_small_encoder
from hwsi.train.stages import run_stage
from hwsi.utils.atomic import write_json_atomic


@dataclass
class PipelineConfig:
    """Sizes of the SynthPath run. Slide sizes are level-0 px at ``mpp``; region/patch are px at ``mpp``."""

    # The demo's sizes (the defaults) are the test preset's cohort: 80 slides of 2048² (56 train). Measured with
    # stage-1 reading v2: 50 slides of 3072² (34 train) gave closed VQA 0.565 vs 0.457 shuffled on the test split,
    # the 56-train-slide cohort 0.949 vs 0.362 (tests/test_pipeline_learns.py), at about the same demo time.
    n_slides: int = 80
    # more TEST slides on top of n_slides' split: evaluation power at the same training cost (demo: 12 + 32 = 44
    # test slides, so that the report's intervals are about ±0.05)
    extra_heldout: int = 32
    seed: int = 0
    slide_size: int = 2048
    mpp: float = 0.5
    region_size: int = 1024
    patch_size: int = 64
    # small patch encoder: it sees each patch area-downsampled 4x (as a 256 px patch seen at 64 px), so
    # single-nucleus detail is invisible to it and belongs to the cell scale (docs/design.md §8)
    encoder_input: int = 16
    encoder_channels: tuple[int, ...] = (32, 64, 128)
    encoder_n: int = 2000
    encoder_epochs: int = 5
    k: int = 16
    n_div: int = 32
    min_tissue: float = 0.5  # SPF candidates' minimum tissue fraction (hwsi extract --min-tissue)
    vocab: str = "cohort"  # SPF vocabulary: "cohort" = COHORT/vocab.txt (SynthPath's), "builtin", or a file
    train_config: str = "demo"  # hwsi.train preset name (hwsi/configs/<name>.yaml) or a YAML path
    workers: int = 2
    train_overrides: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def demo(cls) -> "PipelineConfig":
        return cls()

    @classmethod
    def test(cls) -> "PipelineConfig":
        """Smaller slides: what the test suite builds once (cached) and shares between model, eval and serve tests.
        80 slides (56 train): with 40 (28 train, ~3 per class) the held-out closed accuracy stayed near 0.58 with
        either stage-1 variant tried, with 80 it reached 0.60 over 0.42 shuffled (test_pipeline_learns). 80 more
        test slides (104 held out) give the learning test and the ablations their power, at the same training cost."""
        return cls(n_slides=80, slide_size=2048, encoder_n=2000, encoder_epochs=5, extra_heldout=80)  # = demo + 48 test

    @classmethod
    def small(cls) -> "PipelineConfig":
        """The test preset at 40 slides: what `hwsi ablate` trains 14 rows × 3 seeds on within ~1.5 h of 2 cores."""
        return replace(cls.test(), n_slides=40)

    @classmethod
    def preset(cls, name: str) -> "PipelineConfig":
        """``demo``, ``test`` or ``small`` (a ConfigError names the choices otherwise)."""
        makers = {"demo": cls.demo, "test": cls.test, "small": cls.small}
        if name not in makers:
            raise ConfigError(f"unknown pipeline preset {name!r}; choose one of {sorted(makers)}")
        return makers[name]()


STEPS = ("synth", "tile", "encoder", "extract", "train", "eval", "report")


def _log(msg: str) -> None:
    from rich.console import Console

    Console(stderr=True).print(f"[bold cyan]hwsi demo[/] {msg}")


class Pipeline:
    """Runs the steps in order; records each finished step (with its seconds) in OUT/pipeline.json."""

    def __init__(self, out: str | Path, cfg: PipelineConfig | None = None) -> None:
        self.cfg = cfg or PipelineConfig.demo()
        self.paths = PipelinePaths(Path(out).resolve())  # absolute: train configs resolve paths from the job
        self.paths.out.mkdir(parents=True, exist_ok=True)
        self.state = self._load_state()

    # -- bookkeeping ------------------------------------------------------------------------------------------
    def _load_state(self) -> dict[str, Any]:
        p = self.paths.state
        cfg = asdict(self.cfg)
        cfg["encoder_channels"] = list(cfg["encoder_channels"])
        if p.is_file():
            st = json.loads(p.read_text())
            if st.get("config") != cfg:
                raise HwsiError(
                    f"{p}: this output folder was made with another pipeline configuration; "
                    "use a new --out folder (or delete this one)"
                )
            return st
        return {"config": cfg, "steps": {}}

    def _done(self, step: str) -> bool:
        return step in self.state["steps"]

    def _mark(self, step: str, seconds: float, info: dict[str, Any] | None = None) -> None:
        self.state["steps"][step] = {"seconds": round(seconds, 2), **(info or {})}
        write_json_atomic(self.paths.state, self.state)

    def step_seconds(self) -> dict[str, float]:
        return {k: v["seconds"] for k, v in self.state["steps"].items()}

    def _run(self, step: str, fn: Any) -> None:
        if self._done(step):
            _log(f"{step}: done earlier, skipped")
            return
        _log(f"{step} ...")
        t0 = time.perf_counter()
        info = fn() or {}
        dt = time.perf_counter() - t0
        self._mark(step, dt, info)
        _log(f"{step}: {dt:.1f} s")

    # -- steps --------------------------------------------------------------------------------------------------
    def synth(self) -> dict[str, Any]:
        c = self.cfg
        base = SceneConfig(width=c.slide_size, height=c.slide_size, mpp=c.mpp, region_size=c.region_size,
                           patch_size=c.patch_size)
        res = write_cohort(self.paths.cohort, c.n_slides, seed=c.seed, base=base, workers=c.workers,
                           extra_heldout=c.extra_heldout)
        splits: dict[str, int] = {}
        for r in res.slides:
            splits[r.split] = splits.get(r.split, 0) + 1
        return {"slides": len(res.slides), "splits": splits}

    def tile(self) -> dict[str, Any]:
        c = self.cfg
        cfg = TileConfig(grid=GridConfig(target_mpp=c.mpp, region_size=c.region_size, patch_size=c.patch_size),
                         preview=True)
        res = tile_batch(self.paths.cohort / "slides", self.paths.job, cfg)
        if res.failed:
            raise HwsiError(f"{self.paths.job}: {len(res.failed)} slide(s) failed to tile (see errors/)")
        return res.counts()

    def encoder(self) -> dict[str, Any]:
        c = self.cfg
        tcfg = TrainEncoderConfig(
            n=c.encoder_n, epochs=c.encoder_epochs, seed=c.seed, patch_px=c.patch_size, mpp=c.mpp,
            encoder_overrides={"input_size": c.encoder_input, "channels": tuple(c.encoder_channels)},
        )
        res = train_small_encoder(tcfg, self.paths.encoder)
        return {"zero_shot_accuracy": res.zero_shot_accuracy, "chance": res.chance,
                "train_seconds": round(res.train_seconds, 1)}

    def extract(self) -> dict[str, Any]:
        c = self.cfg
        cfg = ExtractConfig(patch_encoder=f"hwsi_small_patch:{self.paths.encoder}", region_input="same",
                            cells="builtin", k=c.k, n_div=c.n_div, min_tissue=c.min_tissue, batch_size=256,
                            vocab=self.vocab_path())
        res = run_extract(self.paths.job, cfg)
        if res.failed:
            raise HwsiError(f"{self.paths.job}: {len(res.failed)} slide(s) failed to extract (see errors/)")
        return res.counts()

    def vocab_path(self) -> str | None:
        """The SPF vocabulary file of ``PipelineConfig.vocab`` (None = hwsi's built-in vocabulary)."""
        v = self.cfg.vocab
        if v == "builtin":
            return None
        return str(self.paths.cohort / "vocab.txt") if v == "cohort" else v

    def train_config(self, extra: dict[str, Any] | None = None) -> Any:
        """The hwsi.train config of this run: the preset with the cohort's TRAIN-split text (absolute paths),
        then ``PipelineConfig.train_overrides``, then ``extra`` (nested dicts of TrainConfig fields)."""
        cfg = load_train_config(preset_path(self.cfg.train_config))
        cfg.seed = self.cfg.seed
        text = self.paths.cohort / "text"
        cfg.data.records = str(text / "train.json")
        cfg.data.facts = str(self.paths.cohort / "facts.json")
        cfg.data.reports = str(text / "reports.json")
        cfg.data.captions = str(text / "captions.json")
        if (self.paths.cohort / "unit_rules.yaml").is_file():
            cfg.stage1.unit_rules = str(self.paths.cohort / "unit_rules.yaml")
        for over in (self.cfg.train_overrides, extra):
            if over:
                merged = deep_merge(asdict(cfg), copy.deepcopy(over))
                cfg = from_dict(TrainConfig, merged, "train overrides")
                cfg.validate()
        return cfg

    def train(self) -> dict[str, Any]:
        cfg = self.train_config()
        info: dict[str, Any] = {}
        for stage in (0, 1, 2, 3):
            _log(f"train stage {stage} ...")
            res = run_stage(stage, cfg, self.paths.job, self.paths.runs, resume=True)
            info[f"stage{stage}"] = {k: v for k, v in res.metrics.items() if isinstance(v, (int, float, str))}
        return info

    def record_bundle(self) -> None:
        """``RUN/bundle`` (how the stores were made, :mod:`hwsi.train.bundle`): each training stage writes it; this
        records it for a run trained before hwsi did, so ``hwsi ask SLIDE --run RUN`` works on any finished demo."""
        if load_bundle(self.paths.runs) is None:
            record_bundle(self.paths.job, store_ids(self.paths.job, self.train_config().data), self.paths.runs)

    def evaluate(self) -> dict[str, Any]:
        model = load_trained_model(self.paths.runs)
        data = load_eval_data(self.paths.cohort, self.paths.job, split="test")
        results = run_all(model, data, EvalConfig(), out=self.paths.eval)
        return {"tasks": sorted(results)}

    def report(self) -> dict[str, Any]:
        write_report(self.paths, self.state)
        return {"report": str(self.paths.report)}

    def run(self, until: str | None = None) -> "Pipeline":
        """Run every step up to and including ``until`` (default: all)."""
        steps = [("synth", self.synth), ("tile", self.tile), ("encoder", self.encoder), ("extract", self.extract),
                 ("train", self.train), ("eval", self.evaluate), ("report", self.report)]
        for name, fn in steps:
            self._run(name, fn)
            if name == "train":
                self.record_bundle()
            if name == until:
                break
        return self


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Merge ``over`` into ``base`` (nested dicts key by key; ``base`` is modified and returned)."""
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            base[k] = deep_merge(base[k], v)
        else:
            base[k] = v
    return base
