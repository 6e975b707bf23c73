"""ditfastattn runtime: load a plan and execute it on a diffusers DiT.

Imports torch, msgspec and ``schemas`` only.
"""

from runtime.apply import FastAttnHandle, apply
from runtime.loading import PLAN_FILENAME, load_plan
from runtime.recording import Recorder
from runtime.state import RunStats
from schemas import Plan, PlanError

__all__ = ["PLAN_FILENAME", "FastAttnHandle", "Plan", "PlanError", "Recorder", "RunStats", "apply", "load_plan"]
