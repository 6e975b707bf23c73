"""FLOPs of one transformer forward, split by what a plan can skip (``schemas.Costs``).

One calibration call, cut to one prompt's rows, runs once under torch's FLOP counter.
Projections are the counted FLOPs of each self-attention layer's linear layers;
feed-forward layers count all they run; attention proper is computed from the pair
count (``4 × heads × head_dim × pairs`` per sample row: scores and weighted values,
multiply and add), since the counter does not see every fused attention kernel; the
rest is what the counter saw outside those.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from planner.latency import capture_call
from planner.search import Chunks
from runtime.apply import self_attention_layers
from runtime.feedforward import feed_forward_layers
from schemas import Costs, Plan, cfg_mode_of, layer_weight, plan_layers


def measure_costs(pipe: Any, draft: Plan, call: dict[str, Any]) -> Costs:
    """``Costs`` of ``pipe.transformer`` on one prompt's rows of ``call``'s first transformer call."""
    args, kwargs = capture_call(pipe, call)
    rows = (args[0] if args else kwargs["hidden_states"]).shape[0]
    [(args, kwargs)] = Chunks(rows, cfg_mode_of(draft.sampling) == "batched", 1).split(args, kwargs)[:1]
    return transformer_costs(pipe.transformer, draft, args, kwargs)


def transformer_costs(transformer: torch.nn.Module, draft: Plan, args: tuple, kwargs: dict) -> Costs:
    """``Costs`` of one forward ``transformer(*args, **kwargs)`` (see the module doc)."""
    names = {module: f"{type(transformer).__name__}.{name}" if name else type(transformer).__name__
             for name, module in transformer.named_modules()}  # fmt: skip
    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        transformer(*args, **kwargs)
    counts = {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()}
    attention_modules = self_attention_layers(transformer)
    rows = (args[0] if args else kwargs["hidden_states"]).shape[0]

    def linears(module: torch.nn.Module) -> float:
        return float(sum(counts.get(names[m], 0) for m in module.modules() if isinstance(m, torch.nn.Linear)))

    projections = [linears(attn) for attn in attention_modules]
    inside_attention = sum(float(counts.get(names[attn], 0)) for attn in attention_modules)
    ffn = [float(counts.get(names[m], 0)) for m in feed_forward_layers(transformer)]
    info = draft.model
    attention = [4.0 * info.num_heads * info.head_dim * layer_weight(x) * rows for x in plan_layers(draft)]
    other = max(0.0, float(counter.get_total_flops()) - inside_attention - sum(ffn))
    return Costs(attention=attention, projections=projections, ffn=ffn, other=other)
