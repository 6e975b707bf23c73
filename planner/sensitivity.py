"""How far an error of the transformer's output at each step moves the final result.

The greedy rule bounds each step's output error; the same error moves the final image
more at some steps than at others. ``step_weights`` measures that once per profile: the
calibration batch is generated once, all ``full``, recording every transformer output;
then, for each step ``t ≥ 1``, once more with the earlier calls replayed from the record
(no compute), the output of step ``t`` moved by ``δ_t = scale × (ε_{t-1} − ε_t)`` (the
direction a reused output errs in), and the later steps computed. With ``ΔX_t`` the change
of the pipeline's output, the step's weight is ``||ΔX_t|| / ||δ_t|| × ||ε_t||``: the final
change per unit of *relative* output error, the unit of the search's losses; the weights
are divided by their mean over steps ``1 …``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from diffusers.models.modeling_outputs import Transformer2DModelOutput

from planner.build import BuildRequest, generation_kwargs, request_family

DEFAULT_SCALE = 0.05


def _sample(output: Any) -> torch.Tensor:
    return output.sample if hasattr(output, "sample") else output[0]


def _with_sample(output: Any, sample: torch.Tensor) -> Any:
    if hasattr(output, "sample"):
        return Transformer2DModelOutput(sample=sample)
    return (sample, *output[1:])


class _Calls:
    """Stands in for the transformer's forward: records, replays and perturbs its outputs by call."""

    def __init__(self, transformer: torch.nn.Module) -> None:
        self.transformer = transformer
        self.original = transformer.forward
        self.record: list[torch.Tensor] = []
        self.replay = 0  # calls before this index return the record
        self.perturb: dict[int, torch.Tensor] = {}  # call index -> what to add to its output
        self.count = 0

    @contextmanager
    def attached(self) -> Iterator[None]:
        self.transformer.forward = self
        try:
            yield
        finally:
            del self.transformer.forward

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        index, self.count = self.count, self.count + 1
        if index < self.replay:
            sample = self.record[index]
            return Transformer2DModelOutput(sample=sample) if kwargs.get("return_dict", True) else (sample,)
        output = self.original(*args, **kwargs)
        sample = _sample(output)
        if len(self.record) <= index:
            self.record.append(sample.detach().clone())
        if index in self.perturb:
            output = _with_sample(output, sample + self.perturb[index])
        return output


def _norm(tensors: list[torch.Tensor]) -> float:
    return sum(float(x.double().pow(2).sum()) for x in tensors) ** 0.5


def step_weights(
    pipe: Any,
    request: BuildRequest,
    *,
    scale: float = DEFAULT_SCALE,
    progress: Callable[[int, int], None] | None = None,
) -> list[float | None]:
    """Each step's weight (``None`` at step 0, which always runs ``full``); see the module doc.

    ``progress(done, total)`` follows the perturbed generations.
    """
    kwargs = generation_kwargs(pipe, request)
    family = request_family(pipe, request)
    per_step = 2 if family.cfg == "separate" and family.runs_cfg(request.guidance) else 1
    calls = _Calls(pipe.transformer)
    with calls.attached(), torch.inference_mode():
        reference = _final(pipe, dict(kwargs, generator=torch.Generator("cpu").manual_seed(request.seed)))
        steps = len(calls.record) // per_step
        raw: list[float | None] = [None]
        for t in range(1, steps):
            mine = range(t * per_step, (t + 1) * per_step)
            deltas = {c: scale * (calls.record[c - per_step] - calls.record[c]) for c in mine}
            calls.replay, calls.perturb, calls.count = mine.start, deltas, 0
            moved = _final(pipe, dict(kwargs, generator=torch.Generator("cpu").manual_seed(request.seed)))
            size = _norm(list(deltas.values()))
            change = _norm([moved.double() - reference.double()])
            raw.append(change / size * _norm([calls.record[c] for c in mine]) if size else None)
            if progress is not None:
                progress(t, steps - 1)
    measured = [w for w in raw[1:] if w is not None]
    mean = sum(measured) / len(measured) if measured else 0.0
    return [None if w is None or not mean else w / mean for w in raw]


def _final(pipe: Any, kwargs: dict[str, Any]) -> torch.Tensor:
    output = pipe(**kwargs)
    return output.frames if hasattr(output, "frames") else output.images
