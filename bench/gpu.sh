#!/usr/bin/env bash
# One prepared GPU run of the benchmarks (about 5 minutes on one H100); tables go to $OUT.
# Usage on a machine with a CUDA GPU, from the repository root: OUT=/some/dir bash bench/gpu.sh
set -euo pipefail
OUT=${OUT:-bench-out}
mkdir -p "$OUT"
PY=${PY:-python}
if ! "$PY" -c "import torch, diffusers, msgspec" 2>/dev/null; then
  "$PY" -m pip install --quiet msgspec diffusers >/dev/null
fi
"$PY" -m pip install --quiet --no-deps -e . >/dev/null
{
  echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  "$PY" -c "import torch; print('torch', torch.__version__)"
} | tee "$OUT/device.txt"
timeout 150 "$PY" -m bench.attention --device cuda --tokens 1024,4096,16384 --reps 10 | tee "$OUT/attention.md"
timeout 240 "$PY" -m bench.e2e --device cuda --tokens 4096,16384 --layers 28 --steps 20 | tee "$OUT/e2e.md"
timeout 60 "$PY" -m bench.compile --device cuda --tokens 1024 | tee "$OUT/compile.md"
