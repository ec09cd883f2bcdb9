"""Progressive scale weights: which output scales the loss sees, and how strongly, at an epoch.

A schedule maps an epoch to one weight per scale (coarse to fine). A weight of 0 means the scale
is inactive: the model need not compute it and the loss skips it. Active scales are always a
prefix ``0 .. n_active(epoch) - 1`` of the scales, so "how many scales to compute" is one number.

Epochs may be fractional (``epoch + step / steps_per_epoch``) for a per-step ramp, as VAR's
trainer ramps per iteration; whole epochs give a per-epoch ramp.

Three schedules (``VAR.loss.scale_schedule``):

``'none'``
    Every scale has weight 1 from the start.

``'var'`` (FoundationVision/VAR ``trainer.py``/``train.py``: ``pg``, ``pg0``, ``pgwp``)
    Training starts with the ``start_scales`` coarsest scales (VAR's ``pg0 + 1``) and adds one
    scale every ``stage_epochs`` epochs (VAR spreads the stages over the first ``pg`` fraction of
    training; here ``pg * epochs = (K - start_scales) * stage_epochs``). With
    ``s = min(start_scales - 1 + floor(epoch / stage_epochs), K - 1)`` the index of the finest
    active scale and ``t_s = (s - start_scales + 1) * stage_epochs`` the epoch it was added::

        w_k = 1                                                       k <  s
        w_s = max(0.01, min(1, (epoch - t_s) / stage_warmup))  (VAR's prog_wp, pgwp)
        w_k = 0                                                       k >  s

    As in VAR, the scales active from the start are not ramped (the first stage has no
    progressive warm-up). Unlike VAR, the finest scale is ramped too when it is added: VAR's
    trainer switches progressive weighting off at its last stage, which gives that scale full
    weight at once. ``stage_warmup = 0`` adds every scale at full weight.

``'warmup'`` (the decode-var emitter work)
    All scales are active; coarse scales start weak and reach full weight after
    ``warmup_epochs``::

        w_k = (0.1 + 0.9 * min(epoch / warmup_epochs, 1)) ** (K - 1 - k)

    The finest scale (k = K - 1) always has weight 1. ``warmup_epochs = 0`` gives weight 1 at once.
"""
from __future__ import annotations

import math
import numbers
from abc import ABC, abstractmethod

from decode_var.core.errors import ParamError

#: VAR's floor on the weight of a newly added scale (``max(min(it / wp_it, 1), 0.01)``).
MIN_RAMP_WEIGHT = 0.01


class ScaleWeightSchedule(ABC):
    """Weights of ``n_scales`` output scales as a function of the epoch (coarse to fine)."""

    name: str = ""

    def __init__(self, n_scales: int):
        if isinstance(n_scales, bool) or not isinstance(n_scales, numbers.Integral) or n_scales < 1:
            raise ParamError(f"VAR.scales must hold at least one scale; got {n_scales!r} scales.")
        self.n_scales = int(n_scales)

    @abstractmethod
    def weights(self, epoch: float) -> list[float]:
        """One weight per scale at ``epoch`` (0 = first epoch), each in [0, 1]."""

    def n_active(self, epoch: float) -> int:
        """How many scales (the coarsest ones) have a weight > 0 at ``epoch``."""
        return sum(1 for w in self.weights(epoch) if w > 0)

    def config(self) -> dict:
        """Plain-python description, stored in checkpoints to detect a changed schedule."""
        return {"name": self.name, "n_scales": self.n_scales}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items() if k != "name")
        return f"{type(self).__name__}({args})"


class ConstantScaleWeights(ScaleWeightSchedule):
    """Every scale at weight 1 (``scale_schedule: none``)."""

    name = "none"

    def weights(self, epoch: float) -> list[float]:
        _check_epoch(epoch)
        return [1.0] * self.n_scales


class VARProgressiveSchedule(ScaleWeightSchedule):
    """VAR's progressive training in epochs (``scale_schedule: var``); formula in the module doc.

    Args:
        n_scales: number of output scales K.
        start_scales: scales active at epoch 0 (VAR's ``pg0 + 1``), 1 .. K.
        stage_epochs: epochs between two added scales (> 0).
        stage_warmup: epochs over which an added scale ramps from 0.01 to 1 (VAR's ``pgwp``).
    """

    name = "var"

    def __init__(self, n_scales: int, start_scales: int = 1, stage_epochs: float = 5,
                 stage_warmup: float = 2):
        super().__init__(n_scales)
        if (isinstance(start_scales, bool) or not isinstance(start_scales, numbers.Integral)
                or not 1 <= start_scales <= n_scales):
            raise ParamError(f"VAR.loss.start_scales = {start_scales!r} must be an integer between 1 and the "
                             f"number of scales ({n_scales}).")
        self.start_scales = int(start_scales)
        self.stage_epochs = _number("stage_epochs", stage_epochs, low=0, low_open=True)
        self.stage_warmup = _number("stage_warmup", stage_warmup, low=0)

    def stage(self, epoch: float) -> int:
        """Index of the finest active scale at ``epoch``."""
        _check_epoch(epoch)
        return min(self.start_scales - 1 + int(math.floor(epoch / self.stage_epochs)), self.n_scales - 1)

    def weights(self, epoch: float) -> list[float]:
        s = self.stage(epoch)
        w = [1.0] * (s + 1) + [0.0] * (self.n_scales - s - 1)
        if s >= self.start_scales:  # an added scale, not one of those active from the start
            added_at = (s - self.start_scales + 1) * self.stage_epochs
            if self.stage_warmup > 0:
                w[s] = max(MIN_RAMP_WEIGHT, min(1.0, (epoch - added_at) / self.stage_warmup))
        return w

    def n_active(self, epoch: float) -> int:
        return self.stage(epoch) + 1

    def config(self) -> dict:
        return {**super().config(), "start_scales": self.start_scales, "stage_epochs": self.stage_epochs,
                "stage_warmup": self.stage_warmup}


class WarmupScaleWeights(ScaleWeightSchedule):
    """Coarse-scale warm-up ``(0.1 + 0.9 min(e / warmup, 1)) ** (K - 1 - k)`` (``scale_schedule: warmup``).

    Args:
        n_scales: number of output scales K.
        warmup_epochs: epochs until every scale has weight 1 (>= 0).
    """

    name = "warmup"

    def __init__(self, n_scales: int, warmup_epochs: float = 20):
        super().__init__(n_scales)
        self.warmup_epochs = _number("warmup_epochs", warmup_epochs, low=0)

    def weights(self, epoch: float) -> list[float]:
        _check_epoch(epoch)
        progress = 1.0 if self.warmup_epochs == 0 else min(epoch / self.warmup_epochs, 1.0)
        base = 0.1 + 0.9 * progress
        return [base ** (self.n_scales - 1 - k) for k in range(self.n_scales)]

    def config(self) -> dict:
        return {**super().config(), "warmup_epochs": self.warmup_epochs}


SCHEDULES = {"none": ConstantScaleWeights, "var": VARProgressiveSchedule, "warmup": WarmupScaleWeights}


def build_schedule(name: str, n_scales: int, *, start_scales: int = 1, stage_epochs: float = 5,
                   stage_warmup: float = 2, warmup_epochs: float = 20) -> ScaleWeightSchedule:
    """The schedule called ``name`` (``'none'``, ``'var'``, ``'warmup'``).

    Every argument is validated, also those the chosen schedule does not use, so a bad value in
    the param file is reported before someone switches schedules.
    """
    VARProgressiveSchedule(n_scales, start_scales=start_scales, stage_epochs=stage_epochs, stage_warmup=stage_warmup)
    WarmupScaleWeights(n_scales, warmup_epochs=warmup_epochs)
    if name == "none":
        return ConstantScaleWeights(n_scales)
    if name == "var":
        return VARProgressiveSchedule(n_scales, start_scales=start_scales, stage_epochs=stage_epochs,
                                      stage_warmup=stage_warmup)
    if name == "warmup":
        return WarmupScaleWeights(n_scales, warmup_epochs=warmup_epochs)
    raise ParamError(f"VAR.loss.scale_schedule = {name!r} is unknown; choose one of {sorted(SCHEDULES)}.")


def _check_epoch(epoch) -> None:
    if isinstance(epoch, bool) or not isinstance(epoch, numbers.Real) or not math.isfinite(epoch) or epoch < 0:
        raise ValueError(f"epoch must be a finite number >= 0, got {epoch!r}")


def _number(key: str, value, low: float, low_open: bool = False) -> float:
    ok = (not isinstance(value, bool) and isinstance(value, numbers.Real) and math.isfinite(value)
          and (value > low if low_open else value >= low))
    if not ok:
        bound = f"> {low:g}" if low_open else f">= {low:g}"
        raise ParamError(f"VAR.loss.{key} = {value!r} must be a finite number {bound}.")
    return float(value)
