"""The GPU checks of issue 15 in one short run (minutes), driven by benchmarks/gpu.sh: what a lab sees on its card.

    bash benchmarks/gpu.sh              # on a GPU machine: the real sizes below (cuda, bf16)
    bash benchmarks/gpu.sh --dry        # anywhere (CPU): every part at tiny sizes, < 1 min; what the tests run

Parts, one after the other in one process (each prints one ``gpu.sh <part>:`` line; a part that fails prints
``gpu.sh <part>: FAILED <error>`` and the others still run; exit 1 if any failed):

* ``device`` — torch, the device and its name, bf16 support.
* ``matmul`` — the measured bf16 matmul rate (square ``--matmul-n``³, FLOP = 2n³ per product): the yardstick.
* ``conch`` — the CONCH-shaped image tower (``conch_vit_b16``: ViT-B/16 at 448 px + attentional pooler, random
  weights) in bf16, inference, batch 256 of 448² inputs already on the device: patches/s, and its FLOP/s (counted by
  ``torch.utils.flop_counter`` on the same forward) as a share of the matmul rate. Preprocessing (resize, normalise)
  is not in it.
* ``lora`` — one stage-3 training step of a 7B-shaped LLM: Qwen2.5-7B-Instruct's published config
  (:data:`hwsi.train.plan.QWEN25_7B_INSTRUCT`, random weights: no download) in bf16 with peft LoRA from the paper
  preset (r 128, α 256, every projection; :func:`hwsi.train.stage_lm.add_lora`), float32 adapters, bf16 autocast,
  AdamW on the adapters, no activation checkpointing; micro-batch × sequence from the paper preset (4 × 4096 tokens,
  halved on out-of-memory): tokens/s, the step's FLOP/s share of the matmul rate, peak memory beside
  ``hwsi plan``'s estimate for stage 3 on one GPU (:func:`hwsi.train.plan.build_plan`).
* ``slide`` — one synthetic SynthPath slide (40000² px at 0.5 µm/px) end to end: written (not timed in the total),
  ``hwsi tile`` (4096² regions, 256² patches), ``hwsi extract`` with the default encoders (hwsi_small_patch +
  MiniLM, built-in nuclei) on the device in bf16: seconds per step, patches/s.

Without a CUDA device (and no ``--device``) it runs the dry mode. ``--dry`` shrinks every part (CPU, float32 matmul beside bf16, the registry's tiny CONCH, a 2-layer Qwen2, a 2048²
slide with 1024² regions) so the whole script runs on any machine; its numbers mean nothing. Results also go to
``--out`` (default ``$OUT/gpu.json`` when ``$OUT`` is set, else ``benchmarks/out/gpu.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
import traceback
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import torch

REPO = Path(__file__).resolve().parents[1]
GIB = 2**30
TINY_QWEN = {"vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512}


def say(part: str, text: str) -> None:
    print(f"gpu.sh {part}: {text}", flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_gib(device: torch.device) -> float:
    """Peak memory of the part: CUDA's allocator peak, else the process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / GIB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def timed(fn: Callable[[], Any], device: torch.device, warmup: int, reps: int) -> float:
    """Seconds per call of ``fn`` after ``warmup`` calls (device synchronised around the timing)."""
    for _ in range(warmup):
        fn()
    sync(device)
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    sync(device)
    return (time.perf_counter() - t) / reps


def flops_txt(rate: float) -> str:
    """A FLOP/s rate in the unit that shows it (TFLOP/s on GPUs, GFLOP/s in dry runs)."""
    return f"{rate / 1e12:.2f} TFLOP/s" if rate >= 1e11 else f"{rate / 1e9:.2f} GFLOP/s"


def count_txt(n: float) -> str:
    return f"{n / 1e9:.3f} B" if n >= 1e9 else f"{n / 1e6:.2f} M" if n >= 1e5 else f"{n:,.0f}"


def counted_flops(fn: Callable[[], Any]) -> int:
    """FLOP of one call of ``fn`` (matmuls, convolutions and attention, as torch.utils.flop_counter counts them)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        fn()
    return int(fc.get_total_flops())


# ------------------------------------------------------------------------------------------------ parts
def part_device(args: argparse.Namespace, device: torch.device, res: dict) -> None:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    bf16 = torch.cuda.is_bf16_supported() if device.type == "cuda" else True
    res["device"] = {"device": str(device), "name": name, "torch": torch.__version__, "bf16": bf16,
                     "dry": args.dry, "threads": torch.get_num_threads()}
    say("device", f"{device} ({name}), torch {torch.__version__}, bf16 {bf16}, dry {args.dry}, "
                  f"{torch.get_num_threads()} CPU threads")


def part_matmul(args: argparse.Namespace, device: torch.device, res: dict) -> None:
    n = args.matmul_n
    out = {}
    for dt in (torch.bfloat16, torch.float32) if args.dry else (torch.bfloat16,):
        a, b = (torch.randn(n, n, device=device, dtype=dt) for _ in range(2))
        sec = timed(lambda: a @ b, device, 3, args.matmul_reps)
        out[str(dt).split(".")[-1]] = 2 * n**3 / sec
    res["matmul"] = {"n": n, "flops_per_s": out}
    say("matmul", ", ".join(f"{k} {n}³ {flops_txt(v)}" for k, v in out.items()))


def part_conch(args: argparse.Namespace, device: torch.device, res: dict) -> None:
    from hwsi.features.encoders.registry import create_encoder, encoder_entry

    over = encoder_entry("conch_vit_b16").tiny if args.dry else {}
    enc = create_encoder("conch_vit_b16", **over).to(device=device, dtype=torch.bfloat16).eval()
    size = enc.config.input_size
    x = torch.randn(args.conch_batch, 3, size, size, device=device, dtype=torch.bfloat16)
    with torch.no_grad():  # not inference_mode: the FLOP counter's module hooks need autograd views
        flops = counted_flops(lambda: enc(x))
        sec = timed(lambda: enc(x), device, 2, args.conch_reps)
    rate = flops / sec
    mm = res.get("matmul", {}).get("flops_per_s", {}).get("bfloat16")
    share = rate / mm if mm else float("nan")
    res["conch"] = {"batch": args.conch_batch, "input": size, "patches_per_s": args.conch_batch / sec,
                    "flop_per_patch": flops / args.conch_batch, "flops_per_s": rate, "share_of_matmul": share,
                    "seconds_per_batch": sec, "peak_gib": peak_gib(device)}
    say("conch", f"conch_vit_b16 bf16 batch {args.conch_batch} at {size} px: {args.conch_batch / sec:.1f} patches/s, "
                 f"{flops / args.conch_batch / 1e9:.3g} GFLOP/patch, {flops_txt(rate)} = "
                 f"{100 * share:.0f}% of the bf16 matmul rate; peak {peak_gib(device):.2f} GiB")


def _lora_step_setup(args: argparse.Namespace, device: torch.device):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from hwsi.train.config import load_train_config
    from hwsi.train.plan import QWEN25_7B_INSTRUCT
    from hwsi.train.stage_lm import add_lora

    cfg = load_train_config("paper")
    conf = Qwen2Config(**(TINY_QWEN if args.dry else QWEN25_7B_INSTRUCT))
    conf._attn_implementation = "sdpa"
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            llm = Qwen2ForCausalLM(conf)
    finally:
        torch.set_default_dtype(old)
    if args.dry:
        cfg.stage3.lora_rank, cfg.stage3.lora_alpha = 8, 16
    holder = SimpleNamespace(llm=llm)
    add_lora(holder, cfg.stage3)
    llm = holder.llm
    for p in llm.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()  # float32 master weights of what trains
    trained = [p for p in llm.parameters() if p.requires_grad]
    return cfg, conf, llm, trained


def part_lora(args: argparse.Namespace, device: torch.device, res: dict) -> None:
    from hwsi.train.config import load_train_config
    from hwsi.train.plan import build_plan

    cfg, conf, llm, trained = _lora_step_setup(args, device)
    opt = torch.optim.AdamW(trained, lr=1e-5)
    micro = args.micro_batch or cfg.stage3.micro_batch_size
    seq = args.seq or cfg.model.max_length
    llm.train()
    while True:
        ids = torch.randint(0, conf.vocab_size, (micro, seq), device=device)

        def step() -> None:
            with torch.autocast(device.type, dtype=torch.bfloat16):
                loss = llm(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        try:
            reset_peak(device)
            flops = counted_flops(step)
            sec = timed(step, device, 1, args.lora_steps)
            break
        except torch.OutOfMemoryError:
            opt.zero_grad(set_to_none=True)
            if micro == 1:
                raise
            say("lora", f"out of memory at micro-batch {micro} × {seq}; retrying at {micro // 2}")
            micro //= 2
    tokens = micro * seq
    mm = res.get("matmul", {}).get("flops_per_s", {}).get("bfloat16")
    n_total = sum(p.numel() for p in llm.parameters())
    n_lora = sum(p.numel() for p in trained)
    planned = None
    if not args.dry:
        c = load_train_config("paper")
        c.stage3.micro_batch_size, c.model.max_length = micro, seq
        planned = build_plan(c, gpus=1).stages[-1].gib
    peak = peak_gib(device)
    res["lora"] = {"micro_batch": micro, "seq": seq, "tokens_per_s": tokens / sec, "seconds_per_step": sec,
                   "flops_per_step": flops, "share_of_matmul": (flops / sec) / mm if mm else None,
                   "params": n_total, "lora_params": n_lora, "peak_gib": peak, "plan_gib": planned}
    plan_txt = (f" (hwsi plan, stage 3 on 1 GPU: {planned['total']:.1f} GiB: weights {planned['weights']:.1f}, "
                f"grads+Adam {planned['optimizer']:.1f}, activations {planned['activations']:.1f})") if planned else ""
    say("lora", f"{'7B-shaped (Qwen2.5-7B config)' if not args.dry else 'tiny Qwen2'} {count_txt(n_total)} params, "
                f"LoRA r{cfg.stage3.lora_rank} {count_txt(n_lora)} trained, micro-batch {micro} × {seq} tokens: "
                f"{tokens / sec:.0f} tokens/s, {sec:.3f} s/step, {flops_txt(flops / sec)} = "
                f"{100 * (flops / sec) / mm if mm else float('nan'):.0f}% of the bf16 matmul rate; "
                f"peak {peak:.2f} GiB{plan_txt}")


def part_slide(args: argparse.Namespace, device: torch.device, res: dict) -> None:
    from hwsi.features.extract import ExtractConfig, extract_slide, load_models
    from hwsi.slide import GridConfig, TileConfig, tile_batch
    from hwsi.store import list_stores
    from hwsi.synth.cohort import write_slide
    from hwsi.synth.scene import SceneConfig

    side = args.side
    region, patch = (1024, 256) if args.dry else (4096, 256)
    work = Path(args.work)
    t = time.perf_counter()
    write_slide(work / "slides", SceneConfig(width=side, height=side, mpp=0.5, seed=0), f"gpu{side}", threads=None)
    t_write = time.perf_counter() - t
    job = work / f"job{side}"
    t = time.perf_counter()
    tile_batch(work / "slides" / f"gpu{side}.tiff", job, TileConfig(grid=GridConfig(region_size=region,
                                                                                    patch_size=patch)),
               overwrite=True, show_progress=False)
    t_tile = time.perf_counter() - t
    reset_peak(device)
    dtype = "bfloat16" if device.type == "cuda" else "float32"
    cfg = ExtractConfig(batch_size=args.extract_batch, threads=args.threads, device=str(device), dtype=dtype,
                        overwrite=True)
    t = time.perf_counter()
    models = load_models(cfg, log=lambda m: None)
    t_models = time.perf_counter() - t
    (store,) = list_stores(job)
    tm = extract_slide(store, models, cfg, job=job)
    res["slide"] = {"side": side, "write_s": t_write, "tile_s": t_tile, "models_s": t_models, "extract_s": tm.total,
                    "read_s": tm.read, "encode_s": tm.encode, "spf_s": tm.spf, "cells_s": tm.cells,
                    "n_regions": tm.n_regions, "n_patches": tm.n_patches, "n_cells": tm.n_cells,
                    "patches_per_s": tm.n_patches / max(tm.total, 1e-9), "peak_gib": peak_gib(device)}
    say("slide", f"{side}² synthetic slide ({region}² regions, {patch}² patches): tile {t_tile:.1f} s + extract "
                 f"{tm.total:.1f} s = {t_tile + tm.total:.1f} s end to end ({tm.n_regions} regions, {tm.n_patches} "
                 f"patches, {tm.n_cells} nuclei, {tm.n_patches / max(tm.total, 1e-9):.0f} patches/s; read "
                 f"{tm.read:.1f} s, encode {tm.encode:.1f} s, cells {tm.cells:.1f} s, write {tm.write:.1f} s); "
                 f"written in {t_write:.1f} s, models loaded in {t_models:.1f} s (not in the total)")


PARTS = {"device": part_device, "matmul": part_matmul, "conch": part_conch, "lora": part_lora, "slide": part_slide}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry", action="store_true", help="tiny sizes on the CPU (the test's mode)")
    ap.add_argument("--device", default=None, help="default: cuda when there is one (cpu with --dry)")
    ap.add_argument("--parts", nargs="+", default=list(PARTS), choices=list(PARTS))
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--work", type=Path, default=None, help="slide and job folder (default: a temporary one)")
    ap.add_argument("--matmul-n", type=int, default=None)
    ap.add_argument("--matmul-reps", type=int, default=None)
    ap.add_argument("--conch-batch", type=int, default=None)
    ap.add_argument("--conch-reps", type=int, default=None)
    ap.add_argument("--micro-batch", type=int, default=0, help="default: the paper preset's stage-3 micro-batch")
    ap.add_argument("--seq", type=int, default=0, help="default: the paper preset's model.max_length")
    ap.add_argument("--lora-steps", type=int, default=None)
    ap.add_argument("--side", type=int, default=None)
    ap.add_argument("--extract-batch", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None, help="slide reader threads")
    args = ap.parse_args(argv)
    if not args.dry and args.device is None and not torch.cuda.is_available():
        say("device", "no CUDA device here: running the dry mode (--device cpu forces the real sizes)")
        args.dry = True
    dry = {"matmul_n": 512, "matmul_reps": 5, "conch_batch": 4, "conch_reps": 2, "micro_batch": 2, "seq": 32,
           "lora_steps": 2, "side": 2048, "extract_batch": 16, "threads": 2}
    real = {"matmul_n": 8192, "matmul_reps": 20, "conch_batch": 256, "conch_reps": 10, "lora_steps": 3,
            "side": 40000, "extract_batch": 256, "threads": min(16, os.cpu_count() or 1)}
    for k, v in (dry if args.dry else real).items():
        if not getattr(args, k):
            setattr(args, k, v)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() and not args.dry else "cpu"))
    out = args.out or (Path(os.environ["OUT"]) / "gpu.json" if os.environ.get("OUT") else REPO / "benchmarks" / "out"
                       / "gpu.json")
    res: dict[str, Any] = {}
    failed = []
    with tempfile.TemporaryDirectory(prefix="hwsi-gpu-") as tmp:
        args.work = args.work or Path(tmp)
        for name in args.parts:
            t = time.perf_counter()
            try:
                PARTS[name](args, device, res)
            except Exception as exc:  # a part's failure (e.g. out of memory) must not hide the others' numbers
                failed.append(name)
                res[name] = {"error": f"{type(exc).__name__}: {exc}"}
                say(name, f"FAILED {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
                traceback.print_exc(file=sys.stderr)
            res.setdefault(name, {})["part_seconds"] = round(time.perf_counter() - t, 2)
            reset_peak(device)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1, default=str))
    say("done", f"{len(args.parts) - len(failed)}/{len(args.parts)} parts ok"
                + (f", failed: {' '.join(failed)}" if failed else "") + f"; results in {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
