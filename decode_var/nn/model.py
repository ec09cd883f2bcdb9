"""VARMultiScale: next-scale prediction of 6-channel emitter maps, coarse to fine.

The network predicts ``[p, phot, x, y, z, bg]`` on every grid of the :class:`~decode_var.core.scales.
ScaleSchedule`, coarsest first, and each scale is conditioned on the scales before it:

1. A shared conv encoder with a top-down path reads the frame window once (strides 1, 2, 4).
2. The coarse scales (factor <= ``token_max_factor``, whole multiples of the coarsest) are token
   grids under one transformer. A token of scale k is the encoder feature of its cell + a
   projection of the re-centred map of scale k-1 + a scale embedding (VAR's ``lvl_embed``) + a
   depthwise-conv position code (so any frame size works). Attention is block-causal: a token of
   scale k sees the tokens of scales <= k in its window (VAR's ``attn_bias_for_masking``).
3. Finer and super-resolved scales refine with convolutions on their own grid, from the encoder
   features, the upsampled hidden state of scale k-1 and the re-centred map of scale k-1.
4. A 1x1 head per scale gives the 6 channels; with ``uncertainty`` a second 1x1 head on the finest
   hidden state gives 4 more, the standard deviations ``[phot_sig, x_sig, y_sig, z_sig]`` (network units,
   > 0: softplus + :data:`SIGMA_MIN`), trained by the loss's Gaussian NLL.

The map a finer scale is conditioned on is the prediction of the coarser scale (p through a
sigmoid, detached: no gradient flows from a fine loss into a coarse prediction, as with VAR's
token inputs), or, with teacher forcing, the coarser ground-truth target. With all samples of a
batch teacher-forced, the token scales run in one pass under the block mask (VAR's training
mode); otherwise scale by scale with a key/value cache (VAR's inference mode). Both are exact.

Units (network units, :class:`~decode_var.data.targets.TargetRescale`), the same for outputs, targets
and conditioning maps of every scale: p logit (train) or probability (eval); phot /
Scaling.phot_max; x, y offsets from the cell centre in **cells of that scale** (input px / cell
size); z / Scaling.z_max; bg / Scaling.bg_max. A map handed from scale k-1 to scale k is converted
to scale k's cells by :func:`~decode_var.nn.blocks.recentre`, nowhere else.
Every channel but p is a linear output, so targets outside [-1, 1]
stay reachable; the heads start small, which keeps the start stable.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from fractions import Fraction
from typing import Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from decode_var.config.param import as_param
from decode_var.core.errors import CheckpointError, ParamError, ShapeError
from decode_var.nn.blocks import (FrameEncoder, RefineStage, ScaleTransformer, WindowLayout,
                           recentre, recentre_upsample, resample)
from decode_var.core.scales import ScaleSchedule
from decode_var.registry import register_model

CONDITIONING = ("next_scale", "independent", "single")
#: Floor of a predicted standard deviation, network units (1e-3 cells = 0.1 nm at 100 nm px): keeps the NLL's
#: 1 / sigma^2 finite.
SIGMA_MIN = 1e-3
#: Initial predicted standard deviation, network units (a tenth of a cell, of z_max, of phot_max).
SIGMA_INIT = 0.1
#: Channels of the eval output with ``uncertainty``: the 6 of every model, then the 4 standard deviations
#: (``[p, phot, x, y, z, bg, phot_sig, x_sig, y_sig, z_sig]``; the post-processing's photxyz_sigma_mapping).
SIGMA_CHANNELS = (6, 7, 8, 9)
#: Version of what a VARMultiScale checkpoint means. 2: conditioning offsets in cells of each scale
#: (decode-var 0.2); a format-1 checkpoint loads without a shape error but predicts differently.
_EXTRA_STATE_FORMAT = 2


def _activation_class(name: Union[str, type]) -> type[nn.Module]:
    if isinstance(name, type) and issubclass(name, nn.Module):
        return name
    cls = getattr(nn, str(name), None)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ParamError(f"HyperParameter.arch_param.activation = {name!r} is not a torch.nn activation; "
                         f"use e.g. ELU, ReLU, GELU or SiLU.")
    return cls


def _size_multiple(factors: Sequence[float]) -> int:
    """Smallest frame size step (px) for which every factor gives a whole number of cells."""
    return math.lcm(*(Fraction(f).limit_denominator(1024).denominator for f in factors))


def _check_arguments(conditioning: str, channels_in, p_init: float) -> None:
    if conditioning not in CONDITIONING:
        raise ParamError(f"VAR.model.conditioning = {conditioning!r}; use one of {list(CONDITIONING)}.")
    if not (isinstance(channels_in, int) and channels_in >= 1):
        raise ParamError(f"HyperParameter.channels_in = {channels_in!r}; use 1 or 3 (frames in the window).")
    if not 0.0 < p_init < 1.0:
        raise ParamError(f"VAR.model.p_init = {p_init!r} must lie in (0, 1).")


def _count_token_scales(factors, token_max_factor: float) -> int:
    """How many leading scales are token scales: up to ``token_max_factor``, each an integer multiple
    of the first."""
    n_tok = 0
    for f in factors:
        ratio = f / factors[0]
        if f <= token_max_factor + 1e-12 and abs(ratio - round(ratio)) < 1e-9:
            n_tok += 1
        else:
            break
    return n_tok


@register_model()
class VARMultiScale(nn.Module):
    """Next-scale-prediction emitter model with DECODE's model interface.

    Args:
        channels_in: frames in the input window (DECODE's ``HyperParameter.channels_in``, 1 or 3).
        schedule: the output scales; its ``input_shape`` is the training frame size.
        features: conv channels of the encoder at stride 1 (x2 per level).
        token_dim: transformer width.
        depth: transformer blocks.
        heads: attention heads.
        mlp_ratio: MLP hidden width / token_dim.
        token_max_factor: scales with a factor up to this (and a whole multiple of the coarsest
            factor) are transformer tokens; finer ones are refined by convolutions.
        window: attention window, at most this many coarsest-scale cells per side.
        conditioning: ``next_scale`` (the model), ``independent`` (ablation: every scale has its
            own head on the shared encoder, no coarse-to-fine path, attention within a scale
            only), ``single`` (ablation: only the finest scale is built and predicted).
        teacher_forcing, teacher_forcing_end, teacher_forcing_epochs: probability that a
            training sample is conditioned on coarser ground truth instead of predictions;
            linear from ``teacher_forcing`` at epoch 0 to ``teacher_forcing_end`` at
            ``teacher_forcing_epochs`` (0: always ``teacher_forcing_end``); see :meth:`set_epoch`.
            The current value is the attribute ``teacher_forcing``.
        p_init: initial emitter probability per finest-grid cell (expected emitter density); each
            scale's p bias is set to the probability that one of its (larger) cells holds an emitter.
        detach_condition: stop gradients through the predicted maps fed to finer scales.
        activation: conv non-linearity, a ``torch.nn`` name or class.
        head_init_scale: factor on the default init of the 1x1 output heads.
        seed: seeds the teacher-forcing coin (``tf_generator``); None = the global torch RNG.
        uncertainty: add the finest scale's standard deviations of phot, x, y, z (channels
            :data:`SIGMA_CHANNELS` of its map, in train and eval mode). Off, the model is exactly the
            6-channel one (same parameters, same random draws).
    """

    #: Capability read by :func:`decode_var.training.tasks.is_progressive`: the train-mode forward takes
    #: ``targets`` and ``n_active``; :meth:`set_epoch`, ``teacher_forcing`` and :meth:`seed_coins` exist.
    progressive = True

    def __init__(self, channels_in: int, schedule: ScaleSchedule, *, features: int = 48, token_dim: int = 96,
                 depth: int = 2, heads: int = 4, mlp_ratio: float = 2.0, token_max_factor: float = 0.25,
                 window: int = 8, conditioning: str = "next_scale", teacher_forcing: float = 1.0,
                 teacher_forcing_end: float = 0.0, teacher_forcing_epochs: float = 20, p_init: float = 0.01,
                 detach_condition: bool = True, activation: Union[str, type] = "ELU",
                 head_init_scale: float = 0.1, seed: Optional[int] = None, uncertainty: bool = False):
        super().__init__()
        # 0. hyperparameters and the scales this instance predicts
        _check_arguments(conditioning, channels_in, p_init)
        act = _activation_class(activation)
        self.channels_in = channels_in
        self.conditioning = conditioning
        self.conditioned = conditioning == "next_scale"
        self.detach_condition = detach_condition
        self.window = int(window)
        self.tf_schedule = (float(teacher_forcing), float(teacher_forcing_end), float(teacher_forcing_epochs))
        self.teacher_forcing = self.teacher_forcing_at(0)
        self.tf_generator = torch.Generator().manual_seed(seed) if seed is not None else None
        if conditioning == "single":
            schedule = ScaleSchedule(schedule.input_shape, [schedule.finest.factor],
                                     schedule.xextent, schedule.yextent)
        self.schedule = schedule
        factors = schedule.factors

        # 1. shared frame encoder, strides 1, 2, 4 whatever the scales, so that every variant
        #    (the 'single' ablation included) has the same receptive field
        self._n_levels = 3
        self.encoder = FrameEncoder(channels_in, features, self._n_levels, act)
        self._level = [0 if f >= 1 else min(self._n_levels - 1, int(math.floor(math.log2(1 / f) + 1e-9)))
                       for f in factors]
        self._pad_multiple = math.lcm(_size_multiple(factors), self.encoder.stride)

        # 2. token scales: coarse grids under the block-causal transformer
        n_tok = self.n_token_scales = _count_token_scales(factors, token_max_factor)
        # attention windows of the training frame, kept on frames of any size (see WindowLayout)
        self._win0 = WindowLayout.balanced_window(self._out_shape(0, self.padded_shape(schedule.input_shape)),
                                                  self.window) if n_tok else None
        self._ratios = [int(round(f / factors[0])) for f in factors[:n_tok]]
        widths = self.encoder.widths
        self.token_proj = nn.ModuleList(nn.Conv2d(widths[self._level[k]], token_dim, 1) for k in range(n_tok))
        self.token_cond = nn.ModuleList(nn.Conv2d(6, token_dim, 1)
                                        for _ in range(n_tok - 1 if self.conditioned else 0))
        if n_tok:
            # 3. scale embedding (VAR's lvl_embed) and a conv position code per token scale
            self.lvl_embed = nn.Embedding(n_tok, token_dim)
            nn.init.trunc_normal_(self.lvl_embed.weight, std=0.02)
            self.token_pos = nn.ModuleList(nn.Conv2d(token_dim, token_dim, 3, padding=1, groups=token_dim)
                                           for _ in range(n_tok))
            # 4. windowed block-causal transformer
            self.transformer = ScaleTransformer(token_dim, depth, heads, mlp_ratio, causal=self.conditioned)

        # 5. conv refinement of the finer / super-resolved scales
        self.refine = self._refine_stages(token_dim if n_tok else None, features, act)

        # 6. one 1x1 head per scale -> [p, phot, x, y, z, bg]
        head_in = [token_dim] * n_tok + [stage.width for stage in self.refine]
        self.heads = nn.ModuleList(nn.Conv2d(c, 6, 1) for c in head_in)

        self._init_weights(p_init, head_init_scale)
        self._add_uncertainty(bool(uncertainty), head_in[-1], head_init_scale)  # 7. optional sigma head

    # ------------------------------------------------------------------ construction helpers
    def _refine_stages(self, prev_width: Optional[int], features: int, act) -> nn.ModuleList:
        """The conv stages of the scales after the token scales: full width on the finest grid up to 1x;
        half width on super-resolved grids and on the intermediate grids, whose maps only condition the
        next scale (profiled: the intermediate 1x stage at full width cost as much as the whole finest
        stage)."""
        factors, widths = self.schedule.factors, self.encoder.widths
        stages = nn.ModuleList()
        for k in range(self.n_token_scales, len(factors)):
            final = k == len(factors) - 1
            width = features if (final and factors[k] <= 1) else max(8, features // 2)
            stages.append(RefineStage(widths[self._level[k]], prev_width, width, self.conditioned, act))
            prev_width = width
        return stages

    def _add_uncertainty(self, uncertainty: bool, width: int, head_init_scale: float) -> None:
        """``sigma_head`` (None without ``uncertainty``): a 1x1 conv on the finest hidden state -> 4 raw values per
        cell, starting small, at sigma = :data:`SIGMA_INIT` everywhere. Built after every other parameter, so that
        they draw the same initial values with or without it. ``sigma_scale``: post-hoc factors on the sigmas of
        phot, x, y, z in eval mode (the NLL trains the raw ones), fitted on a held-out simulated set by
        :func:`decode_var.evaluation.uncertainty.calibrate_sigma`; saved in ``model.pt``."""
        self.uncertainty = uncertainty
        self.sigma_head = None
        if not uncertainty:
            return
        self.sigma_head = nn.Conv2d(width, 4, 1)
        self.sigma_head.weight.data.mul_(head_init_scale)
        nn.init.constant_(self.sigma_head.bias, math.log(math.expm1(SIGMA_INIT - SIGMA_MIN)))  # softplus^-1
        self.register_buffer("sigma_scale", torch.ones(4))

    def _init_weights(self, p_init: float, head_init_scale: float) -> None:
        for name, m in self.named_modules():
            if name.startswith("transformer") or name.startswith("heads"):
                continue
            if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3) and m.groups == 1:
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
                nn.init.zeros_(m.bias)
        # the p bias starts at the expected share of occupied cells of each scale
        lam_finest = -math.log1p(-p_init)
        f_finest = self.schedule.finest.factor
        for head, f in zip(self.heads, self.schedule.factors):
            head.weight.data.mul_(head_init_scale)
            nn.init.zeros_(head.bias)
            p_k = -math.expm1(-lam_finest * (f_finest / f) ** 2)
            p_k = min(max(p_k, 1e-6), 1 - 1e-6)
            head.bias.data[0] = math.log(p_k) - math.log1p(-p_k)

    @classmethod
    def parse(cls, param) -> "VARMultiScale":
        """Build from a loaded param (:func:`decode_var.config.param.load_param`, which fills every default
        and checks every key, :func:`decode_var.config.param.validate`): ``HyperParameter.channels_in``,
        ``HyperParameter.arch_param.initial_features`` (where set), ``VAR.scales`` (via ScaleSchedule),
        ``VAR.model.*``, ``VAR.teacher_forcing.*`` and, for an empty ``p_init``, ``Simulation.emitter_av``.
        A param loaded by DECODE's own ``load_params`` works too, with or without a ``VAR`` section (its
        defaults are filled, :func:`decode_var.config.param.as_param`)."""
        param = as_param(param)
        hp, var = param.HyperParameter, param.VAR
        vm, tf = var.model, var.teacher_forcing
        arch = hp.get("arch_param")
        schedule = ScaleSchedule.parse(param)
        features = arch.get("initial_features") if arch is not None else None
        p_init = vm.p_init if vm.p_init is not None else default_p_init(param.Simulation.emitter_av, schedule)
        activation = (arch.get("activation") if arch is not None else None) or "ELU"
        return cls(hp.channels_in, schedule, features=int(features or vm.features), token_dim=int(vm.token_dim),
                   depth=int(vm.depth), heads=int(vm.heads), mlp_ratio=float(vm.mlp_ratio),
                   token_max_factor=float(vm.token_max_factor), window=int(vm.window), conditioning=vm.conditioning,
                   teacher_forcing=float(tf.start), teacher_forcing_end=float(tf.end),
                   teacher_forcing_epochs=float(tf.epochs), p_init=float(p_init), detach_condition=vm.detach_condition,
                   activation=activation, seed=int(var.seed), uncertainty=bool(vm.get("uncertainty") or False))

    # ------------------------------------------------------------------ teacher forcing
    def predicted_factors(self) -> list[float]:
        """Factors of the scales this instance predicts, coarse to fine: ``VAR.scales``, or the finest one
        only for ``conditioning='single'`` (what the targets and the loss must be built for)."""
        return list(self.schedule.factors)

    def teacher_forcing_at(self, epoch: float) -> float:
        """Teacher-forcing probability of the schedule at ``epoch`` (linear ramp, then constant)."""
        start, end, epochs = self.tf_schedule
        if epochs <= 0:
            return end
        return start + (end - start) * min(max(epoch, 0.0) / epochs, 1.0)

    def set_epoch(self, epoch: float) -> None:
        """Set ``teacher_forcing`` from the schedule (the trainer calls this at the start of every epoch,
        through :meth:`decode_var.training.tasks.SixChannelTask.start_epoch`)."""
        self.teacher_forcing = self.teacher_forcing_at(epoch)

    def seed_coins(self, seed: int) -> None:
        """Seed the teacher-forcing coins (``tf_generator``) for one training step: a function of
        (seed, epoch, step, rank), so that a resumed run draws the same coins."""
        if self.tf_generator is not None:
            self.tf_generator.manual_seed(seed ^ 0x5DEECE66D)

    def _teacher_coin(self, N: int, device) -> Optional[torch.Tensor]:
        """(N,) bool: which samples condition on ground truth; None when none can."""
        tf = float(self.teacher_forcing)
        if tf <= 0.0:
            return None
        if tf >= 1.0:
            return torch.ones(N, dtype=torch.bool, device=device)
        # one coin per sample; drawn on the CPU so that the stream is the same on every device
        return (torch.rand(N, generator=self.tf_generator) < tf).to(device)

    # ------------------------------------------------------------------ shapes
    def padded_shape(self, shape: Sequence[int]) -> tuple[int, int]:
        """Frame size the network runs on: the next multiple of the encoder stride and of every
        factor's denominator (frames are zero-padded at the high-x / high-y border, then cropped)."""
        m = self._pad_multiple
        return tuple(int(math.ceil(s / m) * m) for s in shape)

    def _out_shape(self, k: int, shape: Sequence[int]) -> Optional[tuple[int, int]]:
        f = Fraction(self.schedule[k].factor).limit_denominator(1024)
        cells = [f * s for s in shape]
        if any(c.denominator != 1 for c in cells):
            return None
        return int(cells[0]), int(cells[1])

    def _check_frames(self, frames_NCHW: torch.Tensor) -> None:
        if frames_NCHW.dim() != 4 or frames_NCHW.shape[1] != self.channels_in:
            raise ShapeError(f"VARMultiScale expects frames (N, {self.channels_in}, size_x, size_y) "
                             f"(HyperParameter.channels_in = {self.channels_in}); got {tuple(frames_NCHW.shape)}.")

    def _size_error(self, shape, ks) -> ShapeError:
        bad = [k for k in ks if self._out_shape(k, shape) is None]
        step = _size_multiple([self.schedule[k].factor for k in ks])
        return ShapeError(
            f"frame size {shape[0]} x {shape[1]} px does not fit the output scale(s) "
            f"{[self.schedule[k].factor for k in bad]}: factor x size must be a whole number of cells. "
            f"Frame sizes that work are multiples of {step} px.")

    # ------------------------------------------------------------------ forward
    def forward(self, frames_NCHW: torch.Tensor, targets: Optional[Sequence[torch.Tensor]] = None,
                n_active: Optional[int] = None):
        """Train mode: list of raw (N, 6, h_k, w_k) maps, k = 0 .. n_active - 1, p as logits.
        Eval mode: (N, 6, H', W') of the finest active scale with p in [0, 1].
        With ``uncertainty`` the finest scale's map has 10 channels, the standard deviations last.

        Args:
            frames_NCHW: (N, channels_in, size_x, size_y) frames (DECODE's scaled input).
            targets: optional per-scale ground truth (N, 6, h_k, w_k) in normalised units, for
                teacher forcing (used in train mode only; scales 0 .. n_active - 2 are read).
            n_active: number of coarsest scales to compute (default all); scales beyond it are
                not computed. With ``conditioning='single'`` there is one scale.
        """
        if self.training:
            return self.predict_scales(frames_NCHW, targets, n_active)
        return self.eval_output(self.predict_scales(frames_NCHW, None, n_active, only_last=True)[-1])

    def eval_output(self, logits_NChw: torch.Tensor) -> torch.Tensor:
        """The eval-mode map from a raw head map: p through a sigmoid, the other channels as they are
        (also used by the sparse inference path, :mod:`decode_var.nn.sparse`)."""
        return torch.cat([torch.sigmoid(logits_NChw[:, :1]), logits_NChw[:, 1:]], dim=1)

    def predict_scales(self, frames_NCHW: torch.Tensor, targets: Optional[Sequence[torch.Tensor]] = None,
                       n_active: Optional[int] = None, only_last: bool = False) -> list[torch.Tensor]:
        """Raw maps of scales 0 .. n_active - 1 (p as logits), in any mode. Teacher forcing applies
        when ``targets`` are given and the module is training. ``only_last``: only the last map
        must be croppable to the frame size (coarser ones are then returned on the padded grid)."""
        self._check_frames(frames_NCHW)
        n = len(self.schedule) if n_active is None else max(1, min(int(n_active), len(self.schedule)))
        N = frames_NCHW.shape[0]
        shape = tuple(frames_NCHW.shape[-2:])
        crop_ks = [n - 1] if only_last else list(range(n))
        if any(self._out_shape(k, shape) is None for k in crop_ks):
            raise self._size_error(shape, crop_ks)
        padded = self.padded_shape(shape)
        grids = [self._out_shape(k, padded) for k in range(n)]
        x = F.pad(frames_NCHW, (0, padded[1] - shape[1], 0, padded[0] - shape[0]))

        force = None
        gt = None
        if targets is not None and self.training and self.conditioned and n > 1:
            gt = self._padded_targets(targets, n - 1, N, shape, grids)
            force = self._teacher_coin(N, x.device)

        feats = self.encoder(x)
        outs: list[torch.Tensor] = []
        hidden = None

        n_tok = min(self.n_token_scales, n)
        if n_tok:
            hidden = self._predict_token_scales(n_tok, feats, grids, gt, force, outs, N, x.device)

        self._refine_scales(n_tok, n, feats, grids, hidden, outs, gt, force)
        return self._crop(outs, shape)

    def _refine_scales(self, k0: int, n: int, feats, grids, hidden, outs: list, gt=None, force=None) -> None:
        """Maps of the conv-refined scales ``k0 .. n - 1`` appended to ``outs`` (``hidden``: scale k0 - 1's
        hidden state; also the sparse inference path's dense fallback, :mod:`decode_var.nn.sparse`)."""
        for k in range(k0, n):
            stage = self.refine[k - self.n_token_scales]
            feat = feats[self._level[k]]
            if stage.conditioned:
                coarse, shift = recentre(self._condition_source(k, gt, force, outs), grids[k],
                                         self.schedule[k - 1].cell_size, self.schedule[k].cell_size)
                hidden = stage(feat, grids[k], hidden, coarse, shift)
            else:
                hidden = stage(feat, grids[k])
            outs.append(self._head(k, hidden))

    def _predict_token_scales(self, n_tok, feats, grids, gt, force, outs, N, device) -> torch.Tensor:
        """Maps of the token scales appended to ``outs``; returns the last one's hidden state. One
        transformer pass when no token input depends on a prediction, else scale by scale."""
        layout = WindowLayout(grids[0], self._ratios[:n_tok], self.window, device, win0=self._win0)
        parallel = (not self.conditioned) or n_tok == 1 or (force is not None and bool(force.all()))
        if parallel:
            tokens = [layout.partition(self._token_input(k, feats, grids, gt, force, outs), self._ratios[k])
                      for k in range(n_tok)]
            ys = self.transformer.forward_parallel(tokens, layout, N)
            for k in range(n_tok):
                hidden = layout.merge(ys[k], self._ratios[k], N)
                outs.append(self._head(k, hidden))
            return hidden
        cache = self.transformer.start_cache()
        for k in range(n_tok):
            t = layout.partition(self._token_input(k, feats, grids, gt, force, outs), self._ratios[k])
            hidden = layout.merge(self.transformer.forward_step(t, k, cache, layout, N), self._ratios[k], N)
            outs.append(self._head(k, hidden))
        return hidden

    def _head(self, k: int, hidden_NChw: torch.Tensor) -> torch.Tensor:
        """Raw map of scale ``k`` from its hidden state: the only place a head is applied (the sparse
        inference path, :mod:`decode_var.nn.sparse`, calls it on the cells it computes). (N, 6, h, w);
        (N, 10, h, w) at the finest scale with ``uncertainty``, channels 6..9 the standard deviations
        of phot, x, y, z in network units (> :data:`SIGMA_MIN`; in eval mode times ``sigma_scale``, the
        post-hoc calibration)."""
        out_N6hw = self.heads[k](hidden_NChw).float()
        if self.sigma_head is None or k != len(self.schedule) - 1:
            return out_N6hw
        sigma_N4hw = F.softplus(self.sigma_head(hidden_NChw).float()) + SIGMA_MIN
        if not self.training:
            sigma_N4hw = sigma_N4hw * self.sigma_scale.float().view(1, 4, 1, 1)
        return torch.cat([out_N6hw, sigma_N4hw], 1)

    def _crop(self, outs: list, shape) -> list:
        """Each scale's map cut to the frame's own grid (the model computed it on the padded one)."""
        cropped = []
        for k, o in enumerate(outs):
            size = self._out_shape(k, shape)
            cropped.append(o[..., :size[0], :size[1]] if size is not None and size != tuple(o.shape[-2:]) else o)
        return cropped

    def _token_input(self, k, feats, grids, gt, force, outs) -> torch.Tensor:
        t = self.token_proj[k](resample(feats[self._level[k]], grids[k]))
        t = t + self.lvl_embed.weight[k].to(t.dtype)[None, :, None, None]
        if self.conditioned and k > 0:
            t = t + self.token_cond[k - 1](self._condition(k, grids, gt, force, outs))
        return t + self.token_pos[k](t)

    def _condition(self, k: int, grids, gt, force, outs) -> torch.Tensor:
        """The map scale ``k`` is conditioned on: scale k-1 (prediction or ground truth) on grid k, in
        scale k's network units (x, y offsets in cells of scale k from each cell's centre)."""
        # offsets: cells of scale k-1 in, cells of scale k out (the units of scale k's own target)
        return recentre_upsample(self._condition_source(k, gt, force, outs), grids[k],
                                 self.schedule[k - 1].cell_size, self.schedule[k].cell_size)

    def _condition_source(self, k: int, gt, force, outs) -> torch.Tensor:
        """Scale k-1's map on its own grid (prediction, p through a sigmoid, or ground truth), in
        its network units."""
        if force is not None and bool(force.all()):
            src = gt[k - 1]
        else:
            logits = outs[k - 1]
            src = torch.cat([torch.sigmoid(logits[:, :1]), logits[:, 1:]], dim=1)
            if self.detach_condition:
                src = src.detach()
            if force is not None:
                src = torch.where(force[:, None, None, None], gt[k - 1], src)
        return src

    def _padded_targets(self, targets, n_needed, N, shape, grids) -> list[torch.Tensor]:
        if len(targets) < n_needed:
            raise ShapeError(f"teacher forcing needs targets for the {n_needed} coarsest scale(s), "
                             f"got {len(targets)}.")
        out = []
        for k in range(n_needed):
            t = targets[k]
            want = (N, 6) + self._out_shape(k, shape)
            if tuple(t.shape) != want:
                raise ShapeError(f"target of scale {k} ({self.schedule[k].name}) has shape {tuple(t.shape)}, "
                                 f"expected {want}.")
            g = grids[k]
            out.append(F.pad(t.float(), (0, g[1] - t.shape[-1], 0, g[0] - t.shape[-2])))
        return out

    # ------------------------------------------------------------------ checkpoints
    def _config(self) -> dict:
        return {"format": _EXTRA_STATE_FORMAT, "channels_in": self.channels_in,
                "factors": [float(f) for f in self.schedule.factors], "conditioning": self.conditioning,
                "uncertainty": self.uncertainty}

    def get_extra_state(self) -> dict:
        return self._config()

    def set_extra_state(self, state) -> None:
        if not isinstance(state, Mapping):
            raise CheckpointError("the checkpoint's VARMultiScale configuration record is unreadable; "
                                  "the file is not a VARMultiScale state_dict of this version.")
        mine = self._config()
        if state.get("format", 1) != mine["format"]:
            raise CheckpointError(
                f"checkpoint was written by an earlier decode-var (VARMultiScale format {state.get('format', 1)}, "
                f"this version reads format {mine['format']}): the units of the coarse-to-fine conditioning "
                "changed, so its weights would predict wrongly. Retrain the model with this version, or fit "
                "with the decode-var version it was trained with.")
        for key in ("channels_in", "factors", "conditioning", "uncertainty"):
            if state.get(key, False if key == "uncertainty" else mine[key]) != mine[key]:
                raise CheckpointError(
                    f"checkpoint was trained with {key} = {state.get(key, False)!r}, this model has {mine[key]!r}. "
                    f"Build the model from the param file the checkpoint was trained with "
                    f"(HyperParameter.channels_in, VAR.scales, VAR.model.conditioning, VAR.model.uncertainty).")


def default_p_init(emitter_av, schedule: ScaleSchedule) -> float:
    """Initial p per finest cell: the Poisson share of finest cells holding at least one emitter, for
    ``emitter_av`` emitters per frame (a range [low, high]: its mean); 0.01 without emitters."""
    if isinstance(emitter_av, (list, tuple)):
        emitter_av = sum(emitter_av) / len(emitter_av)
    cells = schedule.finest.img_shape[0] * schedule.finest.img_shape[1]
    return -math.expm1(-float(emitter_av) / cells) if emitter_av else 0.01
