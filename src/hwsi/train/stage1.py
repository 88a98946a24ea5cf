"""Stage 1 (Eq. 6–9): hierarchical contrastive alignment of the hierarchy with the text units.

Trained: CCAF, ViT-4K, ViT_WSI, the per-scale alignment heads, optionally the last
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

Several processes (docs/cluster.md): the slide cache is built shared out across them before training
(:meth:`hwsi.train.data.SlideCache.prepare`), the text bank by the main process first (the others read its file);
the in-batch Eq. 7 (``eq6: v1``) gathers every process's reports (:func:`hwsi.model.losses.slide_report_loss`); the
v2 banks hold the whole train split and need nothing. A live text tower's bank refresh (``text_refresh_every``)
counts optimizer steps, so it happens at the same steps whatever the processes and the accumulation.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hwsi.errors import ConfigError
from hwsi.features.encoders import create_text_encoder
from hwsi.model.heads import AlignmentHeads
from hwsi.model.hierarchy import HierarchicalEncoder
from hwsi.model.inputs import SlideBatch
from hwsi.model.losses import AlignmentTargets, HCALossConfig, HCALossOutput, ScaleTargets, assign_positives, hca_loss
from hwsi.train.alignment import BankBuilder, LiveText, parse_same_fact
from hwsi.train.config import TrainConfig, save_train_config
from hwsi.train.data import CachedSlides, ReportUnits, TextBank, load_train_text, report_units, resolve
from hwsi.train.engine import Engine, TrainError, seed_everything
from hwsi.train.processes import process_state, union_over_processes
from hwsi.train.stage_common import (
    ALIGNMENT_FILE,
    StageResult,
    finish_stage,
    resolve_dims,
    save_safetensors,
    slide_cache,
)
from hwsi.train.units import UNIT_SCALES, UnitRules, route_report

log = logging.getLogger(__name__)


class AlignmentModel(nn.Module):
    """Stage-1 module: hierarchy -> alignment heads -> L_HCA (Eq. 9); optional trainable text tower."""

    def __init__(self, hierarchy: HierarchicalEncoder, heads: AlignmentHeads, loss: HCALossConfig,
                 text_encoder: nn.Module | None = None, gather: bool = False) -> None:
        super().__init__()
        self.hierarchy = hierarchy
        self.heads = heads
        self.loss_cfg = loss
        self.text = text_encoder
        self.gather = gather  # several processes: the in-batch Eq. 7 over every process's batch

    def forward(self, batch: SlideBatch, targets: AlignmentTargets, strings: list[str] | None = None) -> HCALossOutput:
        if self.text is not None and strings is not None:
            targets = self._live_text(targets, strings)
        return hca_loss(self.heads(self.hierarchy(batch)), targets, self.loss_cfg, self.gather)

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


def _text_bank(encoder: nn.Module, path: Path, strings: list[str], state: Any) -> TextBank:
    """The frozen embeddings of ``strings``, cached at ``path``: the main process encodes and saves first, the
    others then read its file (one encoding, no two writers)."""
    with state.main_process_first():
        bank = TextBank(encoder, path)
        bank.add(strings)
        bank.save()
    return bank


def _targets_to(t: AlignmentTargets, device: torch.device) -> AlignmentTargets:
    def mv(s: ScaleTargets | None) -> ScaleTargets | None:
        if s is None:
            return None
        return ScaleTargets(s.text.to(device), s.text_mask.to(device), s.positives.to(device),
                            None if s.text_ids is None else s.text_ids.to(device))

    return AlignmentTargets(mv(t.cells), mv(t.patches), mv(t.regions),
                            None if t.report is None else t.report.to(device),
                            None if t.report_ids is None else t.report_ids.to(device))


def run_stage1(cfg: TrainConfig, job: Path, out: Path, resume: bool, stop_after: int | None,
            progress: bool) -> StageResult:
    cache, stores = slide_cache(cfg, job, out)
    text = load_train_text(job, cfg.data, stores)
    slides = [s for s in text.slide_ids if s in text.reports]
    if not slides:
        raise TrainError("stage 1: no train slide has both a store and a report")
    state = process_state(cfg.device, cfg.precision)
    cache.prepare(slides, progress, state.process_index, state.num_processes, state.wait_for_everyone)
    s1 = cfg.stage1
    v2 = s1.loss.eq6 == "pooled"
    encoder = create_text_encoder(cfg.data.text_encoder)
    bank_path = out / "cache" / f"text-{cfg.data.text_encoder.replace(':', '_').replace('/', '_')}.pt"
    if v2:
        rules = UnitRules.load(resolve(job, s1.unit_rules) if s1.unit_rules else None)
        routed = {s: route_report(text.reports[s], rules, s1.max_units) for s in slides}
        builder: Any = BankBuilder(routed, {s: text.reports[s] for s in slides}, text.facts,
                                   parse_same_fact(s1.same_fact), tuple(x for x in s1.loss.scales if x in UNIT_SCALES))
        bank = _text_bank(encoder, bank_path, builder.strings, state)
        sizes = builder.sizes()
        log.info("stage 1: unit banks %s", sizes)
        empty = [x for x in s1.loss.scales if x in UNIT_SCALES and not sizes.get(x)]
        if empty and s1.loss.use_Ls:
            log.warning("stage 1: no report clause is routed to %s (rules: %s); their Eq. 6 terms are 0",
                        ", ".join(empty), s1.unit_rules or "the packaged default")
    else:
        units = {s: report_units(text.reports[s], s1.max_words, s1.max_phrases, s1.max_sentences) for s in slides}
        bank = _text_bank(encoder, bank_path, [x for u in units.values()
                                               for x in (*u.words, *u.phrases, *u.sentences, u.report)], state)
        builder = TargetBuilder(units, bank, s1.loss.scales)
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
    model = AlignmentModel(hierarchy, heads, s1.loss, text_tower, gather=state.num_processes > 1)
    engine = Engine(out / "stage1", s1, cfg.seed, cfg.precision, progress, "stage1", device=cfg.device,
                    log_with=cfg.log_with)
    device = engine.accelerator.device
    if v2:
        frozen = nn.functional.normalize(bank.stack(builder.strings), dim=-1)
        live = None
        if text_tower is not None:
            _, steps_per_epoch = engine.batch_plan(len(slides))
            micro_per_step = engine.accum  # LiveText counts its calls: one per micro-batch of this process
            ckpt = engine.last_checkpoint() if resume else None
            done = json.loads((ckpt / "state.json").read_text())["step"] * micro_per_step if ckpt else 0
            live = LiveText(encoder, builder.strings, (s1.text_refresh_every or steps_per_epoch) * micro_per_step,
                            out / "stage1" / "text", done)

    def step(m: nn.Module, loaded: tuple[list[str], SlideBatch]) -> tuple[torch.Tensor, dict[str, float]]:
        ids, batch = loaded  # read and collated by CachedSlides, in DataLoader workers when data.num_workers > 0
        if v2:
            # a live text tower encodes with gradient the units of the whole micro-step (every process's slides):
            # they are the other slides' negatives too, so this loss reaches them as one process's would
            emb = (live(union_over_processes(builder.batch_strings(ids), state.num_processes), device)
                   if live is not None else frozen.to(device))
            res = m(batch.to(device), builder(ids, emb))
        else:
            targets = _targets_to(builder(ids, batch), device)
            res = m(batch.to(device), targets, builder.strings if text_tower is not None else None)
        return res.total, {k: float(v.detach()) for k, v in res.terms.items()}

    fit = engine.fit(model, slides, step, resume=resume, stop_after=stop_after, load=CachedSlides(cache),
                     num_workers=cfg.data.num_workers, prefetch_factor=cfg.data.prefetch_factor)
    output = out / "stage1" / "final" / ALIGNMENT_FILE
    if fit.finished and engine.is_main:
        m = engine.unwrap(model)
        state = {f"hierarchy.{k}": v for k, v in m.hierarchy.state_dict().items()}
        state.update({f"heads.{k}": v for k, v in m.heads.state_dict().items()})
        if text_tower is not None:
            state.update({f"text.{n}": p for n, p in m.text.named_parameters() if p.requires_grad})
        save_safetensors(state, output)
    return finish_stage(1, out, fit, len(slides), output, {"text_units": len(bank.emb)}, engine.is_main)
