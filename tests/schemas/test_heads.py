"""Per-head cells (plan schema version 5): rules, figures and round trip."""

from __future__ import annotations

import msgspec
import pytest

import schemas
from schemas import HeadCell, Latency, PlanError, decode_plan, encode_plan, summarize, window_pairs
from tests.schemas.test_plan import make_plan

GRID = [["full", "full", "full"], ["wars", "wars", "ast"], ["wars", "full", "wars"]]
HEADS = {(1, 0): "fwa", (2, 2): "aaw"}  # three heads
TOKENS, WINDOW = 16, 3


def head_plan(heads=HEADS, **changes) -> schemas.Plan:
    model = schemas.ModelInfo("PixArtTransformer2DModel", "tiny", "ab" * 32, 3, 3, 8)
    plan = make_plan(GRID, window=WINDOW, tokens=TOKENS, schema_version=5, model=model)
    cells = [HeadCell(t, i, letters) for (t, i), letters in sorted(heads.items())]
    summary = summarize(GRID, TOKENS, WINDOW, heads=heads)
    return msgspec.structs.replace(plan, heads=cells or None, summary=summary, **changes)


def test_round_trip_and_one_line_per_cell():
    plan = head_plan()
    raw = encode_plan(plan)
    assert decode_plan(raw) == plan
    assert b'{"step":1,"layer":0,"methods":"fwa"}' in raw


def test_flops_fraction_weighs_each_head_by_its_method():
    band = window_pairs(TOKENS, WINDOW) / TOKENS**2
    cells = [1, 1, 1, (1 + band + 0) / 3, band, 0, band, 1, (0 + 0 + band) / 3]
    assert head_plan().summary.attention_flops_fraction == pytest.approx(sum(cells) / 9)
    assert head_plan().summary.method_counts["wars"] == 4


def test_time_fraction_weighs_each_head_by_its_seconds():
    seconds = {"full": 4.0, "full_refresh": 5.0, "wars": 2.0, "ast": 1.0, "asc": 3.0, "asc_refresh": 3.5}
    latency = Latency("cpu", "float32", "auto", 2, seconds)
    plan = schemas.with_latency(head_plan(), latency)
    cells = [5, 5, 5, (4 + 2 + 1) / 3, 2, 1, 2, 4, (1 + 1 + 2) / 3]  # every layer refreshes at step 0
    assert plan.summary.time_fraction == pytest.approx(sum(cells) / (4 * 9))
    assert decode_plan(encode_plan(plan)) == plan
    without_ast = Latency("cpu", "float32", "auto", 2, {k: v for k, v in seconds.items() if k != "ast"})
    with pytest.raises(PlanError, match=r"\$\.latency\.seconds: no figure for 'ast'"):
        schemas.with_latency(head_plan(heads={(1, 0): "fwa"}), without_ast)


@pytest.mark.parametrize(
    ("heads", "changes", "message"),
    [
        ({(1, 2): "fwa"}, {}, r"\$\.heads\[0\]: per-head methods refine a 'wars' cell, \$\.methods\[1\]\[2\] is 'ast'"),
        ({(1, 0): "fw"}, {}, r"\$\.heads\[0\]\.methods: 2 letters, model\.num_heads is 3"),
        ({(1, 0): "www"}, {}, r"\$\.heads\[0\]\.methods: every head runs 'wars'"),
        ({(3, 0): "fwa"}, {}, r"\$\.heads\[0\]: step 3, layer 0 is outside the 3 x 3 grid"),
        (HEADS, {"schema_version": 4}, r"\$\.heads: needs schema_version 5 \(got 4\)"),
    ],
)
def test_bad_cells_name_the_field(heads, changes, message):
    doc = msgspec.to_builtins(head_plan())
    doc["heads"] = [{"step": t, "layer": i, "methods": m} for (t, i), m in heads.items()]
    doc.update(changes)
    doc["summary"] = msgspec.to_builtins(summarize(GRID, TOKENS, WINDOW))
    with pytest.raises(PlanError, match=message):
        decode_plan(msgspec.json.encode(doc))


def test_cells_out_of_order_or_repeated_are_refused():
    doc = msgspec.to_builtins(head_plan())
    doc["heads"] = list(reversed(doc["heads"]))
    with pytest.raises(PlanError, match=r"\$\.heads\[1\]: cells must be in \(step, layer\) order, each once"):
        decode_plan(msgspec.json.encode(doc))


def test_a_letter_outside_fwa_is_refused():
    doc = msgspec.to_builtins(head_plan())
    doc["heads"][0]["methods"] = "fwx"
    with pytest.raises(PlanError, match=r"\$\.heads\[0\]\.methods"):
        decode_plan(msgspec.json.encode(doc))


def test_a_summary_ignoring_the_heads_is_refused():
    plan = msgspec.structs.replace(head_plan(), summary=summarize(GRID, TOKENS, WINDOW))
    with pytest.raises(PlanError, match=r"\$\.summary\.attention_flops_fraction"):
        encode_plan(plan)
