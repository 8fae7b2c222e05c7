#!/usr/bin/env bash
# GPU benchmarks (generation, one GRPO step, a 5-worker swarm) on this machine's CUDA device.
# Needs nvidia-smi and a CUDA build of torch in the venv (first setup: TORCH_SPEC=torch).
# Arguments go to bench_gpu.py, e.g. --parts generation --json out.json. CI never runs this.
set -euo pipefail
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
    echo "bench_gpu.sh: no NVIDIA GPU here (nvidia-smi missing or failing); bench_gpu.py --smoke runs on CPU" >&2
    exit 2
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >&2
. "$(dirname "$0")/_venv.sh"
exec python scripts/bench_gpu.py "$@"
