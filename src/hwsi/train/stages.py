"""The training stages of MLLM-HWSI (paper §3.6, §4) and the Python API ``run_stage``.

    result = run_stage(stage, cfg, job, out, resume=False)   # -> StageResult(metrics, checkpoint, losses, ...)

Run folder ``out`` (one per experiment; every stage writes ``out/config.yaml`` with the dims it resolved)::

    cache/inputs-<hash>/<slide>.pt   SlideInputs per slide;  cache/text-<encoder>.pt  frozen text embeddings
    stage0/llm/                      the pretrained tiny LLM (HF folder; tiny runs only)
    stage1/final/alignment.safetensors   hierarchy (CCAF, ViT-4K, ViT_WSI) + alignment heads (+ text layers)
    stage2/final/projectors.safetensors
    stage3/final/projectors.safetensors, stage3/final/lora/   (peft adapter)
    stageN/metrics.csv, stageN/checkpoints/, stageN/result.json
    bundle/                          what the stores were made with (hwsi.train.bundle; stages 1–3)

Stage 0 (tiny runs only; NOT in the paper, docs/design.md §5). No pretrained LLM exists offline and a frozen random LLM cannot
write reports, so a tiny Qwen2 (``build_tiny_llm``, tokenizer trained on the TRAIN split's text) is pretrained on the
train split's records in the same chat format as stages 2–3, with the slide's ground-truth findings written as words
in the ``<image>`` slot (``data.facts``). Never val/test text. It stands in for Qwen's pretraining: real runs set
``model.llm_path`` and skip it.

Stage 1 (Eq. 6–9). Trained: CCAF, ViT-4K, ViT_WSI, the per-scale alignment heads, optionally the last
``text_finetune_layers`` of the text encoder. The stored patch features f_ij come from a FROZEN backbone (the paper
also fine-tunes CONCH; we train on cached features, so the patch head is what adapts). Text units per slide:
words ↔ cells, phrases ↔ patches, sentences ↔ regions, whole report ↔ slide (:func:`hwsi.train.data.report_units`),
embedded by the frozen text encoder (cached). Positives come from the FROZEN encoders' shared image–text space,
never from the heads being trained (:func:`hwsi.model.losses.assign_positives`): the stored f_ij live in the text
encoder's space when the patch encoder is ``hwsi_small_patch`` with ``minilm`` (or CONCH with CONCH text), so
* patch (i, j) → argmax_phrases cos(f_ij, phrase);
* the cell token c_ij of patch (i, j) → argmax_words cos(f_ij, word) (cells inherit their patch's word);
* region i → argmax_sentences cos(norm(mean_j f_ij), sentence) over its selected patches;
* slide ↔ its report over the batch (Eq. 7). Identical texts are masked as negatives (text ids). Each term is
switchable (``stage1.loss``: use_Ls, use_Lc, use_Lwsi, scales — the Table 2 ablation).

Stage 2: projectors only (hierarchy from stage 1 frozen, LLM frozen); LM loss on the reports (and captions, when
``data.captions`` is set) of the train records, i.e. the records whose answer is the slide's report/caption; with
``data.stage2_records: all`` on every train record (as stage 3 sees them), so the projectors learn each finding.

Stage 3: projectors + LoRA (peft, ``stage3.lora_rank/alpha``) on the LLM; LM loss on the answers of every turn of
every train record (prompt tokens masked by :meth:`hwsi.model.mllm.MLLMHWSI.build_inputs`).
"""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hwsi.errors import ConfigError
from hwsi.model.heads import AlignmentHeads
from hwsi.model.hierarchy import HierarchicalEncoder
from hwsi.model.inputs import SlideBatch, SlideInputs, collate_slides
from hwsi.model.losses import AlignmentTargets, HCALossConfig, HCALossOutput, ScaleTargets, assign_positives, hca_loss
from hwsi.train.alignment import BankBuilder, LiveText, parse_same_fact
from hwsi.train.config import TrainConfig, load_train_config, save_train_config
from hwsi.train.data import (
    ChatSample,
    ReportUnits,
    SlideCache,
    TextBank,
    findings_text,
    load_train_text,
    permute_options,
    report_units,
    resolve,
    store_ids,
)
from hwsi.train.engine import Engine, FitResult, TrainError, seed_everything
from hwsi.train.units import UNIT_SCALES, UnitRules, route_report

log = logging.getLogger(__name__)

ALIGNMENT_FILE = "alignment.safetensors"
PROJECTORS_FILE = "projectors.safetensors"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class StageResult:
    """What one ``run_stage`` call did."""

    stage: int
    metrics: dict[str, Any]  # final_loss, first_loss, steps, total_steps, n_items, seconds, ...
    checkpoint: Path | None  # newest engine checkpoint (resume point)
    output: Path | None  # the stage's final weights (None until the stage finished)
    losses: list[float] = field(default_factory=list)  # loss of every logged step, all sessions of the run
    finished: bool = False


def run_stage(stage: int, cfg: TrainConfig, job: str | Path, out: str | Path, resume: bool = False,
              stop_after: int | None = None, progress: bool = True) -> StageResult:
    """Run training stage 0–3 of ``cfg`` on job folder ``job`` into run folder ``out`` (module docstring).

    ``resume``: continue from the stage's last checkpoint (a finished stage is not retrained).
    ``stop_after``: interrupt after this many optimizer steps in total (checkpointed; resume later).
    """
    cfg = copy.deepcopy(cfg)
    cfg.validate()
    job, out = Path(job), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    fn = {0: _stage0, 1: _stage1, 2: _stage2, 3: _stage3}.get(stage)
    if fn is None:
        raise ConfigError(f"stage must be 0, 1, 2 or 3, got {stage}")
    record_run_bundle(stage, cfg, job, out, fresh=stage == 1 and not resume)
    stage_dir = out / f"stage{stage}"
    done = stage_dir / "result.json"
    if resume and done.is_file():
        saved = json.loads(done.read_text())
        log.info("stage %d already finished in %s; nothing to do", stage, stage_dir)
        return StageResult(stage, saved["metrics"], None, Path(saved["output"]), saved.get("losses", []), True)
    done.unlink(missing_ok=True)
    seed_everything(cfg.seed)
    return fn(cfg, job, out, resume, stop_after, progress)


def record_run_bundle(stage: int, cfg: TrainConfig, job: Path, out: Path, fresh: bool = False) -> None:
    """Stages 1–3: ``RUN/bundle`` records how the job's stores were made (:mod:`hwsi.train.bundle`), also when a
    finished stage is resumed (so runs trained before it existed get one); a job made another way than the run's
    earlier stages is a ConfigError (``fresh``: stage 1 from scratch replaces it). Stage 0 reads no features."""
    if stage in (1, 2, 3):
        from hwsi.train.bundle import record_bundle

        stores = store_ids(job, cfg.data)
        if stores:
            record_bundle(job, stores, out, replace=fresh)


def _finish(stage: int, out: Path, fit: FitResult, n_items: int, output: Path | None, extra: dict[str, Any],
            is_main: bool = True) -> StageResult:
    metrics = {"steps": fit.steps, "total_steps": fit.total_steps, "n_items": n_items,
               "first_loss": fit.losses[0] if fit.losses else None,
               "final_loss": fit.losses[-1] if fit.losses else None, "seconds": round(fit.seconds, 3), **extra}
    res = StageResult(stage, metrics, fit.last_checkpoint, output if fit.finished else None, fit.losses, fit.finished)
    if fit.finished and is_main and output is not None:
        (out / f"stage{stage}" / "result.json").write_text(
            json.dumps({"metrics": metrics, "output": str(output), "losses": fit.losses}, indent=1))
    return res


def _save_safetensors(state: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(tmp))
    tmp.replace(path)


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if not path.is_file():
        raise TrainError(f"{path}: missing (run the earlier training stage first)")
    return load_file(str(path))


# ------------------------------------------------------------------------------------------ shared set-up
def resolve_dims(cfg: TrainConfig, sample: SlideInputs | None, text_dim: int | None = None,
                 llm_dim: int | None = None) -> TrainConfig:
    """Fill dims left at 0 from the data (stored feature widths, text encoder, LLM); reject mismatches."""
    h = cfg.model.hierarchy
    if sample is not None:
        for name, have, attr in (("patch feature (data.patch_encoder)", sample.patch_feats.shape[-1], "patch_dim"),
                                 ("region input (data.region_input)", sample.region_input.shape[-1], "vit4k.in_dim"),
                                 ("cell embedding", sample.cell_feats.shape[-1], "ccaf.in_dim")):
            obj, key = (h, attr) if "." not in attr else (getattr(h, attr.split(".")[0]), attr.split(".")[1])
            want = getattr(obj, key)
            if want == 0:
                setattr(obj, key, int(have))
            elif want != have:
                raise ConfigError(f"model.hierarchy.{attr} = {want} but the stores' {name} width is {have} "
                                  "(set it to 0 to take it from the data)")
    if h.slide.in_dim == 0:
        h.slide.in_dim = h.vit4k.dim
    if text_dim is not None:
        if cfg.model.text_dim == 0:
            cfg.model.text_dim = int(text_dim)
        elif cfg.model.text_dim != text_dim:
            raise ConfigError(f"model.text_dim = {cfg.model.text_dim} but the text encoder is {text_dim}-d")
    if llm_dim is not None:
        if cfg.model.projector.llm_dim == 0:
            cfg.model.projector.llm_dim = int(llm_dim)
        elif cfg.model.projector.llm_dim != llm_dim:
            raise ConfigError(f"model.projector.llm_dim = {cfg.model.projector.llm_dim} but the LLM is {llm_dim} wide")
    return cfg


def _slide_cache(cfg: TrainConfig, job: Path, out: Path) -> tuple[SlideCache, dict[str, Path]]:
    stores = store_ids(job, cfg.data)
    if not stores:
        raise TrainError(f"{job}: no stores in {cfg.data.stores!r} (run `hwsi tile` and `hwsi extract` first)")
    m = cfg.model
    return SlideCache(stores, out / "cache", cfg.data, m.max_regions, m.k, m.max_cells), stores


def _saved_config(out: Path) -> TrainConfig | None:
    p = out / "config.yaml"
    return load_train_config(p) if p.is_file() else None


# ------------------------------------------------------------------------------------------ stage 1
class AlignmentModel(nn.Module):
    """Stage-1 module: hierarchy -> alignment heads -> L_HCA (Eq. 9); optional trainable text tower."""

    def __init__(self, hierarchy: HierarchicalEncoder, heads: AlignmentHeads, loss: HCALossConfig,
                 text_encoder: nn.Module | None = None) -> None:
        super().__init__()
        self.hierarchy = hierarchy
        self.heads = heads
        self.loss_cfg = loss
        self.text = text_encoder

    def forward(self, batch: SlideBatch, targets: AlignmentTargets, strings: list[str] | None = None) -> HCALossOutput:
        if self.text is not None and strings is not None:
            targets = self._live_text(targets, strings)
        return hca_loss(self.heads(self.hierarchy(batch)), targets, self.loss_cfg)

    def _live_text(self, t: AlignmentTargets, strings: list[str]) -> AlignmentTargets:
        """Replace the cached text embeddings by the trainable tower's (ids index ``strings``).

        Only the batch's own units are encoded (one forward of the tower over the unique strings)."""
        scales = [x for x in (t.cells, t.patches, t.regions) if x is not None and x.text_ids is not None]
        used = [x.text_ids[x.text_mask] for x in scales] + ([t.report_ids] if t.report_ids is not None else [])
        if not used:
            return t
        uniq = torch.unique(torch.cat(used))
        emb = nn.functional.normalize(self.text.encode_tensor([strings[i] for i in uniq.tolist()]), dim=-1)
        row = torch.full((len(strings),), 0, dtype=torch.long, device=emb.device)
        row[uniq.to(emb.device)] = torch.arange(len(uniq), device=emb.device)

        def swap(s: ScaleTargets | None) -> ScaleTargets | None:
            if s is None or s.text_ids is None:
                return s
            live = emb[row[s.text_ids.clamp_min(0)]] * s.text_mask[..., None]
            return ScaleTargets(live, s.text_mask, s.positives, s.text_ids)

        report = emb[row[t.report_ids]] if t.report_ids is not None else t.report
        return AlignmentTargets(swap(t.cells), swap(t.patches), swap(t.regions), report, t.report_ids)


def unfreeze_last_layers(module: nn.Module, n: int) -> int:
    """Freeze ``module`` except its last ``n`` transformer blocks (the longest ModuleList); returns #params trained."""
    for p in module.parameters():
        p.requires_grad_(False)
    if n <= 0:
        return 0
    lists = [m for m in module.modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        raise ConfigError("text_finetune_layers > 0 but the text encoder has no list of transformer blocks")
    blocks = max(lists, key=len)
    count = 0
    for blk in list(blocks)[-n:]:
        for p in blk.parameters():
            p.requires_grad_(True)
            count += p.numel()
    return count


class TargetBuilder:
    """Per-batch Eq. 6–7 targets: padded text units, frozen-space positives, text ids (identical-text masking)."""

    def __init__(self, units: dict[str, ReportUnits], bank: TextBank, scales: tuple[str, ...]) -> None:
        self.units, self.bank, self.scales = units, bank, scales
        self.strings = sorted(bank.emb)
        self.ids = {s: i for i, s in enumerate(self.strings)}

    def _pad(self, lists: list[list[str]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, t = len(lists), max([len(x) for x in lists] + [1])
        emb = torch.zeros(b, t, self.bank.dim)
        mask = torch.zeros(b, t, dtype=torch.bool)
        ids = torch.full((b, t), -1, dtype=torch.long)
        for i, xs in enumerate(lists):
            if xs:
                emb[i, : len(xs)] = self.bank.stack(xs)
                mask[i, : len(xs)] = True
                ids[i, : len(xs)] = torch.tensor([self.ids[x] for x in xs])
        return emb, mask, ids

    def __call__(self, slide_ids: list[str], batch: SlideBatch) -> AlignmentTargets:
        units = [self.units[s] for s in slide_ids]
        b, r, k, d = batch.patch_feats.shape
        if d != self.bank.dim:
            raise ConfigError(f"positives need the patch features ({d}-d) in the text encoder's space "
                              f"({self.bank.dim}-d): use hwsi_small_patch + minilm or CONCH + CONCH text")
        pm = batch.patch_mask & batch.region_mask[..., None]
        flat = batch.patch_feats.reshape(b, r * k, d)
        out = AlignmentTargets()
        if "cells" in self.scales:
            emb, mask, ids = self._pad([u.words for u in units])
            out.cells = ScaleTargets(emb, mask, assign_positives(flat, emb, mask).reshape(b, r, k), ids)
        if "patches" in self.scales:
            emb, mask, ids = self._pad([u.phrases for u in units])
            out.patches = ScaleTargets(emb, mask, assign_positives(flat, emb, mask).reshape(b, r, k), ids)
        if "regions" in self.scales:
            emb, mask, ids = self._pad([u.sentences for u in units])
            w = pm[..., None].to(batch.patch_feats.dtype)
            mean = (nn.functional.normalize(batch.patch_feats, dim=-1) * w).sum(2) / w.sum(2).clamp_min(1)
            pos = assign_positives(mean, emb, mask)
            out.regions = ScaleTargets(emb, mask, torch.where(pm.any(-1), pos, torch.full_like(pos, -1)), ids)
        out.report = self.bank.stack([u.report for u in units])
        out.report_ids = torch.tensor([self.ids[u.report] for u in units])
        return out


def _targets_to(t: AlignmentTargets, device: torch.device) -> AlignmentTargets:
    def mv(s: ScaleTargets | None) -> ScaleTargets | None:
        if s is None:
            return None
        return ScaleTargets(s.text.to(device), s.text_mask.to(device), s.positives.to(device),
                            None if s.text_ids is None else s.text_ids.to(device))

    return AlignmentTargets(mv(t.cells), mv(t.patches), mv(t.regions),
                            None if t.report is None else t.report.to(device),
                            None if t.report_ids is None else t.report_ids.to(device))


def _stage1(cfg: TrainConfig, job: Path, out: Path, resume: bool, stop_after: int | None,
            progress: bool) -> StageResult:
    from hwsi.features.encoders import create_text_encoder

    cache, stores = _slide_cache(cfg, job, out)
    text = load_train_text(job, cfg.data, stores)
    slides = [s for s in text.slide_ids if s in text.reports]
    if not slides:
        raise TrainError("stage 1: no train slide has both a store and a report")
    cache.prepare(slides, progress)
    s1 = cfg.stage1
    v2 = s1.loss.eq6 == "pooled"
    encoder = create_text_encoder(cfg.data.text_encoder)
    bank = TextBank(encoder, out / "cache" / f"text-{cfg.data.text_encoder.replace(':', '_').replace('/', '_')}.pt")
    if v2:
        rules = UnitRules.load(resolve(job, s1.unit_rules) if s1.unit_rules else None)
        routed = {s: route_report(text.reports[s], rules, s1.max_units) for s in slides}
        builder: Any = BankBuilder(routed, {s: text.reports[s] for s in slides}, text.facts,
                                   parse_same_fact(s1.same_fact), tuple(x for x in s1.loss.scales if x in UNIT_SCALES))
        bank.add(builder.strings)
        sizes = builder.sizes()
        log.info("stage 1: unit banks %s", sizes)
        empty = [x for x in s1.loss.scales if x in UNIT_SCALES and not sizes.get(x)]
        if empty and s1.loss.use_Ls:
            log.warning("stage 1: no report clause is routed to %s (rules: %s); their Eq. 6 terms are 0",
                        ", ".join(empty), s1.unit_rules or "the packaged default")
    else:
        units = {s: report_units(text.reports[s], s1.max_words, s1.max_phrases, s1.max_sentences) for s in slides}
        bank.add([x for u in units.values() for x in (*u.words, *u.phrases, *u.sentences, u.report)])
        builder = TargetBuilder(units, bank, s1.loss.scales)
    bank.save()
    cfg = resolve_dims(cfg, cache.get(slides[0]), text_dim=bank.dim)
    save_train_config(cfg, out / "config.yaml")

    seed_everything(cfg.seed)  # model init independent of what loading consumed
    hierarchy = HierarchicalEncoder(cfg.model.hierarchy)
    heads = AlignmentHeads(cfg.model.hierarchy.dims(), cfg.model.text_dim)
    text_tower = None
    if s1.text_finetune_layers > 0:
        n = unfreeze_last_layers(encoder, s1.text_finetune_layers)
        log.info("stage 1: training the last %d text-encoder blocks (%d parameters)", s1.text_finetune_layers, n)
        text_tower = encoder
    model = AlignmentModel(hierarchy, heads, s1.loss, text_tower)
    engine = Engine(out / "stage1", s1, cfg.seed, cfg.precision, progress, "stage1")
    device = engine.accelerator.device
    if v2:
        frozen = nn.functional.normalize(bank.stack(builder.strings), dim=-1)
        live = None
        if text_tower is not None:
            used, steps_per_epoch = engine.batch_plan(len(slides))
            micro_per_step = used // (s1.micro_batch_size * engine.accelerator.num_processes)
            per_epoch = steps_per_epoch * micro_per_step
            ckpt = engine.last_checkpoint() if resume else None
            done = json.loads((ckpt / "state.json").read_text())["step"] * micro_per_step if ckpt else 0
            live = LiveText(encoder, builder.strings, s1.text_refresh_every or per_epoch, out / "stage1" / "text",
                            done)

    def step(m: nn.Module, ids: list[str]) -> tuple[torch.Tensor, dict[str, float]]:
        batch = collate_slides([cache.get(s) for s in ids])
        if v2:
            emb = live(builder.batch_strings(ids), device) if live is not None else frozen.to(device)
            res = m(batch.to(device), builder(ids, emb))
        else:
            targets = _targets_to(builder(ids, batch), device)
            res = m(batch.to(device), targets, builder.strings if text_tower is not None else None)
        return res.total, {k: float(v.detach()) for k, v in res.terms.items()}

    fit = engine.fit(model, slides, step, resume=resume, stop_after=stop_after)
    output = out / "stage1" / "final" / ALIGNMENT_FILE
    if fit.finished and engine.is_main:
        m = engine.unwrap(model)
        state = {f"hierarchy.{k}": v for k, v in m.hierarchy.state_dict().items()}
        state.update({f"heads.{k}": v for k, v in m.heads.state_dict().items()})
        if text_tower is not None:
            state.update({f"text.{n}": p for n, p in m.text.named_parameters() if p.requires_grad})
        _save_safetensors(state, output)
    return _finish(1, out, fit, len(slides), output, {"text_units": len(bank.emb)}, engine.is_main)


# ------------------------------------------------------------------------------------------ stages 2–3
def llm_folder(cfg: TrainConfig, out: Path) -> Path:
    """The LLM of a run: ``model.llm_path`` or, when empty, the stage-0 LLM ``out/stage0/llm``."""
    p = Path(cfg.model.llm_path).expanduser() if cfg.model.llm_path else out / "stage0" / "llm"
    if not (p / "config.json").is_file():
        raise TrainError(f"{p}: no LLM there (set model.llm_path to a local HF folder, or run stage 0 for tiny runs)")
    return p


def build_model(cfg: TrainConfig, out: Path, stage: int):
    """MLLMHWSI with the LLM of the run and the stage-1 weights loaded (+ stage-2 projectors for stage 3)."""
    from hwsi.model.llm import load_llm
    from hwsi.model.mllm import MLLMHWSI

    cfg = _dims_from_run(cfg, out)
    llm, tok = load_llm(llm_folder(cfg, out), dtype=DTYPES[cfg.llm_dtype])
    cfg = resolve_dims(cfg, None, llm_dim=llm.get_input_embeddings().weight.shape[1])
    seed_everything(cfg.seed)
    model = MLLMHWSI.from_config(cfg.model, llm, tok)
    align = _load_safetensors(out / "stage1" / "final" / ALIGNMENT_FILE)
    _load_part(model.hierarchy, align, "hierarchy.")
    if model.heads is not None:
        _load_part(model.heads, align, "heads.")
    if stage >= 3:
        model.projectors.load_state_dict(_load_safetensors(out / "stage2" / "final" / PROJECTORS_FILE))
    return model, cfg


def _load_part(module: nn.Module, state: dict[str, torch.Tensor], prefix: str) -> None:
    """Load ``prefix``-ed weights into ``module``. Every key the module has must be there; keys of scales the module
    does not have are ignored (a stage 1 trained with every scale feeding a model with fewer: the "clean" Table 1
    protocol of ``hwsi ablate``)."""
    own = module.state_dict()
    part = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    missing = sorted(set(own) - set(part))
    if missing:
        raise TrainError(f"stage-1 weights lack {prefix}{missing[0]} (and {len(missing) - 1} more): trained with "
                         "another hierarchy configuration?")
    module.load_state_dict({k: part[k] for k in own}, strict=True)


def _dims_from_run(cfg: TrainConfig, out: Path) -> TrainConfig:
    """Dims left at 0 in ``cfg`` taken from the run's saved config (written by the stage that resolved them)."""
    saved = _saved_config(out)
    if saved is None:
        return cfg
    cfg = copy.deepcopy(cfg)
    h, hs = cfg.model.hierarchy, saved.model.hierarchy
    for obj, ref, key in ((h, hs, "patch_dim"), (h.ccaf, hs.ccaf, "in_dim"), (h.vit4k, hs.vit4k, "in_dim"),
                          (h.slide, hs.slide, "in_dim"), (cfg.model, saved.model, "text_dim")):
        if getattr(obj, key) == 0:
            setattr(obj, key, getattr(ref, key))
    return cfg


def _stage_cfg_from_run(cfg: TrainConfig, out: Path, cache: SlideCache, slides: list[str]) -> TrainConfig:
    saved = _saved_config(out)
    text_dim = saved.model.text_dim if saved is not None and saved.model.text_dim else None
    return resolve_dims(cfg, cache.get(slides[0]), text_dim=text_dim)


def _lm_step(cache: SlideCache, device: torch.device):
    def step(m: nn.Module, samples: list[ChatSample]) -> tuple[torch.Tensor, dict[str, float]]:
        batch = collate_slides([cache.get(s.slide_id) for s in samples]).to(device)
        return m(batch, [s.messages for s in samples]).loss, {}

    return step


def report_samples(text, use_captions: bool = True) -> list[ChatSample]:
    """Train samples whose (single) answer is the slide's report or caption (stage 2's data)."""
    targets: dict[str, set[str]] = {}
    for sid, r in text.reports.items():
        targets.setdefault(sid, set()).add(r.strip())
    if use_captions:
        for sid, c in text.captions.items():
            targets.setdefault(sid, set()).add(c.strip())
    out = []
    for s in text.samples:
        answers = [m["content"].strip() for m in s.messages if m["role"] == "assistant"]
        if len(answers) == 1 and answers[0] in targets.get(s.slide_id, ()):
            out.append(s)
    return out


def stage_model(stage: int, cfg: TrainConfig, out: Path):
    """The model of stage 2 or 3 with exactly its trainable parameters requiring grad.

    Stage 2: projectors only. Stage 3: LoRA on the LLM (+ projectors when ``stage3.train_projectors``); the base
    LLM, the hierarchy and the heads stay frozen in both.
    """
    model, cfg = build_model(cfg, out, stage)
    for p in model.parameters():
        p.requires_grad_(False)
    if stage == 3:
        seed_everything(cfg.seed + 3)
        add_lora(model, cfg.stage3)
        for n, p in model.llm.named_parameters():
            p.requires_grad_("lora_" in n)
    for p in model.projectors.parameters():
        p.requires_grad_(stage == 2 or cfg.stage3.train_projectors)
    return model, cfg


def _stage2(cfg: TrainConfig, job: Path, out: Path, resume: bool, stop_after: int | None,
            progress: bool) -> StageResult:
    cache, stores = _slide_cache(cfg, job, out)
    text = load_train_text(job, cfg.data, stores)
    if cfg.data.stage2_records == "all":
        samples = permute_options(text.samples, cfg.data.option_permutations, cfg.seed, cfg.data.closed_text_answers)
    elif cfg.data.stage2_records == "reports":
        samples = report_samples(text)
    else:
        raise ConfigError(f"data.stage2_records must be reports or all, got {cfg.data.stage2_records!r}")
    if not samples:
        raise TrainError("stage 2: no train record answers with a slide's report/caption")
    cache.prepare([s.slide_id for s in samples], progress)
    cfg = _stage_cfg_from_run(cfg, out, cache, [samples[0].slide_id])
    model, cfg = stage_model(2, cfg, out)
    save_train_config(cfg, out / "config.yaml")
    engine = Engine(out / "stage2", cfg.stage2, cfg.seed, cfg.precision, progress, "stage2")
    fit = engine.fit(model, samples, _lm_step(cache, engine.accelerator.device), resume=resume,
                     stop_after=stop_after)
    output = out / "stage2" / "final" / PROJECTORS_FILE
    if fit.finished and engine.is_main:
        _save_safetensors(engine.unwrap(model).projectors.state_dict(), output)
    return _finish(2, out, fit, len(samples), output, {}, engine.is_main)


def add_lora(model, s3) -> None:
    """Wrap ``model.llm`` with peft LoRA (rank/α/dropout/targets of ``s3``); only LoRA weights train in the LLM."""
    from peft import LoraConfig, get_peft_model

    names = {n.rsplit(".", 1)[-1] for n, _ in model.llm.named_modules()}
    targets = [t for t in s3.lora_targets if t in names]
    if not targets:
        raise ConfigError(f"stage3.lora_targets {list(s3.lora_targets)} match no module of the LLM")
    lcfg = LoraConfig(r=s3.lora_rank, lora_alpha=s3.lora_alpha, lora_dropout=s3.lora_dropout,
                      target_modules=targets, task_type="CAUSAL_LM")
    model.llm = get_peft_model(model.llm, lcfg)


def _stage3(cfg: TrainConfig, job: Path, out: Path, resume: bool, stop_after: int | None,
            progress: bool) -> StageResult:
    cache, stores = _slide_cache(cfg, job, out)
    text = load_train_text(job, cfg.data, stores)
    samples = permute_options(text.samples, cfg.data.option_permutations, cfg.seed, cfg.data.closed_text_answers)
    if not samples:
        raise TrainError("stage 3: no train records with a store")
    cache.prepare(text.slide_ids, progress)
    cfg = _stage_cfg_from_run(cfg, out, cache, [samples[0].slide_id])
    model, cfg = stage_model(3, cfg, out)
    save_train_config(cfg, out / "config.yaml")
    engine = Engine(out / "stage3", cfg.stage3, cfg.seed, cfg.precision, progress, "stage3")
    fit = engine.fit(model, samples, _lm_step(cache, engine.accelerator.device), resume=resume,
                     stop_after=stop_after)
    final = out / "stage3" / "final"
    if fit.finished and engine.is_main:
        m = engine.unwrap(model)
        _save_safetensors(m.projectors.state_dict(), final / PROJECTORS_FILE)
        m.llm.save_pretrained(str(final / "lora"))
    n_lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    return _finish(3, out, fit, len(samples), final, {"lora_params": n_lora}, engine.is_main)


# ------------------------------------------------------------------------------------------ stage 0
class FindingsLM(nn.Module):
    """Stage-0 module: the LLM on chat records with the ground-truth findings as words in the ``<image>`` slot.

    The findings' token embeddings take the place of the visual tokens in
    :meth:`hwsi.model.mllm.MLLMHWSI.build_inputs`, so the chat format and the answer-only labels are exactly
    those of stages 2–3 (the hierarchy/projectors of the wrapped MLLMHWSI are not used and not trained).
    """

    def __init__(self, mllm) -> None:
        super().__init__()
        self.mllm = mllm

    def build_inputs(self, findings: list[str], conversations: list[list[dict[str, str]]]):
        """MLLMInputs with each findings text's token embeddings spliced at ``<image>``."""
        m = self.mllm
        return m.build_inputs([m._embed_ids(m._ids(f)) for f in findings], conversations)

    def forward(self, findings: list[str], conversations: list[list[dict[str, str]]]):
        m = self.mllm
        x = self.build_inputs(findings, conversations)
        return m.llm(inputs_embeds=x.inputs_embeds, attention_mask=x.attention_mask, labels=x.labels)


def findings_model(llm: nn.Module, tokenizer, max_length: int = 0) -> FindingsLM:
    """Stage 0's module around ``llm``: every LLM weight trains, nothing else exists to train."""
    from hwsi.model.hierarchy import HierarchyConfig
    from hwsi.model.mllm import MLLMConfig, MLLMHWSI
    from hwsi.model.projectors import ProjectorConfig, Projectors

    width = llm.get_input_embeddings().weight.shape[1]
    text_only = MLLMHWSI(HierarchicalEncoder(HierarchyConfig.tiny()),
                         Projectors({}, ProjectorConfig(hidden=1, llm_dim=width, markers=False)), llm, tokenizer,
                         cfg=MLLMConfig(max_length=max_length))
    model = FindingsLM(text_only)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in llm.parameters():
        p.requires_grad_(True)
    return model


def stage0_corpus(samples: list[ChatSample], findings: dict[str, str]) -> list[str]:
    """The TRAIN split's text (turns without ``<image>``, plus findings) the tiny tokenizer is trained on."""
    corpus = [m["content"].replace("<image>", " ").strip() for s in samples for m in s.messages]
    corpus += list(findings.values()) + ["system", "user", "assistant"]
    return [c for c in corpus if c]


def _stage0(cfg: TrainConfig, job: Path, out: Path, resume: bool, stop_after: int | None,
            progress: bool) -> StageResult:
    from hwsi.model.llm import build_tiny_llm, load_llm

    if cfg.model.llm_path:
        raise ConfigError("stage 0 pretrains the tiny stand-in LLM; this config names a real LLM "
                          f"(model.llm_path={cfg.model.llm_path!r}), so skip stage 0")
    if not cfg.data.facts:
        raise ConfigError("stage 0 needs data.facts (json slide_id -> ground-truth findings)")
    stores = store_ids(job, cfg.data)
    text = load_train_text(job, cfg.data, stores, need_stores=False)
    findings = {sid: findings_text(f) for sid, f in text.facts.items() if isinstance(f, dict)}
    samples = [s for s in text.samples if findings.get(s.slide_id)]
    if not samples:
        raise TrainError("stage 0: no train record has findings in data.facts")
    n_records = len(samples)
    samples = permute_options(samples, cfg.data.option_permutations, cfg.seed, cfg.data.closed_text_answers)
    if n_records < len(text.samples):
        log.warning("stage 0: %d of %d records have no findings and are skipped",
                    len(text.samples) - n_records, len(text.samples))
    stage_dir = out / "stage0"
    init_dir = stage_dir / "llm_init"
    if not (resume and (init_dir / "config.json").is_file()):
        t = cfg.tiny_llm
        build_tiny_llm(init_dir, stage0_corpus(samples, findings), vocab_size=t.vocab_size, hidden=t.hidden,
                       layers=t.layers, heads=t.heads, kv_heads=t.kv_heads, max_positions=t.max_positions,
                       seed=cfg.seed)
    llm, tok = load_llm(init_dir)
    cfg = resolve_dims(cfg, None, llm_dim=llm.get_input_embeddings().weight.shape[1])
    seed_everything(cfg.seed)
    model = findings_model(llm, tok, cfg.model.max_length)
    engine = Engine(stage_dir, cfg.stage0, cfg.seed, cfg.precision, progress, "stage0")

    def step(m: nn.Module, batch: list[ChatSample]) -> tuple[torch.Tensor, dict[str, float]]:
        return m([findings[s.slide_id] for s in batch], [s.messages for s in batch]).loss, {}

    fit = engine.fit(model, samples, step, resume=resume, stop_after=stop_after)
    output = stage_dir / "llm"
    if fit.finished and engine.is_main:
        tmp = stage_dir / "llm.tmp"
        engine.unwrap(model).mllm.llm.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if output.exists():
            import shutil

            shutil.rmtree(output)
        tmp.replace(output)
    return _finish(0, out, fit, len(samples), output, {"vocab": len(tok)}, engine.is_main)
