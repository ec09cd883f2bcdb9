"""The numerically safe 6-channel loss ``[p, phot, x, y, z, bg]``, single- or multi-scale.

It implements DECODE's ``Loss`` interface (``forward(output, target, weight)`` -> per-element loss,
``log(loss) -> (float, dict)``, ``parse(param)``), so it runs unchanged as the criterion of DECODE's
``train_val_impl.train`` / ``test`` (``loss_val.mean().backward()``, ``criterion.log(loss_val)``).

Terms, per element (channel order as DECODE's PPXYZBLoss)::

    p:            BCE with logits, pos_weight (default 2.0)    -- never sigmoid-then-log
    phot, z, bg:  squared error
    x, y:         squared error, or smooth-L1 (``xyz_loss='smooth_l1'``, also z)
    loss_el = term * weight * channel_weight

With ``channel_weights=[1]*6``, ``pos_weight=p_fg_weight`` and ``xyz_loss='mse'`` on one scale, the
per-element loss is DECODE's ``PPXYZBLoss`` exactly.

Uncertainty: an output with 10 channels (:class:`~decode_var.nn.model.VARMultiScale` with ``uncertainty``,
its finest scale) carries the standard deviations ``[phot_sig, x_sig, y_sig, z_sig]`` after the 6 channels,
in the same network units as the values. They are trained by a Gaussian negative log-likelihood on the
cells that hold an emitter (target p = 1), in a slice of its own (:meth:`PPXYZBLoss.sigma_elementwise`)::

    sigma term:   log(sigma) + (mu.detach() - target)^2 / (2 sigma^2),  times uncertainty_weight

The predicted value ``mu`` is detached: the 6 channels are trained by their own terms exactly as without
uncertainty (a learnt sigma would otherwise down-weight the hard emitters in the value's gradient, the
known failure of a plain Gaussian NLL), and sigma learns how far off they are.

Precision: inputs in float16 / bfloat16 are computed in float32 with autocast switched off inside
the loss; float64 stays float64. A float16 output's gradient is saturated at +-65504 instead of
overflowing to inf on the way back (the engine clips gradients anyway). The loss is finite for
finite inputs with ``|output - target| < 1.8e19`` (the square of a float32).

Multi-scale: ``output``, ``target`` and ``weight`` may be lists of per-scale tensors, coarse to
fine; the list position is the scale index used for the scale weights. The model may return fewer
scales than there are targets (it computes only the active ones); only ``len(output)`` scales are
used. Scales with weight 0 under the progressive schedule are not computed at all.
The result is one tensor ``(N, 6, L)``: the per-scale losses ``(N, 6, h_k * w_k)`` flattened,
multiplied by ``w_k * L / L_k`` and concatenated (``L = sum of L_k over the computed scales``), so::

    loss.mean() == sum_k w_k * mean_k(channel-weighted elementwise loss)

The returned tensor is a :class:`LossMap`: it carries its own layout (scale index, name, start,
length, weight per computed scale; the sigma term of a 10-channel scale is one more slice, after the
scales, counted in the same mean), which :meth:`PPXYZBLoss.log` reads for the per-scale breakdown,
so ``log`` describes the value it is given, whichever forward or loss instance computed it.
A single tensor (not a list) is scale 0 and gives DECODE's ``(N, 6, H, W)``.
"""
from __future__ import annotations

import logging
import math
import numbers
from dataclasses import dataclass
from typing import Mapping, Sequence, Union

import torch
import torch.nn.functional as F

from decode_var.nn.channel_weights import CHANNELS, PRESETS, AdaptiveChannelWeights, resolve_channel_weights
from decode_var.config.param import as_param
from decode_var.core.errors import CheckpointError, ParamError, ShapeError
from decode_var.nn.progressive import SCHEDULES, ScaleWeightSchedule, build_schedule
from decode_var.registry import name_of, register_loss

logger = logging.getLogger(__name__)

TensorOrList = Union[torch.Tensor, Sequence[torch.Tensor]]

#: Floor for divisions and logs. The loss itself needs none (BCE with logits, squared errors).
EPS = 1e-4

_XYZ_LOSSES = ("mse", "smooth_l1")


@dataclass(frozen=True)
class ScaleSlice:
    """Where one scale sits in the last dimension of a multi-scale loss tensor."""

    index: int
    name: str
    start: int
    length: int
    weight: float
    #: the slice holds the sigma NLL of scale ``index`` (channels phot, x, y, z; p and bg 0), not its loss
    sigma: bool = False


class LossMap(torch.Tensor):
    """A per-element loss ``(N, 6, ...)`` that carries its layout: one :class:`ScaleSlice` per computed
    scale in ``scale_slices`` (not ``layout``: that is torch's memory layout of every tensor).

    A result of torch with the same per-sample positions (``torch.cat`` along the batch, as DECODE's
    test loop does; ``detach``, ``cpu``, a product with a per-element weight) keeps the layout when its
    inputs agree on it; anything else (a mean, a channel, a slice of positions) is a plain tensor.
    """

    scale_slices: tuple = ()

    @staticmethod
    def of(loss: torch.Tensor, layout: Sequence[ScaleSlice]) -> "LossMap":
        out = loss.as_subclass(LossMap)
        out.scale_slices = tuple(layout)
        return out

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        with torch._C.DisableTorchFunctionSubclass():  # what Tensor.__torch_function__ does: plain maths
            result = func(*args, **(kwargs or {}))
            keep = isinstance(result, torch.Tensor) and result.dim() >= 3 and result.size(1) == 6
            positions = math.prod(result.shape[2:]) if keep else -1
        layouts = {a.scale_slices for a in _flat(args) if isinstance(a, LossMap)}
        if len(layouts) == 1:
            layout = layouts.pop()
            if positions == sum(s.length for s in layout):
                return LossMap.of(result, layout)
        return result


def _flat(args) -> list:
    """The arguments of a torch call, with those inside one level of list or tuple (``torch.cat``)."""
    return [b for a in args for b in (a if isinstance(a, (list, tuple)) else (a,))]


class _SaturatingUpcast(torch.autograd.Function):
    """``x.float()`` whose backward saturates the gradient at the input dtype's largest finite value.

    A float16 activation receives a float16 gradient; a large loss gradient (e.g. photon targets of
    1e6 on a small batch) would overflow to inf there although it is finite in float32. NaN stays NaN.
    """

    @staticmethod
    def forward(ctx, x):
        ctx.in_dtype = x.dtype
        return x.float()

    @staticmethod
    def backward(ctx, grad):
        big = torch.finfo(ctx.in_dtype).max
        return grad.clamp(-big, big).to(ctx.in_dtype)


def _to_compute_dtype(x: torch.Tensor) -> torch.Tensor:
    if x.dtype in (torch.float16, torch.bfloat16):
        return _SaturatingUpcast.apply(x) if x.requires_grad else x.float()
    if not x.is_floating_point():
        return x.float()
    return x


def _as_list(x: TensorOrList, what: str) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (list, tuple)) and all(isinstance(t, torch.Tensor) for t in x):
        return list(x)
    raise ShapeError(f"loss {what} must be a tensor (N, 6, H, W) or a list of them (one per scale, coarse to fine); "
                     f"got {type(x).__name__}.")


_SCALE_BALANCE = ("mean", "cells")


@register_loss("PPXYZB")
class PPXYZBLoss:
    """6-channel loss with static channel weights and a progressive scale schedule (``PPXYZB``).

    Args:
        pos_weight: weight of the positive class in the detection BCE (DECODE's ``p_fg_weight``).
        xyz_loss: ``'mse'`` or ``'smooth_l1'`` for the x, y, z channels.
        smooth_l1_beta: transition point of smooth-L1 in network units (x, y in cells of each scale); 0 gives L1.
        channel_weights: preset name (:data:`~decode_var.nn.channel_weights.PRESETS`) or 6 numbers.
        n_scales: number of output scales K (``len(VAR.scales)``).
        scale_schedule: ``'var'``, ``'warmup'`` or ``'none'`` (see :mod:`decode_var.nn.progressive`).
        start_scales, stage_epochs, stage_warmup: the ``'var'`` schedule.
        warmup_epochs: the ``'warmup'`` schedule.
        forward_safety: check shapes in every forward (cheap; DECODE's flag of the same name).
        factors: the scales' factors (``VAR.scales``); the detection BCE of a scale with factor
            f > 1 uses ``pos_weight * f**2``. None: ``pos_weight`` on every scale.
        scale_balance: ``'mean'``: every scale's loss is its mean over its cells (a 10 x 10 grid
            weighs as much as an 80 x 80 one); ``'cells'``: every cell of every scale weighs the
            same (VAR's mean over all tokens), so the finest grid dominates and the coarse ones
            act as auxiliary losses. Scale weights multiply either.
        uncertainty_weight: factor on the sigma NLL of a 10-channel output (see the module docstring);
            it has no effect on 6-channel outputs.
    """

    #: Capability read by :class:`decode_var.training.tasks.SixChannelTask`: scale and channel weights
    #: with an epoch state (``set_epoch``, ``active_scales``, ``update_epoch``, ``state_dict``, ...).
    scheduled = True

    def __init__(self, pos_weight: float = 2.0, xyz_loss: str = "mse", smooth_l1_beta: float = 0.1,
                 channel_weights: str | Sequence[float] = "recommended", n_scales: int = 1,
                 scale_schedule: str = "warmup", start_scales: int = 1, stage_epochs: float = 5,
                 stage_warmup: float = 2, warmup_epochs: float = 20, forward_safety: bool = True,
                 factors: Sequence[float] | None = None, scale_balance: str = "cells",
                 uncertainty_weight: float = 1.0):
        # 1. terms
        self.pos_weight = _positive("pos_weight", pos_weight)
        # a super-resolved grid has factor**2 cells per input px and as many fewer emitter cells per
        # cell: its positive class gets that factor, so p sees the same positive mass per input px
        # as on the 1x grid (the 1x grid and coarser ones keep DECODE's pos_weight)
        self.factors = None if factors is None else [float(f) for f in factors]
        self._pos_weights = [self.pos_weight * max(1.0, f * f) for f in (self.factors or [1.0] * n_scales)]
        if scale_balance not in _SCALE_BALANCE:
            raise ParamError(f"VAR.loss.scale_balance = {scale_balance!r} is unknown; use one of {list(_SCALE_BALANCE)}.")
        self.scale_balance = scale_balance
        if xyz_loss not in _XYZ_LOSSES:
            raise ParamError(f"VAR.loss.xyz_loss = {xyz_loss!r} is unknown; choose one of {list(_XYZ_LOSSES)}.")
        self.xyz_loss = xyz_loss
        self.smooth_l1_beta = _non_negative("smooth_l1_beta", smooth_l1_beta)
        self.uncertainty_weight = _non_negative("uncertainty_weight", uncertainty_weight)
        # 2. channel weights
        self._static_channel_weights = resolve_channel_weights(channel_weights)
        # 3. scale weights
        self.schedule: ScaleWeightSchedule = build_schedule(
            scale_schedule, n_scales, start_scales=start_scales, stage_epochs=stage_epochs,
            stage_warmup=stage_warmup, warmup_epochs=warmup_epochs)
        self.forward_safety = forward_safety
        self.epoch: float = 0.0
        self._scale_weights = self.schedule.weights(0)
        self._chw_cache: dict = {}

    # ------------------------------------------------------------------ construction from param
    @classmethod
    def parse(cls, param, factors: Sequence[float] | None = None) -> "PPXYZBLoss":
        """Build from ``param.VAR.loss`` (keys as the constructor's) and the scales ``factors`` the model
        predicts (default ``VAR.scales``; an ablation that predicts fewer passes its own, so no param is
        patched for it).

        Any param is first made a validated one with defaults filled (:func:`decode_var.config.param.as_param`):
        ours from ``load_param``, DECODE's from its own ``load_params`` (with or without a ``VAR`` section),
        a namespace or a dict."""
        kwargs = cls._parse_kwargs(as_param(param))
        if factors is not None:
            kwargs.update(n_scales=len(factors), factors=[float(f) for f in factors])
        return cls(**kwargs)

    @classmethod
    def _parse_kwargs(cls, param) -> dict:
        var = getattr(param, "VAR", None)
        section = _get(var, "loss", None)
        scales = _get(var, "scales", None)
        kwargs = {"n_scales": len(scales) if scales else 1}
        if scales:
            kwargs["factors"] = list(scales)
        for key in ("pos_weight", "xyz_loss", "smooth_l1_beta", "scale_schedule", "start_scales", "stage_epochs",
                    "stage_warmup", "warmup_epochs", "scale_balance", "uncertainty_weight"):
            value = _get(section, key, None)
            if value is not None:
                kwargs[key] = value
        chw = _get(section, "channel_weights", None)
        if chw is None:
            # A DECODE param written for PPXYZBLoss carries its weights here.
            stat = _get(getattr(param, "HyperParameter", None), "chweight_stat", None)
            if isinstance(stat, (list, tuple)) and len(stat) == 6:
                chw = list(stat)
        if chw is not None:
            kwargs["channel_weights"] = chw
        if cls is PPXYZBLoss and _get(section, "adaptive", None) is True:
            raise ParamError("VAR.loss.adaptive is true but HyperParameter.loss_impl is PPXYZB (static weights); "
                             "set HyperParameter.loss_impl: AdaptivePPXYZB or VAR.loss.adaptive: false.")
        return kwargs

    # ------------------------------------------------------------------ weights
    @property
    def channel_weights(self) -> torch.Tensor:
        """The 6 channel weights in effect, ``[p, phot, x, y, z, bg]`` (float32, CPU)."""
        return torch.tensor(self._channel_weight_list(), dtype=torch.float32)

    def _channel_weight_list(self) -> list[float]:
        return self._static_channel_weights

    def _channel_weight_view(self, device, dtype) -> torch.Tensor:
        values = tuple(self._channel_weight_list())
        key = (values, str(device), dtype)
        if key not in self._chw_cache:
            self._chw_cache = {key: torch.tensor(values, device=device, dtype=dtype).view(1, 6, 1, 1)}
        return self._chw_cache[key]

    def set_epoch(self, epoch: float) -> list[float]:
        """Move the scale weights to ``epoch`` (0 = first; fractional for a per-step ramp). Returns them."""
        self._scale_weights = self.schedule.weights(epoch)
        self.epoch = float(epoch)
        return list(self._scale_weights)

    @property
    def scale_weights(self) -> list[float]:
        """Current weight per scale, coarse to fine (0 = inactive)."""
        return list(self._scale_weights)

    @property
    def active_scales(self) -> int:
        """Number of scales (the coarsest ones) with weight > 0: what the model must compute."""
        return sum(1 for w in self._scale_weights if w > 0)

    @property
    def n_scales(self) -> int:
        return self.schedule.n_scales

    def update_epoch(self, channel_losses: Mapping[str, float] | Sequence[float], weighted: bool = True) -> dict:
        """End-of-epoch hook; static weights only report. See :meth:`AdaptivePPXYZBLoss.update_epoch`."""
        return {f"chw_{ch}": float(w) for ch, w in zip(CHANNELS, self._channel_weight_list())}

    # ------------------------------------------------------------------ forward
    def __call__(self, output: TensorOrList, target: TensorOrList, weight: TensorOrList) -> torch.Tensor:
        return self.forward(output, target, weight)

    def elementwise(self, output_N6HW: torch.Tensor, target_N6HW: torch.Tensor,
                    weight_N6HW: torch.Tensor, k: int = 0) -> torch.Tensor:
        """Channel-weighted per-element loss of scale ``k``, ``(N, 6, H, W)``, computed in float32 or float64."""
        out, tar, wgt = (_to_compute_dtype(t) for t in (output_N6HW, target_N6HW, weight_N6HW))
        dtype = torch.promote_types(torch.promote_types(out.dtype, tar.dtype), wgt.dtype)
        out, tar, wgt = out.to(dtype), tar.to(dtype), wgt.to(dtype)
        with _no_autocast(out.device):
            pos_weight = torch.tensor(self._pos_weights[k] if k < len(self._pos_weights) else self.pos_weight,
                                      device=out.device, dtype=dtype)
            p_loss = F.binary_cross_entropy_with_logits(out[:, :1], tar[:, :1], reduction="none",
                                                        pos_weight=pos_weight)
            if self.xyz_loss == "mse":
                rest_loss = F.mse_loss(out[:, 1:], tar[:, 1:], reduction="none")
                loss = torch.cat((p_loss, rest_loss), 1)
            else:
                phot_loss = F.mse_loss(out[:, 1:2], tar[:, 1:2], reduction="none")
                xyz_loss = F.smooth_l1_loss(out[:, 2:5], tar[:, 2:5], reduction="none", beta=self.smooth_l1_beta)
                bg_loss = F.mse_loss(out[:, 5:], tar[:, 5:], reduction="none")
                loss = torch.cat((p_loss, phot_loss, xyz_loss, bg_loss), 1)
            # same order of products as DECODE, so the static case matches it bit for bit
            return loss * wgt * self._channel_weight_view(out.device, dtype)

    @staticmethod
    def sigma_elementwise(output_NCHW: torch.Tensor, target_N6HW: torch.Tensor) -> torch.Tensor:
        """Gaussian NLL of the standard deviations of a 10-channel output, ``(N, 6, H, W)``: channels phot, x, y,
        z hold ``log(sigma) + (mu.detach() - target)^2 / (2 sigma^2)`` on the cells whose target p is 1 and 0
        elsewhere (p and bg are 0). Network units; sigma (channels 6..9) must be > 0 (the model's floor)."""
        out, tar = _to_compute_dtype(output_NCHW), _to_compute_dtype(target_N6HW)
        dtype = torch.promote_types(out.dtype, tar.dtype)
        out, tar = out.to(dtype), tar.to(dtype)
        with _no_autocast(out.device):
            on_N1HW = tar[:, :1] >= 0.5
            # off the emitter cells sigma = 1 and the error 0 (a log of 1, no 0 * inf in the gradient)
            sigma_N4HW = torch.where(on_N1HW, out[:, 6:10], torch.ones_like(out[:, 6:10]))
            error_N4HW = torch.where(on_N1HW, out[:, 1:5].detach() - tar[:, 1:5], torch.zeros_like(tar[:, 1:5]))
            nll_N4HW = torch.log(sigma_N4HW) + 0.5 * (error_N4HW / sigma_N4HW) ** 2
            zero_N1HW = torch.zeros_like(tar[:, :1])
            return torch.cat((zero_N1HW, nll_N4HW, zero_N1HW), 1)

    def forward(self, output: TensorOrList, target: TensorOrList, weight: TensorOrList) -> LossMap:
        """Per-element loss: ``(N, 6, H, W)`` for single tensors, ``(N, 6, L)`` for per-scale lists, as a
        :class:`LossMap` holding its layout.

        Args:
            output: raw model output ``[p_logit, phot, x, y, z, bg]`` per scale, coarse to fine.
            target: ``[p, phot, x, y, z, bg]`` per scale, normalised units (see module doc).
            weight: 6-channel weight map per scale (DECODE SimpleWeight).
        """
        single = isinstance(output, torch.Tensor) and isinstance(target, torch.Tensor) and output.size(1) == 6
        outs, tars, wgts = _as_list(output, "output"), _as_list(target, "target"), _as_list(weight, "weight")
        n = len(outs)
        if self.forward_safety:
            self._check(outs, tars, wgts)
        if single:
            w0 = self._scale_weights[0]
            layout = [ScaleSlice(0, _scale_name(0, outs[0]), 0, outs[0][0, 0].numel(), w0)]
            loss = self.elementwise(outs[0], tars[0], wgts[0])
            return LossMap.of(loss if w0 == 1.0 else loss * w0, layout)

        computed = [k for k in range(n) if self._scale_weights[k] > 0]
        if not computed:
            raise ShapeError(f"none of the {n} scales given to the loss is active at epoch {self.epoch:g} "
                             f"(scale weights {self._scale_weights}); the model must compute at least the first "
                             f"{self.active_scales} scale(s).")
        lengths = {k: outs[k][0, 0].numel() for k in computed}
        with_sigma = [k for k in computed if outs[k].size(1) == 10]  # their sigma NLL: one slice each, after the scales
        total = sum(lengths.values()) + sum(lengths[k] for k in with_sigma)
        norm = {k: (lengths[k] if self.scale_balance == "mean" else max(lengths.values())) for k in computed}
        layout, pieces, start = [], [], 0
        for k in computed:
            w_k = self._scale_weights[k]
            out_k = outs[k] if k not in with_sigma else outs[k][:, :6]
            loss = self.elementwise(out_k, tars[k], wgts[k], k).flatten(2)
            pieces.append(loss * (w_k * total / norm[k]))
            layout.append(ScaleSlice(k, _scale_name(k, outs[k]), start, lengths[k], w_k))
            start += lengths[k]
        for k in with_sigma:
            w_k = self._scale_weights[k]
            nll = self.sigma_elementwise(outs[k], tars[k]).flatten(2)
            pieces.append(nll * (w_k * self.uncertainty_weight * total / norm[k]))
            layout.append(ScaleSlice(k, _scale_name(k, outs[k]) + "_sigma", start, lengths[k], w_k, sigma=True))
            start += lengths[k]
        return LossMap.of(torch.cat(pieces, dim=-1), layout)

    def _check(self, outs, tars, wgts) -> None:
        if not outs:
            raise ShapeError("the loss got an empty list of outputs; give at least the coarsest scale.")
        if len(outs) > self.n_scales:
            raise ShapeError(f"the loss got {len(outs)} output scales but was built for {self.n_scales} "
                             "(len(VAR.scales)).")
        if len(tars) < len(outs) or len(wgts) < len(outs):
            raise ShapeError(f"the loss got {len(outs)} output scales but {len(tars)} target and {len(wgts)} weight "
                             "scales; every output scale needs its target and weight.")
        for k, (o, t, w) in enumerate(zip(outs, tars, wgts)):
            if o.dim() != 4 or o.size(1) not in (6, 10) or o[:, :6].shape != t.shape or t.shape != w.shape:
                raise ShapeError(f"scale {k}: output {tuple(o.shape)}, target {tuple(t.shape)} and weight "
                                 f"{tuple(w.shape)} must all be (N, 6, H, W) of the same size (the output may have "
                                 "10 channels: the 6, then the standard deviations of phot, x, y, z).")

    # ------------------------------------------------------------------ logging
    def log(self, loss_val: torch.Tensor) -> tuple[float, dict]:
        """Mean loss and its components, as DECODE's ``Loss.log``.

        Returns:
            ``(mean, {'p', 'phot', 'x', 'y', 'z', 'bg': per-channel mean (mean of them = total),
            's{k}': contribution of scale k (they sum to the total), 's{k}_{ch}': its per-channel part})``.
            Values include channel and scale weights, as DECODE reports them. The per-scale keys
            come from the layout ``loss_val`` carries (a :class:`LossMap` of :meth:`forward`, also
            after ``torch.cat`` along the batch dimension, as DECODE's test loop does); a plain
            tensor gives the channel keys only. A single-tensor loss is scale 0.
            With a sigma slice (a 10-channel output): ``'sigma'`` (its contribution to the total) and
            ``'sigma_phot'`` ... ``'sigma_z'`` (its per-channel part); the channel keys then leave it out (the
            adaptive channel weights see the 6 channels' own losses) and the total is their mean + ``'sigma'``.
        """
        layout = list(getattr(loss_val, "scale_slices", ()))
        v = loss_val.detach().as_subclass(torch.Tensor)  # plain tensor maths from here
        flat = v.flatten(2) if v.dim() > 3 else v
        if flat.dim() != 3 or flat.size(1) != 6:
            raise ShapeError(f"log expects the loss of forward, (N, 6, ...); got {tuple(loss_val.shape)}.")
        per_pos = flat.float().mean(0)  # (6, L)
        length = per_pos.size(1)
        if not (layout and sum(s.length for s in layout) == length):
            layout = []
        sigma_starts = [s.start for s in layout if s.sigma]  # the sigma slices come after the scales
        rows = [per_pos.mean(1) if not sigma_starts else per_pos[:, :min(sigma_starts)].sum(1) / length]
        for s in layout:
            rows.append(per_pos[:, s.start:s.start + s.length].sum(1) / length)
        values = torch.stack(rows).cpu().tolist()  # one device sync for all components
        components = dict(zip(CHANNELS, values[0]))
        for s, row in zip(layout, values[1:]):
            if s.sigma:  # one slice per 10-channel scale; the model has one
                components["sigma"] = components.get("sigma", 0.0) + math.fsum(row) / 6
                for ch, r in zip(CHANNELS[1:5], row[1:5]):
                    components[f"sigma_{ch}"] = components.get(f"sigma_{ch}", 0.0) + r
                continue
            components[f"s{s.index}"] = math.fsum(row) / 6
            components.update({f"s{s.index}_{ch}": r for ch, r in zip(CHANNELS, row)})
        return math.fsum(values[0]) / 6 + components.get("sigma", 0.0), components

    # ------------------------------------------------------------------ diagnostics
    @torch.no_grad()
    def nonfinite_report(self, output: TensorOrList, target: TensorOrList, weight: TensorOrList) -> list[str]:
        """Where non-finite values are: one line per scale, channel and tensor (output, target, weight, loss).

        Meant for the training loop after a non-finite loss (it recomputes, so it costs a forward of the
        loss). Lines read ``"scale 2 (s2_40x40) channel x: 3 non-finite elements in output"``. Empty
        when everything is finite.
        """
        outs, tars, wgts = _as_list(output, "output"), _as_list(target, "target"), _as_list(weight, "weight")
        lines = []
        for ch, w in zip(CHANNELS, self._channel_weight_list()):
            if not math.isfinite(w):
                lines.append(f"channel weight of {ch} is {w}")
        for k, w in enumerate(self._scale_weights[:len(outs)]):
            if not math.isfinite(w):
                lines.append(f"scale weight of scale {k} is {w}")
        for k, o in enumerate(outs):
            name = _scale_name(k, o)
            t = tars[k] if k < len(tars) else None
            w = wgts[k] if k < len(wgts) else None
            tensors = [("output", o), ("target", t), ("weight", w)]
            if self._scale_weights[k] > 0 and t is not None and w is not None and o[:, :6].shape == t.shape == w.shape:
                tensors.append(("loss", self.elementwise(o[:, :6], t, w, k)))
                if o.size(1) == 10:
                    tensors.append(("sigma NLL", self.sigma_elementwise(o, t)))
            for what, x in tensors:
                if x is None or x.dim() < 2 or not x.is_floating_point():
                    continue
                bad = (~torch.isfinite(x)).flatten(2).sum((0, 2)) if x.dim() > 2 else (~torch.isfinite(x)).sum(0)
                names = CHANNELS + tuple(f"{ch}_sig" for ch in CHANNELS[1:5])
                for c, count in enumerate(bad.cpu().tolist()):
                    if count:
                        ch = names[c] if c < len(names) else str(c)
                        lines.append(f"scale {k} ({name}) channel {ch}: {count} non-finite elements in {what}")
        return lines

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """Plain python state (epoch and schedule); safe for ``torch.load(weights_only=True)``."""
        return {"loss": name_of(type(self)), "epoch": self.epoch, "schedule": self.schedule.config(),
                "channel_weights": list(self._channel_weight_list())}

    def load_state_dict(self, state: Mapping) -> None:
        """Restore the epoch (and so the scale weights) of :meth:`state_dict`."""
        if not isinstance(state, Mapping) or "epoch" not in state:
            raise CheckpointError("loss state is malformed (no 'epoch'); the checkpoint is corrupt or from another loss.")
        saved = state.get("schedule")
        if isinstance(saved, Mapping) and dict(saved) != self.schedule.config():
            logger.warning("scale schedule changed since the checkpoint (%s -> %s); the new one applies.",
                           dict(saved), self.schedule.config())
        try:
            self.set_epoch(float(state["epoch"]))
        except (TypeError, ValueError) as err:
            raise CheckpointError(f"loss state holds an invalid epoch {state['epoch']!r}.") from err

    def __repr__(self) -> str:
        w = ", ".join(f"{ch}={v:.3g}" for ch, v in zip(CHANNELS, self._channel_weight_list()))
        return (f"{type(self).__name__}(pos_weight={self.pos_weight:g}, xyz_loss={self.xyz_loss!r}, "
                f"channel_weights=[{w}], schedule={self.schedule!r}, epoch={self.epoch:g})")


@register_loss("AdaptivePPXYZB")
class AdaptivePPXYZBLoss(PPXYZBLoss):
    """:class:`PPXYZBLoss` whose channel weights follow the adaptive rule (``AdaptivePPXYZB``).

    Args (beyond :class:`PPXYZBLoss`; rule in :mod:`decode_var.nn.channel_weights`):
        adaptive: False freezes the weights (history and reports continue).
        adaptive_interval, adaptive_window: apply the rule every ``interval`` epochs, comparing the
            mean of the last ``window`` epochs with the ``window`` before.
        adaptive_up_ratio, adaptive_down_ratio, adaptive_up, adaptive_down: thresholds and factors.
        weight_min, weight_max: bounds on every weight. renormalise: keep the sum of the weights.
    """

    def __init__(self, *, adaptive: bool = True, adaptive_interval: int = 10, adaptive_window: int = 5,
                 adaptive_up_ratio: float = 0.95, adaptive_down_ratio: float = 0.8, adaptive_up: float = 1.1,
                 adaptive_down: float = 0.9, weight_min: float = 0.1, weight_max: float = 5.0,
                 renormalise: bool = True, **kwargs):
        super().__init__(**kwargs)
        self.adaptive = AdaptiveChannelWeights(
            self._static_channel_weights, interval=adaptive_interval, window=adaptive_window,
            up_ratio=adaptive_up_ratio, down_ratio=adaptive_down_ratio, up=adaptive_up, down=adaptive_down,
            weight_min=weight_min, weight_max=weight_max, renormalise=renormalise, enabled=adaptive)

    @classmethod
    def _parse_kwargs(cls, param) -> dict:
        kwargs = super()._parse_kwargs(param)
        section = _get(getattr(param, "VAR", None), "loss", None)
        for key in ("adaptive", "adaptive_interval", "adaptive_window", "adaptive_up_ratio", "adaptive_down_ratio",
                    "adaptive_up", "adaptive_down", "weight_min", "weight_max", "renormalise"):
            value = _get(section, key, None)
            if value is not None:
                kwargs[key] = value
        return kwargs

    def _channel_weight_list(self) -> list[float]:
        return self.adaptive.weights

    def update_epoch(self, channel_losses: Mapping[str, float] | Sequence[float], weighted: bool = True) -> dict:
        """Feed one epoch's per-channel mean loss to the adaptive rule; call once per epoch.

        Args:
            channel_losses: ``{'p': ..., ..., 'bg': ...}`` (e.g. epoch means of :meth:`log`'s components,
                all-reduced across ranks) or 6 values in channel order. Non-finite values are ignored.
            weighted: the values include the channel weights (as :meth:`log` reports them); they are
                divided by the weights in effect, so the rule sees each channel's own loss.

        Returns:
            The channel weights now in effect, ``{'chw_p': ..., 'chw_changed': 0.0 | 1.0}``, for the log.
        """
        values = _channel_list(channel_losses)
        if weighted:
            values = [v / w if (v is not None and w > 0) else None
                      for v, w in zip(values, self.adaptive.weights)]
        return self.adaptive.update(values)

    def state_dict(self) -> dict:
        """Plain python state: epoch, schedule, and the adaptive weights, history and counters."""
        return {**super().state_dict(), "adaptive": self.adaptive.state_dict()}

    def load_state_dict(self, state: Mapping) -> None:
        """Restore :meth:`state_dict`; a resumed run continues exactly (same weights, same history)."""
        super().load_state_dict(state)
        if "adaptive" not in state:
            raise CheckpointError("loss state has no 'adaptive' entry: the checkpoint was written by the static "
                                  "PPXYZB loss; resume with HyperParameter.loss_impl: PPXYZB or start afresh.")
        self.adaptive.load_state_dict(state["adaptive"])


def unit_weight_loss(prob_output_N6HW: torch.Tensor, target_N6HW: torch.Tensor,
                     weight_N6HW: torch.Tensor) -> torch.Tensor:
    """Per-sample loss ``(N,)`` of one scale whose definition never changes during a run.

    For training curves comparable across epochs: the optimised loss changes its definition as the
    progressive scale weights and adaptive channel weights move. Here: binary cross-entropy of p (a
    probability in 0..1, as the model's eval output gives it; no pos_weight) and squared error of phot,
    x, y, z, bg (network units: phot / phot_max, offsets in cells of this scale, z / z_max, bg / bg_max),
    each times the weight map, unit channel weights, mean over channels and cells. Computed in float32.
    """
    out, tar, wgt = (t.float() for t in (prob_output_N6HW, target_N6HW, weight_N6HW))
    with _no_autocast(out.device):
        p_loss = F.binary_cross_entropy(out[:, :1].clamp(0.0, 1.0), tar[:, :1], reduction="none")
        rest_loss = F.mse_loss(out[:, 1:], tar[:, 1:], reduction="none")
        return (torch.cat((p_loss, rest_loss), 1) * wgt).flatten(1).mean(1)


# ---------------------------------------------------------------------- helpers
class _no_autocast:
    """Switch autocast off on ``device`` (float32 maths inside the loss, whatever the caller does)."""

    def __init__(self, device: torch.device):
        self.ctx = None
        try:
            self.ctx = torch.autocast(device_type=device.type, enabled=False)
        except (RuntimeError, ValueError):  # a device type without autocast has nothing to switch off
            self.ctx = None

    def __enter__(self):
        if self.ctx is not None:
            self.ctx.__enter__()

    def __exit__(self, *exc):
        if self.ctx is not None:
            return self.ctx.__exit__(*exc)
        return False


def _scale_name(k: int, x: torch.Tensor) -> str:
    """``s{k}_{size_x}x{size_y}``, as :attr:`decode_var.core.scales.Scale.name`."""
    return f"s{k}_{x.size(-2)}x{x.size(-1)}"


def _get(section, key: str, default=None):
    """``section.key`` for namespaces, ``section[key]`` for dicts, ``default`` if absent or section is None."""
    if section is None:
        return default
    if isinstance(section, Mapping):
        return section.get(key, default)
    return getattr(section, key, default)


def _channel_list(channel_losses) -> list[float | None]:
    if isinstance(channel_losses, Mapping):
        raw = [channel_losses.get(ch) for ch in CHANNELS]
    else:
        raw = list(channel_losses)
        if len(raw) != 6:
            raise ValueError(f"expected 6 channel losses [p, phot, x, y, z, bg], got {len(raw)}")
    out = []
    for v in raw:
        try:
            out.append(None if v is None or isinstance(v, bool) else float(v))
        except (TypeError, ValueError):
            out.append(None)
    return out


def _positive(key: str, v) -> float:
    f = None if isinstance(v, bool) or not isinstance(v, numbers.Real) else float(v)
    if f is None or not math.isfinite(f) or f <= 0:
        raise ParamError(f"VAR.loss.{key} = {v!r} must be a finite number > 0.")
    return f


def _non_negative(key: str, v) -> float:
    f = None if isinstance(v, bool) or not isinstance(v, numbers.Real) else float(v)
    if f is None or not math.isfinite(f) or f < 0:
        raise ParamError(f"VAR.loss.{key} = {v!r} must be a finite number >= 0.")
    return f


__all__ = ["PPXYZBLoss", "AdaptivePPXYZBLoss", "unit_weight_loss", "PRESETS", "SCHEDULES", "ScaleSlice", "LossMap",
           "EPS"]
