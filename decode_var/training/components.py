"""The composition root: a param built into the parts of a run, once.

:func:`build` reads the (loaded, validated) param and assembles what training, evaluation and fitting
use: the backend, the model, its loss and task, the scale schedule (the model's own: an ablation that
predicts fewer scales gets targets and a loss for those, nothing in the param is patched), the
matcher, the frame scaling and the camera; the simulator is made on first use (fitting needs none).
Each part is made by its own ``parse(param)`` (DECODE's convention, so that DECODE's way of building a
part still works) and reads its keys there, once; the settings that are no component are parsed into
typed parts here too: :class:`~decode_var.training.schedules.TrainSettings` (how to train),
:class:`~decode_var.evaluation.protocol.Protocol` (the test set and its scoring, with the CRLB),
:class:`~decode_var.data.simulation.FrameSettings` (the frames and the trained volume) and the camera the
model card records. Below this root nothing reads the raw param: it is kept only to be written back
(``param_run.yaml``, checkpoints) and to make simulators.
The :class:`~decode_var.training.trainer.Trainer`, the
:class:`~decode_var.inference.predictor.Predictor` (and so ``decode-var-fit`` and ``decode-var-eval``)
and the benchmarks that train build their parts here, so that what trains is what fits.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from decode_var.backend import get_backend
from decode_var.core.errors import ParamError
from decode_var.backend.base import Backend
from decode_var.core.scales import ScaleSchedule
from decode_var.data.simulation import Camera, FrameScale, FrameSettings
from decode_var.evaluation.model_card import camera_of
from decode_var.evaluation.protocol import Protocol
from decode_var.registry import build_model, get_loss
from decode_var.training.schedules import TrainSettings
from decode_var.training.tasks import Task, is_scheduled, make_task, scale_factors

__all__ = ["Components", "build"]


@dataclass
class Components:
    """The parts of a run, built by :func:`build` from one param."""

    param: Any  #: the loaded param: written back with the model and made into simulators here, read nowhere else
    backend: Backend
    model: Any
    loss: Any
    task: Task
    schedule: ScaleSchedule  #: the scales the model predicts (``task.schedule``)
    matcher: Any
    frame_scale: FrameScale  #: frames in photons -> network input
    camera: Camera  #: ADU -> photons of ``Camera``
    settings: TrainSettings  #: how to train
    protocol: Protocol  #: the test set and its scoring
    frames: FrameSettings  #: the frames' units, window and pixel size, the trained z range
    camera_record: dict  #: the ``Camera`` values the model card records
    _simulator: Optional[Any] = field(default=None, repr=False)

    @property
    def simulator(self):
        """The training-data simulator of the backend, made on first use."""
        if self._simulator is None:
            self._simulator = self.backend.simulator(self.param)
        return self._simulator

    @property
    def density_ends(self) -> list:
        """Emitters per training frame at both ends of ``Simulation.emitter_av`` (a range), or its one value."""
        av = self.param.Simulation.emitter_av
        return sorted({float(a) for a in av}) if isinstance(av, (list, tuple)) else [float(av)]

    def simulator_at(self, emitter_av: float):
        """The backend's simulator with ``Simulation.emitter_av`` set to ``emitter_av`` (a held-out set at one
        density), made anew."""
        param = copy.deepcopy(self.param)
        param.Simulation.emitter_av = emitter_av
        return self.backend.simulator(param)


def build(param, model=None, seed_weights: bool = False) -> Components:
    """The parts of a run from a loaded ``param`` (``model``: one already built, e.g. to load weights
    into; default: ``HyperParameter.architecture`` built from the param, drawing its initial weights
    from the global RNG as DECODE's models do, seeded first with ``VAR.seed`` where ``seed_weights``)."""
    settings = TrainSettings.parse(param)
    if seed_weights:
        torch.manual_seed(settings.seed)
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
                      camera=Camera.parse(param), settings=settings, protocol=Protocol.parse(param),
                      frames=FrameSettings.parse(param), camera_record=camera_of(param))
