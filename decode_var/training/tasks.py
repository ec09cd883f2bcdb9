"""Tasks: what the trainer asks of a (model, loss) pair, so that its loop has no type probes.

- :class:`SixChannelTask`: models with 6-channel ``[p, phot, x, y, z, bg]`` maps on one or more
  scales (VARMultiScale) and the 6-channel losses (AdaptivePPXYZB, PPXYZB, DECODE's PPXYZBLoss);
  targets and weights from the backend's generators on every scale.
- :class:`GMMTask`: DECODE's parameter-list models (SigmaMUNet + GaussianMMLoss), with DECODE's
  target and output chain from :meth:`decode_var.backend.base.Backend.gmm_chain`.

A loss class chooses its task with a class attribute ``task`` (``"six_channel"``, the default, or
``"gmm"``). The rest is asked of capabilities, never of types, each with the default of a model or loss
that lacks it (DECODE's, a plugin's): a model with ``progressive`` (:func:`is_progressive`),
``predicted_factors()`` (:func:`scale_factors`) and ``uncertainty`` (:func:`predicts_sigma`); a loss with
``scheduled`` (:func:`is_scheduled`).
Units: ``physical_output`` returns photons, px offsets from the cell centre, nm and
photons / px; everything the model sees or returns inside a step is in network units (see
:class:`decode_var.data.targets.TargetRescale`).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Optional

import torch

from decode_var.core.channels import CHANNELS
from decode_var.core.scales import ScaleSchedule
from decode_var.data.targets import MultiScaleTargets, TargetRescale
from decode_var.evaluation import postprocessing
from decode_var.nn.loss import unit_weight_loss
from decode_var.nn.model import SIGMA_CHANNELS


def is_progressive(model) -> bool:
    """``model.progressive`` (:class:`~decode_var.nn.model.VARMultiScale`): in training its forward takes
    ``targets`` and ``n_active`` and returns one raw map per active scale, coarse to fine, and it has
    ``set_epoch(epoch)``, a ``teacher_forcing`` probability and ``seed_coins(seed)``. Without it (DECODE's
    models, a plugin's) the model is called as DECODE calls it, ``model(frames)``."""
    return bool(getattr(model, "progressive", False))


def predicts_sigma(model) -> bool:
    """``model.uncertainty`` (:class:`~decode_var.nn.model.VARMultiScale` with ``VAR.model.uncertainty``): its
    finest map has 10 channels, ``[p, phot, x, y, z, bg]`` then the standard deviations of phot, x, y, z
    (:data:`~decode_var.nn.model.SIGMA_CHANNELS`), in the network units of the values."""
    return bool(getattr(model, "uncertainty", False))


def is_scheduled(loss) -> bool:
    """``loss.scheduled`` (:class:`~decode_var.nn.loss.PPXYZBLoss`): scale and channel weights with an epoch
    state: ``set_epoch``, ``active_scales``, ``update_epoch``, ``channel_weights``, ``scale_weights``,
    ``state_dict`` / ``load_state_dict`` and ``nonfinite_report(output, target, weight)``. Without it
    (DECODE's losses) the loss is DECODE's ``forward`` + ``log`` and nothing else."""
    return bool(getattr(loss, "scheduled", False))


class Task(ABC):
    """Data, forward, loss bookkeeping and post-processing of one kind of model.

    Attributes:
        model: the network (the trainer's optimiser holds its parameters).
        loss: the loss object (its state goes into checkpoints, :meth:`loss_state`).
    """

    #: Capability: the task's physical output carries a predicted sigma per localization (``x_sig`` ...).
    sigma = False

    def __init__(self, param, backend, model, loss):
        """Built by the composition root (:func:`decode_var.training.components.build`), which hands over the
        param: a task parses what it needs of it here and keeps none of it."""
        self.backend, self.model, self.loss = backend, model, loss

    # data and forward -------------------------------------------------------------------------
    @abstractmethod
    def make_targets(self, batch, n: int):
        """Targets (and weights) of a simulated batch, on the CPU, in network units."""

    @abstractmethod
    def train_forward(self, frames, tgt, model=None):
        """(per-element loss, raw output) of a training step; ``model``: a wrapper of :attr:`model`
        (DDP) to call instead."""

    def physical_output(self, frames) -> torch.Tensor:
        """Eval output in physical units (what the post-processing reads)."""
        return self.to_physical(self.model(frames))

    @abstractmethod
    def to_physical(self, out) -> torch.Tensor:
        """The model's eval output (network units) -> physical units. The trainer's evaluation and the
        :class:`~decode_var.inference.predictor.Predictor` share it: what trains also fits."""

    @abstractmethod
    def postprocess(self, out_phys):
        """EmitterSet of a physical output on the training frames, or None without post-processing."""

    @abstractmethod
    def postprocessor(self, grid):
        """The post-processing of physical outputs on ``grid`` (the finest output :class:`Scale` over a
        frame of any size, :meth:`Predictor.output_grid`): an object with ``forward(out_phys) ->
        EmitterSet``, or None when the param has none."""

    def fixed_loss(self, out_phys, tgt) -> Optional[torch.Tensor]:
        """Per-sample loss of a definition that does not change during the run; None: the test loss
        itself keeps its definition."""
        return None

    def nonfinite_report(self, out, tgt) -> list[str]:
        """Where non-finite values are, one line each (after a non-finite loss)."""
        bad = (~torch.isfinite(out)).flatten(2).sum(-1).sum(0).tolist()
        return [f"output channel {c}: {int(n)} non-finite elements" for c, n in enumerate(bad) if n]

    def log(self, loss_val) -> tuple[float, dict]:
        """(total, components) of a per-element loss (DECODE's ``Loss.log``)."""
        return self.loss.log(loss_val)

    # epochs -----------------------------------------------------------------------------------
    def start_epoch(self, epoch: int) -> float:
        """Set the epoch's schedules; returns the teacher-forcing probability (0 without one)."""
        return 0.0

    def seed_step(self, seed: int) -> None:
        """Seed the model's own random streams for a step (exact resume)."""

    @property
    def active_scales(self) -> Optional[int]:
        """Scales the loss trains this epoch (None: the model's only output)."""
        return None

    def end_epoch(self, train_components: Optional[dict]) -> tuple[list, list]:
        """Epoch-end update of adaptive weights from the epoch's mean channel losses (None: no good step,
        no update); returns (channel weights, scale weights) for the log."""
        return [], []

    def loss_state(self) -> dict:
        return {}

    def load_loss_state(self, state: dict) -> None:
        """Restore :meth:`loss_state` (nothing to restore by default)."""

    def test_loss_mode(self):
        """Context of the test loss: teacher forcing off (the model conditions on its own predictions)."""
        return _TeacherForcingOff(self.model if is_progressive(self.model) else None)


class SixChannelTask(Task):
    """6-channel models (VARMultiScale + AdaptivePPXYZB, ...): targets and weights on every scale; with
    :func:`predicts_sigma`, 4 standard deviations after the 6 channels of the finest map, carried into the
    localizations' ``phot_sig`` and ``xyz_sig``."""

    def __init__(self, param, backend, model, loss):
        super().__init__(param, backend, model, loss)
        self.schedule = ScaleSchedule.parse(param, scale_factors(param, model))  # the model's own scales
        self.targets = MultiScaleTargets.parse(param, backend, self.schedule)
        self.rescale = TargetRescale.parse(param)
        self.post_settings = postprocessing.PostSettings.parse(param)
        self.progressive = is_progressive(model)  # teacher forcing, coins, scale outputs
        self.scheduled = is_scheduled(loss)  # scale and channel weights with a state
        self.sigma = predicts_sigma(model)  # 10-channel finest map
        self.post = self.postprocessor(self.schedule.finest)

    def make_targets(self, batch, n):
        return self.targets(batch.em, batch.bg_NHW, n)

    def train_forward(self, frames, tgt, model=None):
        targets, weights = tgt
        if self.progressive:
            n_active = self.active_scales
            out = (model or self.model)(frames, targets=targets[:n_active], n_active=n_active)
        else:  # as DECODE calls a model: frames only
            out = (model or self.model)(frames)
        return self.loss(out, targets, weights), out

    def to_physical(self, out) -> torch.Tensor:
        """Finest-scale output in photons, px offsets, nm, photons / px (p in 0..1); standard deviations
        (channels 6..9, with :func:`predicts_sigma`) in photons, px, px, nm."""
        cell = self.schedule.finest.cell_size
        out = out.float()
        if out.size(1) == 6:
            return self.rescale.inverse(out, cell)
        return torch.cat([self.rescale.inverse(out[:, :6], cell), out[:, 6:] * self._sigma_scale(cell, out)], 1)

    def _sigma_scale(self, cell_size, like: torch.Tensor) -> torch.Tensor:
        """(1, 4, 1, 1) network -> physical units of the standard deviations of phot, x, y, z (those of the values,
        :class:`~decode_var.data.targets.TargetRescale`, without an offset)."""
        r = self.rescale
        return torch.tensor([r.phot_max, cell_size[0], cell_size[1], r.z_max], device=like.device,
                            dtype=like.dtype)[None, :, None, None]

    def fixed_loss(self, out_phys_N6HW, tgt) -> torch.Tensor:
        """Per-sample loss ``(N,)`` of the finest scale with unit channel weights, from the eval output of
        :meth:`physical_output` (its 6 channels): a definition that does not change during the run."""
        targets, weights = tgt
        out_N6HW = self.rescale.forward(out_phys_N6HW[:, :6], self.schedule.finest.cell_size)
        return unit_weight_loss(out_N6HW, targets[-1], weights[-1])

    def postprocess(self, out_phys):
        return self.post.forward(out_phys) if self.post is not None else None

    def postprocessor(self, grid):
        """The backend's post-processing; with :func:`predicts_sigma` decode-var's own (DECODE's as the decode
        backend builds it reads no sigma channels; on the 1x grid the two agree bit for bit), reading the
        standard deviations into ``phot_sig`` and ``xyz_sig``."""
        if not self.sigma:
            return self.backend.post_processing(self.post_settings, grid)
        post = postprocessing.build(self.post_settings, grid)
        if post is not None:
            post.photxyz_sigma_mapping = SIGMA_CHANNELS
        return post

    def nonfinite_report(self, out, tgt):
        if not self.scheduled:
            return super().nonfinite_report(out, tgt)
        n = len(out) if isinstance(out, (list, tuple)) else 1  # scales computed
        return self.loss.nonfinite_report(out, tgt[0][:n], tgt[1][:n])

    def start_epoch(self, epoch: int) -> float:
        if self.scheduled:
            self.loss.set_epoch(epoch)
        if not self.progressive:
            return 0.0
        self.model.set_epoch(epoch)
        return self.model.teacher_forcing

    def seed_step(self, seed: int) -> None:
        if self.progressive:
            self.model.seed_coins(seed)

    @property
    def active_scales(self) -> Optional[int]:
        return self.loss.active_scales if self.scheduled else None

    def end_epoch(self, train_components: Optional[dict]) -> tuple[list, list]:
        if not self.scheduled:
            return [], []
        if train_components is not None:
            self.loss.update_epoch(train_components)
        return [float(w) for w in self.loss.channel_weights], [float(w) for w in self.loss.scale_weights]

    def loss_state(self) -> dict:
        return self.loss.state_dict() if self.scheduled else {}

    def load_loss_state(self, state: dict) -> None:
        if self.scheduled and state:
            self.loss.load_state_dict(state)


class GMMTask(Task):
    """DECODE's SigmaMUNet + GaussianMMLoss, with DECODE's parameter-list targets and output chain."""

    sigma = True  # SigmaMUNet's sigmas

    def __init__(self, param, backend, model, loss):
        super().__init__(param, backend, model, loss)
        self.chain = backend.gmm_chain(param)
        sim = param.Simulation
        ext = sim.psf_extent or (None, None)
        #: one output on the input frame's pixel grid
        self.schedule = ScaleSchedule(sim.img_size, [1.0], xextent=ext[0], yextent=ext[1])

    def make_targets(self, batch, n):
        return self.chain.targets(batch, n)

    def train_forward(self, frames, tgt, model=None):
        out = (model or self.model)(frames)
        return self.loss(out, tgt, None), out

    def to_physical(self, out):
        return self.chain.inverse(out)

    def postprocess(self, out_phys):
        return self.chain.postprocess(out_phys)

    def postprocessor(self, grid):
        return self.chain.postprocessor(grid)


TASKS = {"six_channel": SixChannelTask, "gmm": GMMTask}


def make_task(param, backend, model, loss) -> Task:
    """The task the loss class asks for (``task`` class attribute; six-channel by default)."""
    return TASKS[getattr(type(loss), "task", "six_channel")](param, backend, model, loss)


def scale_factors(param, model) -> list[float]:
    """The factors of the scales ``model`` predicts, coarse to fine: ``model.predicted_factors()`` (an
    ablation may predict fewer than ``VAR.scales``), else ``VAR.scales``. The schedule, the targets and
    the loss are built for these: an ablation is a part that is built, not a param that is patched."""
    predicted = getattr(model, "predicted_factors", None)
    return [float(f) for f in (predicted() if predicted is not None else param.VAR.scales)]


def component_vector(loss_total: float, components: dict) -> list[float]:
    """``[total, p, phot, x, y, z, bg]`` of one step, for the epoch means."""
    return [loss_total] + [components.get(c, 0.0) for c in CHANNELS]


class _TeacherForcingOff:
    def __init__(self, model):
        self.model, self.saved = model, None

    def __enter__(self):
        if self.model is not None:
            self.saved, self.model.teacher_forcing = self.model.teacher_forcing, 0.0
        return self

    def __exit__(self, *exc):
        if self.model is not None:
            self.model.teacher_forcing = self.saved
        return False
