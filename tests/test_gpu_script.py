"""benchmarks/gpu.sh --dry: the prepared GPU script runs every part at tiny sizes on the CPU and reports each one."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_script_dry_mode_runs_every_part_and_writes_its_numbers(tmp_path: Path) -> None:
    out = tmp_path / "gpu.json"
    env = {**os.environ, "PY": sys.executable}
    env.pop("OUT", None)
    proc = subprocess.run(["bash", "benchmarks/gpu.sh", "--dry", "--out", str(out), "--work", str(tmp_path / "w")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("gpu.sh ")]
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    parts = {ln.split(":", 1)[0].split()[1] for ln in lines}
    assert {"load", "device", "matmul", "conch", "lora", "slide", "done"} <= parts, lines
    assert not [ln for ln in lines if "FAILED" in ln], lines
    text = "\n".join(lines)
    assert re.search(r"gpu.sh matmul: bfloat16 512³ [\d.]+ [GT]FLOP/s", text), text
    assert re.search(r"gpu.sh conch: conch_vit_b16 bf16 batch 4 at 64 px: [\d.]+ patches/s", text), text
    assert re.search(r"gpu.sh lora: tiny Qwen2 .* micro-batch 2 × 32 tokens: \d+ tokens/s", text), text
    assert re.search(r"gpu.sh slide: 2048² synthetic slide .* = [\d.]+ s end to end \(4 regions, \d+ patches", text)
    assert "gpu.sh done: 5/5 parts ok" in text
    res = json.loads(out.read_text())
    assert res["device"]["dry"] is True and res["device"]["device"] == "cpu"
    assert res["matmul"]["flops_per_s"]["bfloat16"] > 0
    assert res["conch"]["patches_per_s"] > 0 and res["conch"]["flop_per_patch"] > 0
    assert res["lora"]["tokens_per_s"] > 0 and res["lora"]["flops_per_step"] > 0 and res["lora"]["lora_params"] > 0
    assert res["slide"]["n_patches"] > 0 and res["slide"]["n_regions"] == 4
