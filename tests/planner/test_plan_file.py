"""The plan a build produces: its facts, its file, and the calibration inputs."""

from __future__ import annotations

import hashlib
import os

import pytest

from planner.build import build_plan
from planner.calibration import CAPTIONS, CLASS_IDS, EVAL_CAPTIONS, EVAL_CLASS_IDS, read_prompts
from planner.errors import PlannerError
from planner.output import write_plan
from schemas import SCHEMA_VERSION, config_hash, decode_plan, encode_plan
from tests.planner.pipelines import CAPTIONS as TEST_CAPTIONS
from tests.planner.pipelines import request


@pytest.fixture(scope="module")
def pixart_plan(pixart):
    return build_plan(pixart, request(pixart, delta=0.9, seed=3)).plan


def test_plan_records_the_model_and_the_calibration(pixart, pixart_plan):
    plan, transformer = pixart_plan, pixart.transformer
    assert plan.schema_version == SCHEMA_VERSION
    assert plan.model.class_name == "PixArtTransformer2DModel"
    assert plan.model.config_hash == config_hash(dict(transformer.config))
    assert plan.model.num_layers == len(transformer.transformer_blocks)
    assert (plan.model.num_heads, plan.model.head_dim) == (2, 8)
    assert (plan.tokens.num_tokens, plan.tokens.height, plan.tokens.width) == (64, 8, 8)
    assert plan.window == 64 // 8
    assert plan.sampling.scheduler == type(pixart.scheduler).__name__
    sampling = plan.sampling
    assert (sampling.num_steps, sampling.cfg, sampling.cfg_order) == (4, True, "uncond_cond")
    assert plan.sampling.guidance_scale == 4.5
    calibration = plan.calibration
    assert (calibration.delta, calibration.metric, calibration.seed) == (0.9, "rel_l1", 3)
    assert calibration.num_prompts == len(TEST_CAPTIONS)
    assert calibration.prompts_hash == hashlib.sha256("\n".join(TEST_CAPTIONS).encode()).hexdigest()
    assert len(plan.losses) == plan.sampling.num_steps


def test_dit_plans_record_the_cond_null_batch_order(dit):
    plan = build_plan(dit, request(dit)).plan
    assert plan.sampling.cfg_order == "cond_uncond"
    assert plan.model.class_name == "DiTTransformer2DModel"


def test_written_plan_decodes_to_the_same_plan(pixart_plan, tmp_path):
    path = tmp_path / "plan.json"
    write_plan(pixart_plan, path)
    raw = path.read_bytes()
    assert decode_plan(raw) == pixart_plan
    assert encode_plan(decode_plan(raw)) == raw
    assert os.listdir(tmp_path) == ["plan.json"]


@pytest.mark.parametrize("error", [KeyboardInterrupt, OSError])
def test_failed_write_leaves_the_old_file_and_no_temporary(pixart_plan, tmp_path, monkeypatch, error):
    path = tmp_path / "plan.json"
    path.write_text("previous")

    def fail(*args):
        raise error()

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(KeyboardInterrupt if error is KeyboardInterrupt else PlannerError):
        write_plan(pixart_plan, path)
    assert path.read_text() == "previous"
    assert os.listdir(tmp_path) == ["plan.json"]


def test_builtin_calibration_sets_are_varied_and_held_out_sets_differ():
    assert len(CAPTIONS) >= 32 and len(set(CAPTIONS)) == len(CAPTIONS)
    assert len(EVAL_CAPTIONS) == len(set(EVAL_CAPTIONS))
    assert not set(CAPTIONS) & set(EVAL_CAPTIONS)
    assert len(CLASS_IDS) == 8 and len(set(CLASS_IDS)) == 8
    assert not set(CLASS_IDS) & set(EVAL_CLASS_IDS)
    assert all(0 <= c < 1000 for c in (*CLASS_IDS, *EVAL_CLASS_IDS))


def test_prompt_files_give_one_prompt_per_non_empty_line(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a cat\n\n  a dog  \nthe sky\n")
    assert read_prompts(path) == ["a cat", "a dog", "the sky"]
    path.write_text("\n \n")
    with pytest.raises(PlannerError, match="holds no prompt"):
        read_prompts(path)
