#!/usr/bin/env bash
# One prepared GPU run of the benchmarks (about 5 minutes on one H100); tables go to $OUT.
# Usage on a machine with a CUDA GPU and PyTorch, from the repository root:
#   OUT=/some/dir bash bench/gpu.sh
# Wheels of missing packages (msgspec, diffusers) may be put in .whl/; they are installed
# into a scratch folder, so the machine needs no network.
set -uo pipefail
OUT=${OUT:-bench-out}
mkdir -p "$OUT"
PY=${PY:-python3}
if [ -d .whl ]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/bench-site .whl/*.whl
  export PYTHONPATH=/tmp/bench-site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
{
  echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  "$PY" -c "import torch; print('torch', torch.__version__)"
} 2>&1 | tee "$OUT/device.txt"
for kernel in chunked flex; do
  timeout 200 "$PY" -m bench.attention --device cuda --tokens 1024,4096,16384 --reps 10 --kernel $kernel 2>&1 \
    | tee "$OUT/attention-$kernel.md"
done
timeout 240 "$PY" -m bench.e2e --device cuda --tokens 4096,16384 --layers 28 --steps 20 2>&1 | tee "$OUT/e2e.md"
timeout 90 "$PY" -m bench.compile --device cuda --tokens 1024 2>&1 | tee "$OUT/compile.md"
