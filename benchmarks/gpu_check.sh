#!/usr/bin/env bash
# GPU check of the layer engine (issue 22): an 8B-shaped random bf16 Llama (hidden 4096, FFN 14336,
# 32 q / 8 kv heads, 4 layers) through SlimGPT and Wanda under placement device and offload on CUDA;
# prints seconds, peak GPU memory (torch.cuda.max_memory_allocated) and peak host RSS per step.
# Needs python3 with torch (CUDA), transformers, safetensors, psutil, numpy and pydantic (pruning_core's
# method settings are pydantic models); no Prefect / MLflow / network. Budget: well under 8 minutes on
# one H200. Extra arguments go to the script, e.g. a CPU smoke test:
#   benchmarks/gpu_check.sh --device cpu --shape tiny --layers 1
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec timeout 480 python3 benchmarks/gpu_check.py "$@"
