"""Build settings: validation messages name the rejected value, TOML and options merge."""

from __future__ import annotations

import pytest

from planner.errors import PlannerError
from planner.settings import load_settings

BASE = {"model": "dit", "delta": 0.9, "output": "plan.json"}


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"delta": 1.01}, "delta: input should be less than or equal to 1 (got 1.01)"),
        ({"steps": 0}, "steps: input should be greater than or equal to 1 (got 0)"),
        ({"window_frac": 0}, "window_frac: input should be greater than 0 (got 0)"),
        ({"resolution": 512, "height": 512}, "resolution: give --resolution or --height/--width"),
        ({"window": 8, "window_frac": 0.1}, "window: give --window or --window-frac"),
        ({"classes": "1,-3"}, "classes: class ids must be >= 0"),
        ({"dtype": "float8"}, "dtype: input should be 'auto', 'float32', 'float16' or 'bfloat16'"),
        ({"model": None}, "model: required (give --model or set it in the config file)"),
    ],
)
def test_rejected_settings_name_the_value(changes, message):
    with pytest.raises(PlannerError) as caught:
        load_settings({**BASE, **changes})
    assert str(caught.value).startswith(message)
    assert "\n" not in str(caught.value)
    assert caught.value.exit_code == 2


def test_options_override_the_config_file(tmp_path):
    config = tmp_path / "build.toml"
    config.write_text('model = "pixart"\ndelta = 0.95\nwindow-frac = 0.25\nclasses = [1, 2]\n')
    options = {"delta": 0.8, "steps": None, "classes": "4, 5", "output": "plan.json"}
    settings = load_settings(options, config)
    assert (settings.model, settings.delta, settings.window_frac) == ("pixart", 0.8, 0.25)
    assert settings.classes == [4, 5] and settings.steps is None


def test_unreadable_or_invalid_config_is_refused(tmp_path):
    with pytest.raises(PlannerError, match="config: cannot read"):
        load_settings(BASE, tmp_path / "missing.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("delta = = 1")
    with pytest.raises(PlannerError, match="is not valid TOML"):
        load_settings(BASE, broken)
