#!/usr/bin/env bash
# The GPU checks of issue 15 in one short run (benchmarks/gpu.py: parts, sizes, what each line means).
#
#   bash benchmarks/gpu.sh                # on a GPU machine: CONCH-shaped ViT-B/16 bf16 patches/s vs the bf16 matmul
#                                         # rate, a 7B-shaped stage-3 LoRA step (tokens/s, peak memory), a 40000² slide
#   bash benchmarks/gpu.sh --dry          # anywhere, tiny sizes on the CPU in < 1 min (tests/test_gpu_script.py)
#   bash benchmarks/gpu.sh --parts matmul lora --seq 2048     # any option of benchmarks/gpu.py
#
# Uses the checkout's .venv when there is one (else python3); prints `uptime` first (load changes every number).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PY:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
echo "gpu.sh load: $(uptime)"
if command -v nvidia-smi >/dev/null 2>&1; then
  echo "gpu.sh nvidia-smi: $(nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv,noheader | head -1)"
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec "$PY" benchmarks/gpu.py "$@"
