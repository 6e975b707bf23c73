"""Evaluate every shipped plan with ``planner eval --json`` and print the README's markdown table.

    .venv/bin/python plans/table.py [--models dit-digits,pixart-digits] [--num-samples 20] [--repeats 3]

Each plan runs on its own model's held-out prompts and seeds; the time ratio is
planned / raw wall time of the same samples in the same process.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODELS = "dit-digits,pixart-digits,sd3-digits,flux-digits"


def evaluate(plan: Path, num_samples: int, repeats: int) -> dict:
    """The figures ``planner eval --json`` reports for ``plan``."""
    command = [
        sys.executable, "-m", "cli", "eval", str(plan.relative_to(ROOT)),
        "--num-samples", str(num_samples), "--repeats", str(repeats), "--json",
    ]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{plan}: {done.stderr.strip()}")
    return json.loads(done.stdout)


def row(name: str, plan: Path, facts: dict) -> list[str]:
    delta = json.loads(plan.read_text())["calibration"]["delta"]
    flops = facts["attention_flops_kept"]
    accuracy = facts["accuracy"]
    psnr = facts["psnr_db"]
    return [
        name,
        plan.stem.upper(),
        f"{delta:g}",
        f"{100 * flops['plan']:.1f} %",
        f"{100 * flops['executed']:.1f} %",
        f"{100 * accuracy['raw']:.0f} % → {100 * accuracy['planned']:.0f} %",
        "∞" if psnr == "inf" else f"{psnr:.1f}",
        f"{facts['ssim']:.3f}",
        f"{facts['time_ratio']:.2f}",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-samples", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--models", default=MODELS, help="comma-separated embedded image models")
    args = parser.parse_args()
    headers = [
        "model", "plan", "δ", "attn FLOPs kept (plan)", "executed", "digit accuracy raw → planned",
        "PSNR vs raw (dB)", "SSIM vs raw", "time planned / raw",
    ]  # fmt: skip
    print("| " + " | ".join(headers) + " |")
    print("|" + "|".join("---" for _ in headers) + "|")
    for name in args.models.split(","):
        for plan in sorted((ROOT / "plans" / name).glob("d*.json")):
            print("| " + " | ".join(row(name, plan, evaluate(plan, args.num_samples, args.repeats))) + " |", flush=True)


if __name__ == "__main__":
    main()
