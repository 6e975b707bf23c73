#!/usr/bin/env bash
# One prepared GPU run of the benchmarks (about 9 minutes on one H200); tables go to $OUT.
# Usage on a machine with a CUDA GPU and PyTorch, from the repository root:
#   OUT=/some/dir bash bench/gpu.sh
# Wheels of missing packages (msgspec, diffusers) may be put in .whl/; they are installed
# into a scratch folder, so the machine needs no network. Each part has its own time
# limit and its own file, so one that fails or runs long leaves the others' tables.
set -uo pipefail
OUT=${OUT:-bench-out}
mkdir -p "$OUT"
PY=${PY:-python3}
if [ -d .whl ]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/bench-site .whl/*.whl
  export PYTHONPATH=/tmp/bench-site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
part() {  # part NAME SECONDS ARGS…: one benchmark, its output in $OUT/NAME.md
  local name=$1 limit=$2
  shift 2
  echo "== $name: python -m $*"
  timeout "$limit" "$PY" -m "$@" 2>&1 | tee "$OUT/$name.md"
  echo "== $name: exit ${PIPESTATUS[0]}"
}
{
  echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  "$PY" -c "import torch, diffusers, msgspec; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'msgspec', msgspec.__version__)"
} 2>&1 | tee "$OUT/device.txt"
part exactness 60 bench.exactness --device cuda --tokens 1024,4096 --windows auto
part attention 110 bench.attention --device cuda --tokens 4096,16384 --windows auto --refresh --reps 10
part e2e-4096 100 bench.e2e --device cuda --tokens 4096 --windows band,tiles2d:32x32:0,tiles2d:8x16:1
part e2e-16384 200 bench.e2e --device cuda --tokens 16384 --windows tiles1d:4096:0,tiles2d:64x64:0
part compile 100 bench.compile --device cuda --tokens 1024 --layers 4 --steps 20 --reps 3
