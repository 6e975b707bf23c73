"""The compiler's new candidates and objective on hand-made profiles: ``forecast`` and step weights."""

from __future__ import annotations

import msgspec
import pytest

from planner.compile import Compiler, Predictor, compile_plan
from schemas import ProfileError, decode_profile, encode_profile, forecast_pairs
from tests.schemas.test_profile import sized_profile

STEPS, LAYERS, LAGS = 6, 2, 3
GAIN = 0.1  # probe loss / lag-1 ast distance everywhere


def profile(*, ast: float = 0.5, forecast: dict[tuple[int, int], float] | None = None, weights=None, cfg=False):
    """``ast`` distance at every lag, ``forecast`` distance per lag pair (default 0.4), no window candidates."""
    pairs = forecast_pairs(LAGS)
    forecast = forecast or {}
    def lags(value):
        return [[[value if k <= t else None for k in range(1, LAGS + 1)] for _ in range(LAYERS)] for t in range(STEPS)]

    return sized_profile(
        cfg, LAYERS, STEPS, LAGS,
        ast=lags(ast),
        wars=lags(50.0),  # never fits
        wars_after_asc=lags(50.0) if cfg else None,
        wars_asc=lags(50.0) if cfg else None,
        asc=[[50.0] * LAYERS for _ in range(STEPS)] if cfg else None,
        output_norm=[[1.0] * LAYERS for _ in range(STEPS)],
        loss={"ast": [[None if t == 0 else GAIN * ast] * LAYERS for t in range(STEPS)]},
        forecast=[
            [[forecast.get(pair, 0.4) if pair[1] <= t else None for pair in pairs] for _ in range(LAYERS)]
            for t in range(STEPS)
        ],
        step_weight=weights,
    )  # fmt: skip


def test_profiles_with_forecasts_and_weights_round_trip_and_are_checked():
    p = profile(weights=[None, 1.0, 2.0, 0.5, 1.5, 1.0])
    assert decode_profile(encode_profile(p)) == p
    short = msgspec.structs.replace(p, measurements=msgspec.structs.replace(p.measurements, step_weight=[None, 1.0]))
    with pytest.raises(ProfileError, match=r"\$\.measurements\.step_weight: has 2 steps"):
        encode_profile(short)
    early = msgspec.structs.replace(p.measurements, forecast=[[[0.1] * 3] * LAYERS] * STEPS)
    with pytest.raises(ProfileError, match=r"\$\.measurements\.forecast\[0\]\[0\]\[0\]: must be null, no step -2"):
        encode_profile(msgspec.structs.replace(p, measurements=early))
    old = msgspec.structs.replace(p, schema_version=3)
    with pytest.raises(ProfileError, match=r"\$\.measurements\.forecast: needs schema_version 4"):
        encode_profile(old)


def test_forecast_is_kept_where_it_predicts_less_than_ast():
    # per layer-step ast predicts 0.05, a forecast from the last two steps 0.02, from older pairs
    # 0.04; layer 0's budget is 0.03
    plan = compile_plan(profile(ast=0.5, forecast={(1, 2): 0.2}), 0.94, objective="flops")
    assert [row[0] for row in plan.methods] == [
        "full",
        "full",  # one computed step: nothing to forecast from, and ast does not fit
        "forecast",  # from steps 1 and 0
        "full",  # the pair would be steps 1 and 0: lags (2, 3)
        "full",  # steps 3 and 1: lags (1, 3)
        "forecast",  # steps 4 and 3
    ]
    assert plan.losses[2][0] == pytest.approx(0.02)


def test_ast_is_kept_where_forecast_predicts_more():
    plan = compile_plan(profile(ast=0.5, forecast={pair: 0.9 for pair in forecast_pairs(LAGS)}), 0.5, objective="flops")
    assert "forecast" not in {m for row in plan.methods for m in row}
    assert "ast" in {m for row in plan.methods for m in row}


def test_forecast_reads_the_pair_of_the_layer_s_last_two_computed_steps():
    p = profile(ast=5.0, forecast={(1, 2): 0.3, (1, 3): 0.6, (2, 3): 0.45})
    predictor = Predictor(p)
    assert predictor.forecast_loss(4, 0, 3, 2) == pytest.approx(GAIN * 5.0 / 5.0 * 0.3)
    assert predictor.forecast_loss(4, 0, 3, 1) == pytest.approx(GAIN * 0.6)
    assert predictor.forecast_loss(4, 0, 2, 1) == pytest.approx(GAIN * 0.45)
    assert predictor.forecast_loss(5, 0, 4, 1) is None  # lag 4 is beyond the profile's 3


def test_without_forecast_measures_the_candidate_is_not_offered():
    p = profile()
    bare = msgspec.structs.replace(p, measurements=msgspec.structs.replace(p.measurements, forecast=None))
    assert "forecast" not in Predictor(bare).candidates
    assert "forecast" in Predictor(p).candidates


def test_step_weights_share_the_budget_by_each_step_s_effect_on_the_result():
    weights = [None, 4.0, 0.25, 0.25, 4.0, 0.25]
    p = profile(ast=0.5, weights=weights)
    delta = 1 - 2 * GAIN * 0.5 / 1.5  # unweighted: one layer-step of ast fits at every step
    plain = Compiler(p, objective="flops").plan(delta)
    weighted = Compiler(p, weighted=True, objective="flops").plan(delta)
    assert weighted.calibration.search == "profile-weighted"
    assert plain.calibration.search == "profile"
    for t in (1, 4):  # weight 4: a quarter of the budget, no reuse fits
        assert weighted.methods[t] == ["full", "full"]
    for t in (2, 3, 5):  # weight 1/4: four times the budget
        assert plain.methods[t] != ["ast", "ast"]
        assert weighted.methods[t] == ["ast", "ast"] or "forecast" in weighted.methods[t]
    for t, row in enumerate(weighted.losses[1:], start=1):
        for i, loss in enumerate(row):
            assert loss <= (i + 1) / LAYERS * (1 - delta) / weights[t] * (1 + 1e-12)
