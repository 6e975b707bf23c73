"""Each mismatch between a plan and the model raises PlanError naming the field."""

from __future__ import annotations

import copy
import subprocess
import sys
from types import SimpleNamespace

import msgspec
import pytest
import torch

import runtime
from schemas import PlanError, encode_plan
from tests.plans import all_full, plan_for
from tests.runtime.conftest import float64_model, generate_dit, generate_pixart, run_steps, step_inputs
from tests.tiny import tiny_dit_transformer, tiny_pixart_transformer

SHARED = [["full"] * 3, ["asc", "wars_asc", "wars"]]


def test_layer_count_mismatch():
    plan = plan_for(tiny_pixart_transformer(layers=3), all_full(2, 3))
    with pytest.raises(PlanError, match=r"\$\.model\.num_layers: plan has 3, model has 2"):
        runtime.apply(plan, tiny_pixart_transformer(layers=2))


def test_heads_and_head_dim_mismatch():
    model = float64_model("pixart")
    plan = plan_for(model, all_full(2, 3))
    bad_heads = msgspec.structs.replace(plan, model=msgspec.structs.replace(plan.model, num_heads=4))
    with pytest.raises(PlanError, match=r"\$\.model\.num_heads"):
        runtime.apply(bad_heads, model)
    bad_dim = msgspec.structs.replace(plan, model=msgspec.structs.replace(plan.model, head_dim=4))
    with pytest.raises(PlanError, match=r"\$\.model\.head_dim"):
        runtime.apply(bad_dim, model)


def test_other_model_config_is_refused_unless_not_strict():
    plan = plan_for(tiny_dit_transformer(sample_size=8), all_full(2, 3), cfg_order="cond_uncond")
    other = tiny_dit_transformer(sample_size=16)
    with pytest.raises(PlanError, match=r"\$\.model\.config_hash"):
        runtime.apply(plan, other)
    runtime.apply(plan, other, strict=False).remove()
    with pytest.raises(PlanError, match=r"\$\.model\.class_name"):
        runtime.apply(plan, float64_model("pixart"), strict=True)


def test_token_count_mismatch(pixart_pipe):
    plan = plan_for(pixart_pipe.transformer, all_full(4, 3))
    with runtime.apply(plan, pixart_pipe), pytest.raises(
        PlanError, match=r"\$\.tokens\.num_tokens: plan has 64 tokens, layer 0 runs 256"
    ):
        generate_pixart(pixart_pipe, height=16, width=16)


def test_step_count_mismatch(dit_pipe):
    plan = plan_for(dit_pipe.transformer, all_full(4, 3), cfg_order="cond_uncond")
    with runtime.apply(plan, dit_pipe), pytest.raises(
        PlanError, match=r"\$\.sampling\.num_steps: plan has 4 steps, the pipeline runs 6"
    ):
        generate_dit(dit_pipe, steps=6)


def test_cfg_plan_on_a_run_without_cfg(dit_pipe):
    plan = plan_for(dit_pipe.transformer, SHARED + [["full"] * 3] * 2, cfg_order="cond_uncond")
    with runtime.apply(plan, dit_pipe), pytest.raises(PlanError, match=r"\$\.sampling\.cfg"):
        generate_dit(dit_pipe, guidance=1.0)


def test_plan_without_cfg_on_a_cfg_run():
    model = float64_model("pixart")
    plan = plan_for(model, [["full"] * 3, ["wars"] * 3], cfg=False)
    with runtime.apply(plan, model), pytest.raises(PlanError, match=r"\$\.sampling\.cfg"):
        run_steps(model, "pixart", 1, cfg=True)


def test_sharing_without_cfg_is_refused_at_decode():
    model = float64_model("pixart")
    plan = plan_for(model, [["full"] * 3, ["wars"] * 3], cfg=False)
    raw = encode_plan(plan).replace(b'"wars","wars"', b'"wars","asc"')
    with pytest.raises(PlanError, match=r"\$\.methods\[1\]\[1\]: 'asc' .* sampling.cfg is false"):
        runtime.load_plan(raw)


def test_batch_order_mismatch_on_pipeline(dit_pipe):
    plan = plan_for(dit_pipe.transformer, SHARED, cfg_order="uncond_cond")
    with pytest.raises(PlanError, match=r"\$\.sampling\.cfg_order: plan says 'uncond_cond', DiTPipeline"):
        runtime.apply(plan, dit_pipe)


@pytest.mark.parametrize(
    "kind, wrong, name",
    [("dit", "uncond_cond", "DiTTransformer2DModel"), ("pixart", "cond_uncond", "PixArtTransformer2DModel")],
)
def test_batch_order_mismatch_on_bare_transformer(kind, wrong, name):
    model = float64_model(kind)
    with pytest.raises(PlanError, match=rf"\$\.sampling\.cfg_order: plan says '{wrong}', {name} batches"):
        runtime.apply(plan_for(model, SHARED, cfg_order=wrong), model)


def test_batch_order_of_an_unknown_pipeline_comes_from_its_transformer():
    model = float64_model("dit")
    pipe = SimpleNamespace(transformer=model)
    with pytest.raises(PlanError, match=r"\$\.sampling\.cfg_order: .* DiTTransformer2DModel"):
        runtime.apply(plan_for(model, SHARED, cfg_order="uncond_cond"), pipe)
    runtime.apply(plan_for(model, SHARED, cfg_order="cond_uncond"), pipe).remove()


def test_a_known_pipeline_order_wins_over_the_transformer_class():
    model = float64_model("dit")
    pipe = type("PixArtSigmaPipeline", (SimpleNamespace,), {})(transformer=model)
    runtime.apply(plan_for(model, SHARED, cfg_order="uncond_cond"), pipe).remove()
    with pytest.raises(PlanError, match=r"\$\.sampling\.cfg_order: .* PixArtSigmaPipeline"):
        runtime.apply(plan_for(model, SHARED, cfg_order="cond_uncond"), pipe)


def test_batch_order_mismatch_at_run_time_on_an_unlisted_dit_class():
    model = copy.deepcopy(float64_model("dit"))
    model.__class__ = type("MyDiT", (type(model),), {})  # not in TRANSFORMER_CFG_ORDER
    plan = plan_for(model, SHARED, cfg_order="uncond_cond")
    with runtime.apply(plan, model), pytest.raises(PlanError, match=r"cfg_order: .* class labels"):
        run_steps(model, "dit", 1, order="cond_uncond")


@pytest.mark.parametrize("plan, got", [("plan.json", "str"), (b"{}", "bytes"), (None, "NoneType")])
def test_apply_needs_a_plan_object(plan, got):
    model = float64_model("pixart")
    message = rf"^plan: expected a Plan \(use runtime\.load_plan\(path\) first\), got {got}$"
    with pytest.raises(TypeError, match=message):
        runtime.apply(plan, model)


@pytest.mark.parametrize("source, got", [(None, "NoneType"), (3, "int"), ({}, "dict")])
def test_load_plan_refuses_other_types(source, got):
    with pytest.raises(TypeError, match=rf"^source: expected a path, bytes or Plan, got {got}$"):
        runtime.load_plan(source)


@pytest.mark.parametrize("raw", [b"[" * 100000, b'{"a":' * 50000], ids=["arrays", "objects"])
def test_deeply_nested_json_is_a_plan_error(raw):
    with pytest.raises(PlanError):
        runtime.load_plan(raw)


def test_unknown_kernel_is_refused():
    model = float64_model("dit")
    with pytest.raises(ValueError, match="kernel"):
        runtime.apply(plan_for(model, all_full(2, 3), cfg_order="cond_uncond"), model, kernel="flash")


def test_load_plan_from_path_bytes_and_model_folder(tmp_path):
    plan = plan_for(float64_model("pixart"), SHARED)
    raw = encode_plan(plan)
    (tmp_path / "p.json").write_bytes(raw)
    (tmp_path / runtime.PLAN_FILENAME).write_bytes(raw)
    assert runtime.load_plan(tmp_path / "p.json") == plan
    assert runtime.load_plan(str(tmp_path)) == plan
    assert runtime.load_plan(raw) == plan
    with pytest.raises(PlanError, match="cannot read plan"):
        runtime.load_plan(tmp_path / "missing.json")


def test_import_runtime_loads_no_planner_side_module():
    code = (
        "import sys, runtime\n"
        "bad = [m for m in ('planner', 'pydantic', 'typer', 'rich', 'diffusers', 'transformers', 'cli')"
        " if m in sys.modules]\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
