"""6-channel training targets ``[p, phot, x, y, z, bg]`` and weight maps, on every scale.

The built-in :class:`UnifiedEmbeddingTarget` and :class:`SimpleWeight` follow DECODE 0.10's
classes of the same names (``decode.neuralfitter.target_generator`` / ``weight_generator``):

- target: p = 1 on the central cell of each emitter; phot, x, y, z copied to the
  ``roi_size x roi_size`` cells around it; x, y are offsets in px from each cell's centre;
  a background channel is appended;
- weight ('const'): p and bg weight 1 everywhere; phot/x/y/z weight 1 in each ROI, 0 on cells
  that the ROIs of two or more emitters share, central cells always kept.

:class:`MultiScaleTargets` builds the target and weight of each scale with the backend's
generators (DECODE's own with the ``decode`` backend) on that scale's grid, then rescales the
channels to the network's units (see :class:`TargetRescale`): phot / phot_max, z / z_max,
bg / bg_max, x and y offsets in cells of their scale.

Device: the built-in generators work on the device of the emitters (and background) they are given,
the simulator's ``Hardware.device_simulation``; their grids are copied there once. Nothing here draws
random numbers, and cells that several ROIs share are written once (:func:`last_write_wins`), so the
maps are the same on every run on every device.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from decode_var.core.emitters import EmitterSet
from decode_var.core.errors import ShapeError
from decode_var.core.scales import ScaleSchedule


def frame_grid(img_shape, xextent, yextent):
    """Bin edges and centres of a grid over the extent (float32, as DECODE computes them)."""
    bin_x = torch.linspace(float(xextent[0]), float(xextent[1]), steps=img_shape[0] + 1)
    bin_y = torch.linspace(float(yextent[0]), float(yextent[1]), steps=img_shape[1] + 1)
    ctr_x = (bin_x + (bin_x[1] - bin_x[0]) / 2)[:-1]
    ctr_y = (bin_y + (bin_y[1] - bin_y[0]) / 2)[:-1]
    return bin_x, bin_y, ctr_x, ctr_y


def last_write_wins(flat_index: torch.Tensor) -> torch.Tensor:
    """Mask keeping, for each repeated value of ``flat_index``, only its last occurrence.

    Writing ``t[idx] = v`` with repeated indices leaves a winner that depends on thread scheduling;
    writing only the masked entries gives the sequential result (the last one) on every run.
    """
    dev = flat_index.device
    if flat_index.numel() == 0:
        return torch.ones(0, dtype=torch.bool, device=dev)
    order = torch.arange(flat_index.numel(), device=dev)
    uniq, inverse = torch.unique(flat_index, return_inverse=True)
    last = torch.full((uniq.numel(),), -1, dtype=order.dtype, device=dev).scatter_reduce_(0, inverse, order, "amax")
    return last[inverse] == order


class UnifiedEmbeddingTarget:
    """DECODE's UnifiedEmbeddingTarget: (N, 5, sx, sy) ``[p, phot, x, y, z]`` (+ bg when given).

    Args:
        xextent, yextent: field of view in px (lower edge included, upper excluded).
        img_shape: grid size in cells.
        roi_size: odd ROI edge in cells.
        ix_low, ix_high: frame range (inclusive) that becomes the batch dimension.
    """

    def __init__(self, xextent, yextent, img_shape, roi_size: int, ix_low: Optional[int] = None,
                 ix_high: Optional[int] = None):
        self.xextent, self.yextent = tuple(xextent), tuple(yextent)
        self.img_shape = tuple(int(s) for s in img_shape)
        self.roi_size = int(roi_size)
        self.ix_low, self.ix_high = ix_low, ix_high
        self._bin_x, self._bin_y, self.bin_ctr_x, self.bin_ctr_y = frame_grid(self.img_shape, xextent, yextent)
        half = (self.roi_size - 1) // 2
        offsets = torch.arange(-half, half + 1)
        # x offset varies slowest, as in DECODE's meshgrid(ij) flattening
        self._roi_dx = offsets.repeat_interleave(len(offsets))
        self._roi_dy = offsets.repeat(len(offsets))
        self._grids = {}  # device -> grid tensors on it

    def grid(self, device) -> tuple[torch.Tensor, ...]:
        """(bin edges x, bin edges y in px, bin centres x, y in px, ROI offsets dx, dy in cells) on ``device``."""
        key = str(device)
        if key not in self._grids:
            self._grids[key] = tuple(t.to(device) for t in (self._bin_x, self._bin_y, self.bin_ctr_x, self.bin_ctr_y,
                                                           self._roi_dx, self._roi_dy))
        return self._grids[key]

    def filter(self, em: EmitterSet, ix_low: int, ix_high: int) -> EmitterSet:
        """Emitters on frames ix_low..ix_high (frame index shifted to start at 0) inside the field of view."""
        em = em.get_subset_frame(ix_low, ix_high, -ix_low)
        xyz = em.xyz_px
        inside = ((xyz[:, 0] >= self.xextent[0]) & (xyz[:, 0] < self.xextent[1])
                  & (xyz[:, 1] >= self.yextent[0]) & (xyz[:, 1] < self.yextent[1]))
        return em[inside]

    def bin_index(self, xy: torch.Tensor):
        """Cell indices (long) along x and y of positions ``xy`` (E, 2+) in px."""
        bin_x, bin_y = self.grid(xy.device)[:2]
        x_ix = torch.searchsorted(bin_x, xy[:, 0].contiguous(), right=True) - 1
        y_ix = torch.searchsorted(bin_y, xy[:, 1].contiguous(), right=True) - 1
        return x_ix, y_ix

    def roi_cells(self, frame_ix, x_ix, y_ix):
        """Cells of each emitter's ROI inside the grid: (frame, x, y, emitter index), emitter-major."""
        roi_dx, roi_dy = self.grid(x_ix.device)[4:]
        n_roi = roi_dx.numel()
        emitter = torch.arange(x_ix.numel(), device=x_ix.device).repeat_interleave(n_roi)
        xr = x_ix.repeat_interleave(n_roi) + roi_dx.repeat(x_ix.numel())
        yr = y_ix.repeat_interleave(n_roi) + roi_dy.repeat(y_ix.numel())
        fr = frame_ix.repeat_interleave(n_roi)
        keep = (xr >= 0) & (xr < self.img_shape[0]) & (yr >= 0) & (yr < self.img_shape[1])
        return fr[keep], xr[keep], yr[keep], emitter[keep]

    def _bounds(self, ix_low, ix_high):
        ix_low = self.ix_low if ix_low is None else ix_low
        ix_high = self.ix_high if ix_high is None else ix_high
        if ix_low is None or ix_high is None:
            raise ValueError("Frame range ix_low..ix_high is not set.")
        return ix_low, ix_high

    def forward(self, em: EmitterSet, bg: Optional[torch.Tensor] = None, ix_low: Optional[int] = None,
                ix_high: Optional[int] = None) -> torch.Tensor:
        """Target of shape (N, 5, sx, sy), or (N, 6, sx, sy) with ``bg`` of shape (N, sx, sy), on em's device.

        phot in photons, x and y offsets in px from each cell's centre, z in nm, bg in photons / px.
        """
        ix_low, ix_high = self._bounds(ix_low, ix_high)
        em = self.filter(em, ix_low, ix_high)
        n_frames = ix_high - ix_low + 1
        xyz = em.xyz_px
        x_ix, y_ix = self.bin_index(xyz)
        fr, xr, yr, e = self.roi_cells(em.frame_ix, x_ix, y_ix)
        # cells that several ROIs cover get the values of the last emitter, as a sequential write gives
        # them; an index_put with repeated indices picks a thread-dependent winner on large batches
        last = last_write_wins((fr * self.img_shape[0] + xr) * self.img_shape[1] + yr)
        fr, xr, yr, e = fr[last], xr[last], yr[last], e[last]
        ctr_x, ctr_y = self.grid(xyz.device)[2:4]
        target_N5HW = torch.zeros(n_frames, 5, *self.img_shape, device=xyz.device)
        target_N5HW[em.frame_ix, 0, x_ix, y_ix] = 1.0
        target_N5HW[fr, 1, xr, yr] = em.phot[e]
        target_N5HW[fr, 2, xr, yr] = xyz[e, 0] - ctr_x[xr]
        target_N5HW[fr, 3, xr, yr] = xyz[e, 1] - ctr_y[yr]
        target_N5HW[fr, 4, xr, yr] = xyz[e, 2]
        if bg is None:
            return target_N5HW
        if bg.shape != (n_frames, *self.img_shape):
            raise ShapeError(f"bg must be (N={n_frames}, {self.img_shape[0]}, {self.img_shape[1]}), got {tuple(bg.shape)}.")
        return torch.cat([target_N5HW, bg.unsqueeze(1).to(target_N5HW.dtype)], 1)

    __call__ = forward


class SimpleWeight:
    """DECODE's SimpleWeight in 'const' mode: (N, 6, sx, sy) weights for a 6-channel target."""

    def __init__(self, xextent, yextent, img_shape, roi_size: int, weight_mode: str = "const",
                 ix_low: Optional[int] = None, ix_high: Optional[int] = None):
        if weight_mode != "const":
            raise ValueError(f"Only weight_mode 'const' is supported, got {weight_mode!r}.")
        self.target_equivalent = UnifiedEmbeddingTarget(xextent, yextent, img_shape, roi_size, ix_low, ix_high)

    def forward(self, em: EmitterSet, target_N6HW: torch.Tensor, ix_low: Optional[int] = None,
                ix_high: Optional[int] = None) -> torch.Tensor:
        tg = self.target_equivalent
        ix_low, ix_high = tg._bounds(ix_low, ix_high)
        if target_N6HW.dim() != 4 or target_N6HW.size(1) != 6:
            raise ShapeError(f"SimpleWeight needs a (N, 6, H, W) target, got {tuple(target_N6HW.shape)}.")
        if target_N6HW.size(0) != ix_high - ix_low + 1:
            raise ShapeError(f"Target has {target_N6HW.size(0)} frames, frame range {ix_low}..{ix_high} has "
                             f"{ix_high - ix_low + 1}.")
        em = tg.filter(em, ix_low, ix_high)
        weight_N6HW = torch.zeros_like(target_N6HW)
        weight_N6HW[:, [0, 5]] = 1.0
        x_ix, y_ix = tg.bin_index(em.xyz_px)
        fr, xr, yr, _ = tg.roi_cells(em.frame_ix, x_ix, y_ix)
        roi_NHW = target_N6HW.new_zeros(target_N6HW.size(0), *tg.img_shape)
        roi_NHW[fr, xr, yr] = 1.0
        if fr.numel():
            cells, count = torch.stack([fr, xr, yr], 1).unique(dim=0, return_counts=True)
            shared = cells[count >= 2]
            roi_NHW[shared[:, 0], shared[:, 1], shared[:, 2]] = 0.0
        roi_NHW[em.frame_ix, x_ix, y_ix] = 1.0
        weight_N6HW[:, 1:5] = roi_NHW.unsqueeze(1)
        return weight_N6HW

    __call__ = forward


def resample_bg(bg_NHW: torch.Tensor, img_shape) -> torch.Tensor:
    """Background (photons / input px) on another grid: mean over coarse cells, nearest on fine ones."""
    if tuple(bg_NHW.shape[-2:]) == tuple(img_shape):
        return bg_NHW
    x = bg_NHW.unsqueeze(1)
    if img_shape[0] <= bg_NHW.size(-2) and img_shape[1] <= bg_NHW.size(-1):
        return F.adaptive_avg_pool2d(x, img_shape).squeeze(1)
    return F.interpolate(x, size=tuple(img_shape), mode="nearest").squeeze(1)


class TargetRescale:
    """Physical units -> network units (DECODE's ParameterListRescale, extended to several scales).

    phot / phot_max, z / z_max, bg / bg_max as in DECODE; x and y offsets are divided by the cell
    size of their scale (input px per cell), so on every scale the network sees offsets in cells,
    within [-roi_size / 2, roi_size / 2], whatever the grid. On the 1x grid this is the px offset.
    """

    def __init__(self, phot_max: float, z_max: float, bg_max: float):
        self.phot_max, self.z_max, self.bg_max = float(phot_max), float(z_max), float(bg_max)

    @classmethod
    def parse(cls, param):
        return cls(param.Scaling.phot_max, param.Scaling.z_max, param.Scaling.bg_max)

    def _scale_6(self, cell_size, like: torch.Tensor) -> torch.Tensor:
        cx, cy = cell_size
        return torch.tensor([1.0, self.phot_max, cx, cy, self.z_max, self.bg_max],
                            device=like.device).to(like)[None, :, None, None]

    def forward(self, x_N6HW: torch.Tensor, cell_size=(1.0, 1.0)) -> torch.Tensor:
        """Physical (photons, px offsets, nm, photons / px) -> network units."""
        return x_N6HW / self._scale_6(cell_size, x_N6HW)

    def inverse(self, x_N6HW: torch.Tensor, cell_size=(1.0, 1.0)) -> torch.Tensor:
        """Network units -> photons, px offsets, nm, photons / px."""
        return x_N6HW * self._scale_6(cell_size, x_N6HW)


class MultiScaleTargets:
    """Targets and weights of every scale, built by the backend's generators on each scale's grid.

    Args:
        schedule: the scales.
        backend: a :class:`decode_var.backend.Backend` (DECODE's generators or the built-in ones).
        roi_size: ROI edge in cells (``HyperParameter.target_roi_size``), the same on every scale.
        rescale: physical -> network units; None keeps physical units.
        photon_min: emitters with fewer photons are not labelled (``emitter_label_photon_min``).
    """

    def __init__(self, schedule: ScaleSchedule, backend, roi_size: int, rescale: Optional[TargetRescale] = None,
                 photon_min: Optional[float] = None):
        self.schedule = schedule
        self.backend = backend
        self.rescale = rescale
        self.photon_min = photon_min
        self._gens = [(backend.target_generator(s, roi_size), backend.weight_generator(s, roi_size)) for s in schedule]

    @classmethod
    def parse(cls, param, backend, schedule: Optional[ScaleSchedule] = None):
        """From the param; ``schedule``: the scales to make targets for (default: ``VAR.scales``'s)."""
        return cls(schedule or ScaleSchedule.parse(param), backend, param.HyperParameter.target_roi_size,
                   rescale=TargetRescale.parse(param), photon_min=param.HyperParameter.emitter_label_photon_min)

    def forward(self, em: EmitterSet, bg_NHW: torch.Tensor, n_frames: int):
        """Targets and weights for frames 0..n_frames-1.

        Args:
            em: built-in EmitterSet, xy in px, frame_ix = batch index.
            bg_NHW: background in photons / input px on the input grid.
            n_frames: batch size N.

        Returns:
            (targets, weights): lists over scales (coarse to fine) of (N, 6, sx_k, sy_k) tensors.
        """
        if self.photon_min is not None and len(em):
            em = em[em.phot >= self.photon_min]
        native = self.backend.to_native(em)
        targets, weights = [], []
        for scale, (tgen, wgen) in zip(self.schedule, self._gens):
            bg_k = resample_bg(bg_NHW, scale.img_shape)
            target = tgen.forward(native, None, 0, n_frames - 1)
            target = torch.cat([target, bg_k.unsqueeze(1).to(target.dtype)], 1)
            weight = wgen.forward(native, target, 0, n_frames - 1)
            if self.rescale is not None:
                target = self.rescale.forward(target, scale.cell_size)
            targets.append(target)
            weights.append(weight)
        return targets, weights

    __call__ = forward
