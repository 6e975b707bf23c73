#!/bin/sh
# Rebuild the shipped plans: `planner build` on each embedded model at the paper's
# settings D1…D6 (δ = 0.975 … 0.85), with the model's defaults (its calibration
# prompts or classes, 20 steps, its guidance, window N/8, seed 0), on the CPU in float32,
# without latency figures (they would make the methods depend on the machine's timings).
#
#     sh plans/make_plans.sh                # every model, from the repository root, after `make setup`
#     sh plans/make_plans.sh dit-digits     # one model
set -eu
cd "$(dirname "$0")/.."
PLANNER=${PLANNER:-.venv/bin/planner}
[ $# -gt 0 ] || set -- dit-digits pixart-digits latte-digits sd3-digits flux-digits
for model in "$@"; do
    mkdir -p "plans/$model"
    i=1
    for delta in 0.975 0.95 0.925 0.9 0.875 0.85; do
        "$PLANNER" build --model "$model" --delta "$delta" --device cpu --dtype float32 --no-latency \
            --output "plans/$model/d$i.json" --quiet
        echo "plans/$model/d$i.json  (δ = $delta)"
        i=$((i + 1))
    done
done
