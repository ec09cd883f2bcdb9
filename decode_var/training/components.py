"""The composition root: a param built into the parts of a run, once.

:func:`build` reads the (loaded, validated) param and assembles what training, evaluation and fitting
use: the backend, the model, its loss and task, the scale schedule (the model's own: an ablation that
predicts fewer scales gets targets and a loss for those, nothing in the param is patched), the
matcher, the frame scaling and the camera; the simulator is made on first use (fitting needs none).
The :class:`~decode_var.training.trainer.Trainer`, the
:class:`~decode_var.inference.predictor.Predictor` (and so ``decode-var-fit`` and ``decode-var-eval``)
and the benchmarks that train build their parts here, so that what trains is what fits.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from decode_var.backend import get_backend
from decode_var.core.errors import ParamError
from decode_var.backend.base import Backend
from decode_var.core.scales import ScaleSchedule
from decode_var.data.simulation import Camera, FrameScale
from decode_var.registry import build_model, get_loss
from decode_var.training.tasks import Task, is_scheduled, make_task, scale_factors

__all__ = ["Components", "build"]


@dataclass
class Components:
    """The parts of a run, built by :func:`build` from one param."""

    param: Any
    backend: Backend
    model: Any
    loss: Any
    task: Task
    schedule: ScaleSchedule  #: the scales the model predicts (``task.schedule``)
    matcher: Any
    frame_scale: FrameScale  #: frames in photons -> network input
    camera: Camera  #: ADU -> photons of ``Camera``
    _simulator: Optional[Any] = field(default=None, repr=False)

    @property
    def simulator(self):
        """The training-data simulator of the backend, made on first use."""
        if self._simulator is None:
            self._simulator = self.backend.simulator(self.param)
        return self._simulator


def build(param, model=None) -> Components:
    """The parts of a run from a loaded ``param`` (``model``: one already built, e.g. to load weights
    into; default: ``HyperParameter.architecture`` built from the param, drawing its initial weights
    from the global RNG as DECODE's models do)."""
    backend = get_backend(param.VAR.backend)
    maps = [k for k in ("offset_map", "gain_map", "read_var_map") if param.Camera.get(k) is not None]
    if maps and backend.name == "decode":  # VAR.backend: auto found DECODE, whose camera has no pixel maps
        raise ParamError(f"Camera.{maps[0]} is set, but VAR.backend resolved to decode (DECODE is installed), whose "
                         "camera simulates no per-pixel maps. Set VAR.backend: builtin to train with the maps.")
    model = build_model(param) if model is None else model
    loss_cls = get_loss(param.HyperParameter.loss_impl)
    # a scheduled loss (ours) is built for the model's own scales; DECODE's losses take the param alone
    loss = loss_cls.parse(param, factors=scale_factors(param, model)) if is_scheduled(loss_cls) \
        else loss_cls.parse(param)
    task = make_task(param, backend, model, loss)
    return Components(param=param, backend=backend, model=model, loss=loss, task=task, schedule=task.schedule,
                      matcher=backend.matcher(param), frame_scale=FrameScale.parse(param),
                      camera=Camera.parse(param))
