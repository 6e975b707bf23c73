"""Schema version 3: joint (MMDiT) layers with text tokens, and the CFG mode."""

from __future__ import annotations

import json

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import schemas
from schemas import PlanError, Tiles2d, cfg_mode_of, decode_plan, encode_plan, layer_weight, summarize, window_pairs
from tests.schemas.test_plan import as_doc, decode_doc, make_plan, video_plan
from tests.messages import naming

TEXT = 5
GRID = [["full", "full", "full"], ["wars", "ast", "wars"], ["asc", "wars_asc", "full"]]


def joint_plan(methods=GRID, *, window=3, cfg_mode="separate", **changes) -> schemas.Plan:
    layers = [
        schemas.Layer("joint", 16, window, text_tokens=TEXT),
        schemas.Layer("spatial", 16, window),
        schemas.Layer("joint", 16, window, text_tokens=TEXT),
    ]
    plan = make_plan(methods, window=window, tokens=16, schema_version=3, losses=None)
    sampling = msgspec.structs.replace(
        plan.sampling, cfg=cfg_mode != "none", cfg_mode=cfg_mode,
        cfg_order="uncond_cond" if cfg_mode == "batched" else None,
    )
    plan = msgspec.structs.replace(
        plan,
        tokens=schemas.Tokens(16, 32, 32, text_tokens=TEXT),
        sampling=sampling,
        layers=layers,
        summary=summarize(methods, 16, window, layers),
    )
    return msgspec.structs.replace(plan, **changes)


@pytest.mark.parametrize("mode", ["batched", "separate"])
def test_joint_plan_round_trips(mode):
    plan = joint_plan(cfg_mode=mode)
    raw = encode_plan(plan)
    assert decode_plan(raw) == plan
    doc = json.loads(raw)
    assert doc["sampling"]["cfg_mode"] == mode and doc["layers"][0]["text_tokens"] == TEXT


def test_older_plans_mean_what_they_meant():
    for plan in (make_plan(), make_plan([["full"], ["wars"]], cfg=False), video_plan()):
        decoded = decode_plan(encode_plan(plan))
        assert decoded == plan and decoded.sampling.cfg_mode is None
        assert cfg_mode_of(decoded.sampling) == ("batched" if plan.sampling.cfg else "none")
        assert all(layer.text_tokens == 0 for layer in decoded.layers or ())


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda d: d["sampling"].__setitem__("cfg_order", "uncond_cond"), r"\$\.sampling\.cfg_order: must be null with cfg_mode 'separate'"),
        (lambda d: d["sampling"].__setitem__("cfg_mode", "none"), r"\$\.sampling\.cfg_mode: 'none' does not fit sampling\.cfg = true"),
        (lambda d: d["sampling"].__setitem__("cfg_mode", "batched"), r"\$\.sampling\.cfg_order: required when sampling\.cfg is true and CFG is batched"),
        (lambda d: d["sampling"].__setitem__("cfg_mode", "twice"), naming("$.sampling.cfg_mode", "twice")),
        (lambda d: d["layers"][0].__setitem__("text_tokens", 4), r"\$\.layers\[0\]\.text_tokens: a joint layer has tokens\.text_tokens = 5, got 4"),
        (lambda d: d["layers"][1].__setitem__("text_tokens", 5), r"\$\.layers\[1\]\.text_tokens: a spatial layer has no text tokens, got 5"),
        (lambda d: d["layers"][0].__setitem__("num_tokens", 8), r"\$\.layers\[0\]\.num_tokens: a joint layer attends over tokens\.num_tokens = 16"),
        (lambda d: d["layers"][0].__setitem__("text_tokens", -1), naming("$.layers[0].text_tokens", "0")),
        (lambda d: d["tokens"].pop("text_tokens"), r"\$\.tokens\.text_tokens: required by the joint layer 0"),
        (lambda d: d["summary"].__setitem__("attention_flops_fraction", 0.5), r"\$\.summary\.attention_flops_fraction"),
    ],
)
def test_inconsistent_joint_plans_name_the_field(mutate, field):
    doc = as_doc(joint_plan())
    mutate(doc)
    with pytest.raises(PlanError, match=field):
        decode_doc(doc)


def test_joint_layers_and_text_tokens_need_version_3():
    doc = as_doc(joint_plan(cfg_mode="batched"))
    doc["sampling"].pop("cfg_mode")
    doc["schema_version"] = 2
    with pytest.raises(PlanError, match=r"\$\.tokens\.text_tokens: needs schema_version 3 \(got 2\)"):
        decode_doc(doc)
    doc["tokens"].pop("text_tokens")
    with pytest.raises(PlanError, match=r"\$\.layers\[0\]\.kind: joint layers need schema_version 3 \(got 2\)"):
        decode_doc(doc)


def test_cfg_mode_needs_version_3():
    doc = as_doc(make_plan(schema_version=3))
    doc["sampling"]["cfg_mode"] = "batched"
    assert decode_doc(doc).sampling.cfg_mode == "batched"
    doc["schema_version"] = 2
    with pytest.raises(PlanError, match=r"\$\.sampling\.cfg_mode: needs schema_version 3 \(got 2\)"):
        decode_doc(doc)


def test_text_tokens_without_a_joint_layer_are_refused():
    doc = as_doc(make_plan(schema_version=3))
    doc["tokens"]["text_tokens"] = 4
    with pytest.raises(PlanError, match=r"\$\.tokens\.text_tokens: set, but no layer of \$\.layers is joint"):
        decode_doc(doc)


def test_sharing_is_refused_without_cfg():
    doc = as_doc(joint_plan([["full"] * 3, ["wars", "ast", "full"]], cfg_mode="none"))
    assert decode_doc(doc).sampling.cfg_mode == "none"
    doc["methods"][1][2] = "asc"
    with pytest.raises(PlanError, match=r"\$\.methods\[1\]\[2\]: 'asc' shares across CFG halves but sampling\.cfg is false"):
        decode_doc(doc)


def arrow_brute(inside, n: int, text: int) -> int:
    """Pairs of the joint sequence (image tokens first) that are text, or image pairs ``inside``."""
    return sum(1 for i in range(n + text) for j in range(n + text) if i >= n or j >= n or inside(i, j))


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 30), w=st.integers(0, 35), text=st.integers(0, 8))
def test_arrow_pairs_count_the_arrow(n, w, text):
    assert window_pairs(n, w, text) == arrow_brute(lambda i, j: abs(i - j) <= w, n, text)


def test_tiled_arrow_pairs_count_the_arrow():
    same_tile = lambda i, j: (i // 4 // 2, i % 4 // 2) == (j // 4 // 2, j % 4 // 2)  # noqa: E731
    assert window_pairs(16, Tiles2d((4, 4), (2, 2), 0), TEXT) == arrow_brute(same_tile, 16, TEXT)


def test_joint_layers_weigh_their_text():
    plan = joint_plan()
    joint, image = (16 + TEXT) ** 2, 16**2
    assert [layer_weight(x) for x in plan.layers] == [joint, image, joint]
    arrow, band = window_pairs(16, 3, TEXT) / joint, window_pairs(16, 3) / image
    kept = [joint + image + joint, joint * arrow + 0 + joint * arrow, joint * 0.5 + image * band / 2 + joint]
    assert plan.summary.attention_flops_fraction == pytest.approx(sum(kept) / (3 * (2 * joint + image)))
