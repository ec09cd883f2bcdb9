"""Post-processing: 6-channel output maps -> EmitterSet (DECODE 0.10 conventions).

DECODE chains ``InverseParamListRescale -> Offset2Coordinate -> LookUp/SpatialIntegration``. Here the
engine does the rescaling, and the offset-to-coordinate step is part of the post-processing, because
the output grid may differ from the input frame (coarse or super-resolved scales):

- ``output_N6HW`` is in physical units: p in [0, 1] (after the sigmoid), photons, x/y offsets **in
  input px** from the centre of the output cell, z in nm, bg in photons / px.
- Cell centres are computed on the output grid (``img_shape`` cells over ``xextent`` x ``yextent``, in
  input px), exactly as DECODE's ``frame_grid`` does, so for the 1x grid the result equals DECODE's
  ``Offset2Coordinate`` + post-processing bit for bit.
- Positions come out in input px; with ``xy_unit='nm'`` x and y are multiplied by ``px_size``.
- ``frame_ix`` of an emitter is the batch index of its map (the caller adds the batch's first frame).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import torch

from decode_var.core.emitters import EmitterSet
from decode_var.core.errors import ParamError, ShapeError
from decode_var.core.scales import ScaleSchedule
from decode_var.data.targets import frame_grid  # one grid definition for targets and post-processing

__all__ = ["LookUpPostProcessing", "SpatialIntegration", "PostSettings", "build", "parse", "bin_centres",
           "duplicate_cells"]


def bin_centres(xextent: Sequence[float], yextent: Sequence[float], img_shape: Sequence[int]):
    """Cell centres of a grid of ``img_shape`` cells over the extents.

    Computed in float32 the same way as DECODE's ``frame_grid`` (edges by ``linspace``, centre = edge +
    half the first cell width), so the centres are bit-identical to DECODE's.

    Returns:
        (ctr_x (img_shape[0],), ctr_y (img_shape[1],)) in input px.
    """
    _, _, ctr_x, ctr_y = frame_grid([int(s) for s in img_shape], xextent, yextent)
    return ctr_x, ctr_y


def duplicate_cells(active_NHW: torch.Tensor, p_NHW: torch.Tensor, x_NHW: torch.Tensor, y_NHW: torch.Tensor,
                    merge_px: float) -> torch.Tensor:
    """(N, H, W) bool: active cells that repeat a neighbour's emitter.

    A network unsure which of two neighbouring cells holds an emitter near their border can give both a high p
    and point both offsets at the same spot; DECODE's split rule (a non-maximum above ``split_th`` is a second
    emitter) then reports it twice, a few hundredths of a px apart. A cell is such a repeat when one of its 8
    neighbours is active, its predicted position (``x_NHW``, ``y_NHW``: cell centre + offset, input px) lies
    within ``merge_px`` of this cell's, and its raw p is higher (equal: the neighbour earlier in row-major
    order). Of a group of repeats the most probable cell stays.
    """
    H, W = active_NHW.shape[-2:]
    pad = (1, 1, 1, 1)
    nb_active = torch.nn.functional.pad(active_NHW, pad, value=False)
    nb_p = torch.nn.functional.pad(p_NHW, pad, value=float("-inf"))
    nb_x = torch.nn.functional.pad(x_NHW, pad, value=float("nan"))
    nb_y = torch.nn.functional.pad(y_NHW, pad, value=float("nan"))
    repeat = torch.zeros_like(active_NHW)
    for dr in (-1, 0, 1):
        for dc in (-1, 0, 1):
            if dr == dc == 0:
                continue
            sl = (Ellipsis, slice(1 + dr, 1 + dr + H), slice(1 + dc, 1 + dc + W))
            near = (nb_x[sl] - x_NHW) ** 2 + (nb_y[sl] - y_NHW) ** 2 < merge_px ** 2
            wins = (nb_p[sl] > p_NHW) | ((nb_p[sl] == p_NHW) & ((dr, dc) < (0, 0)))
            repeat |= nb_active[sl] & near & wins
    return repeat & active_NHW


class LookUpPostProcessing:
    """Threshold the detection channel and read the other channels at the active cells.

    Args:
        raw_th: cells with ``p >= raw_th`` become emitters.
        xy_unit: 'px' or 'nm' for the returned positions.
        px_size: (2,) nm / px; required for ``xy_unit='nm'`` and stored in the EmitterSet.
        pphotxyzbg_mapping: channel index of p, phot, x, y, z, bg in the output (negative allowed).
        photxyz_sigma_mapping: channel index of the phot, x, y, z uncertainties (4 ints) or None.
        xextent, yextent: field of view in input px (DECODE's ``TestSet.frame_extent``); default
            ``(-0.5, size - 0.5)`` of the output grid size, i.e. the 1x grid.
        img_shape: output grid size (cells along x, y). None: taken from the output at forward time
            (then the extents must be given for any grid other than 1x).
        merge_px: input px; an active cell whose predicted position lies within ``merge_px`` of that of an
            active neighbouring cell (3 x 3) with a higher p is the same emitter found twice, and is dropped
            (:func:`duplicate_cells`); 0 = none, as DECODE.
    """

    def __init__(self, raw_th: float, xy_unit: str = "px", px_size=None,
                 pphotxyzbg_mapping: Sequence[int] = (0, 1, 2, 3, 4, 5),
                 photxyz_sigma_mapping: Optional[Sequence[int]] = None,
                 xextent: Optional[Sequence[float]] = None, yextent: Optional[Sequence[float]] = None,
                 img_shape: Optional[Sequence[int]] = None, merge_px: float = 0.0):
        if not 0.0 <= float(raw_th) <= 1.0:
            raise ParamError(f"PostProcessingParam.raw_th = {raw_th} must lie in [0, 1].")
        if xy_unit not in ("px", "nm"):
            raise ParamError(f"xy_unit must be 'px' or 'nm', got {xy_unit!r}.")
        if xy_unit == "nm" and px_size is None:
            raise ParamError("xy_unit='nm' needs px_size: set Camera.px_size in the param file.")
        if len(pphotxyzbg_mapping) != 6:
            raise ParamError(f"pphotxyzbg_mapping needs 6 channel indices (p, phot, x, y, z, bg), "
                             f"got {list(pphotxyzbg_mapping)}.")
        if photxyz_sigma_mapping is not None and len(photxyz_sigma_mapping) != 4:
            raise ParamError(f"photxyz_sigma_mapping needs 4 channel indices (phot, x, y, z sigma), "
                             f"got {list(photxyz_sigma_mapping)}.")
        self.raw_th = float(raw_th)
        self.xy_unit = xy_unit
        self.px_size = None if px_size is None else torch.as_tensor(px_size, dtype=torch.float32)
        self.pphotxyzbg_mapping = tuple(int(c) for c in pphotxyzbg_mapping)
        self.photxyz_sigma_mapping = None if photxyz_sigma_mapping is None else tuple(
            int(c) for c in photxyz_sigma_mapping)
        self.xextent = None if xextent is None else tuple(float(v) for v in xextent)
        self.yextent = None if yextent is None else tuple(float(v) for v in yextent)
        self.img_shape = None if img_shape is None else tuple(int(s) for s in img_shape)
        self.merge_px = float(merge_px)
        self._ctr_cache = {}

    @classmethod
    def parse(cls, param, scale=None, **kwargs):
        """From ``PostProcessingParam.raw_th`` and ``Camera.px_size``, on the output grid ``scale`` (a
        :class:`decode_var.core.scales.Scale`; default: the finest of the param's
        :class:`~decode_var.core.scales.ScaleSchedule`, the one description of every grid)."""
        return cls.on_grid(PostSettings.parse(param), scale or ScaleSchedule.parse(param).finest, **kwargs)

    @classmethod
    def on_grid(cls, settings: "PostSettings", scale, **kwargs):
        """With ``settings`` (parsed once, :class:`PostSettings`) on the output grid ``scale``."""
        kw = dict(raw_th=settings.raw_th, xy_unit="px", px_size=settings.px_size, xextent=scale.xextent,
                  yextent=scale.yextent, img_shape=scale.img_shape, merge_px=settings.merge_px)
        kw.update(kwargs)
        return cls(**kw)

    # -------------------------------------------------------------------------------------------
    def _centres(self, shape_xy, device):
        if self.img_shape is not None and tuple(shape_xy) != self.img_shape:
            raise ShapeError(f"Post-processing expects output maps of {self.img_shape[0]} x {self.img_shape[1]} "
                             f"cells, got {shape_xy[0]} x {shape_xy[1]}. Build it with the img_shape of the "
                             "finest output scale.")
        key = (tuple(shape_xy), str(device))
        if key not in self._ctr_cache:
            xext = self.xextent or (-0.5, shape_xy[0] - 0.5)
            yext = self.yextent or (-0.5, shape_xy[1] - 0.5)
            ctr_x, ctr_y = bin_centres(xext, yext, shape_xy)
            self._ctr_cache[key] = (ctr_x.to(device), ctr_y.to(device))
        return self._ctr_cache[key]

    def _check(self, output: torch.Tensor):
        if output.dim() != 4:
            raise ShapeError(f"Post-processing expects (N, C, H, W) output, got {tuple(output.shape)}.")
        n_ch = output.size(1)
        used = self.pphotxyzbg_mapping + (self.photxyz_sigma_mapping or ())
        if any(not -n_ch <= c < n_ch for c in used):
            raise ShapeError(f"Output has {n_ch} channels but the channel mapping uses {list(used)}.")

    def _detection(self, p_NHW: torch.Tensor) -> torch.Tensor:
        """Detection map to threshold; the look-up uses p as is."""
        return p_NHW

    def forward(self, output_N6HW: torch.Tensor) -> EmitterSet:
        """Output maps (N, C, H, W) in physical units -> EmitterSet (frame_ix = batch index)."""
        self._check(output_N6HW)
        with torch.no_grad():
            mapped = output_N6HW[:, list(self.pphotxyzbg_mapping)]
            p_NHW = self._detection(mapped[:, 0])
            active_NHW = p_NHW >= self.raw_th
            ctr_x, ctr_y = self._centres(output_N6HW.shape[-2:], output_N6HW.device)
            if self.merge_px > 0:
                active_NHW = active_NHW & ~duplicate_cells(active_NHW, mapped[:, 0], ctr_x[:, None] + mapped[:, 2],
                                                           ctr_y[None, :] + mapped[:, 3], self.merge_px)
            # nonzero() walks (batch, x, y) in row-major order, which fixes the emitter order as in DECODE.
            ix = active_NHW.nonzero(as_tuple=True)
            feat_CE = mapped[:, 1:].permute(1, 0, 2, 3)[:, active_NHW]  # (5, E): phot, x, y, z, bg
            x = ctr_x[ix[1]] + feat_CE[1]
            y = ctr_y[ix[2]] + feat_CE[2]
            xyz = torch.stack([x, y, feat_CE[3]], 1).cpu()
            kw = {}
            if self.photxyz_sigma_mapping is not None:
                sig_CE = output_N6HW[:, list(self.photxyz_sigma_mapping)].permute(1, 0, 2, 3)[:, active_NHW]
                kw["phot_sig"] = sig_CE[0].cpu()
                kw["xyz_sig"] = sig_CE[1:4].t().cpu()
            if self.xy_unit == "nm":
                xyz[:, :2] = xyz[:, :2] * self.px_size
                if "xyz_sig" in kw:
                    kw["xyz_sig"][:, :2] = kw["xyz_sig"][:, :2] * self.px_size
            return EmitterSet(xyz=xyz, phot=feat_CE[0].cpu(), frame_ix=ix[0].cpu(), prob=p_NHW[active_NHW].cpu(),
                              bg=feat_CE[4].cpu(), xy_unit=self.xy_unit, px_size=self.px_size, **kw)

    __call__ = forward


class SpatialIntegration(LookUpPostProcessing):
    """DECODE's spatial integration (a non-maximum suppression) followed by the look-up.

    The detection map is aggregated before thresholding:

    1. local maxima: cells equal to the 3x3 max-pool of ``p`` clipped to ``p > raw_th``;
    2. each local maximum gets the sum of p over itself and its 4 edge neighbours (no diagonals);
    3. cells that are not local maxima but have ``p > split_th`` (0.6) also get that sum, so two emitters
       in adjacent cells are both kept;
    4. the two maps are combined by ``p_aggregation``: 'norm_sum' (sum clamped to [0, 1], DECODE's
       default), 'sum', 'max' or a callable ``f(p1, p2)``.

    The aggregated value is what is thresholded with ``raw_th`` and returned as ``prob``.
    Other arguments as :class:`LookUpPostProcessing`. Unlike DECODE, the input tensor is not modified.

    On a super-resolved grid (cells smaller than an input px along both axes) an emitter's p mass
    spreads over up to 2 x 2 cells, none of which need pass ``raw_th``: there every local maximum of
    p (3 x 3) is a candidate and steps 2-3 sum the whole 3 x 3 box (diagonals included). On 1 px
    cells and coarser the steps are DECODE's, bit for bit.
    """

    split_th = 0.6

    def __init__(self, raw_th: float, xy_unit: str = "px", px_size=None,
                 pphotxyzbg_mapping: Sequence[int] = (0, 1, 2, 3, 4, 5),
                 photxyz_sigma_mapping: Optional[Sequence[int]] = None,
                 p_aggregation: Union[str, Callable] = "norm_sum",
                 xextent: Optional[Sequence[float]] = None, yextent: Optional[Sequence[float]] = None,
                 img_shape: Optional[Sequence[int]] = None, merge_px: float = 0.0):
        super().__init__(raw_th=raw_th, xy_unit=xy_unit, px_size=px_size, pphotxyzbg_mapping=pphotxyzbg_mapping,
                         photxyz_sigma_mapping=photxyz_sigma_mapping, xextent=xextent, yextent=yextent,
                         img_shape=img_shape, merge_px=merge_px)
        self.p_aggregation = self._aggregation(p_aggregation)

    @staticmethod
    def _aggregation(p_aggregation) -> Callable:
        if callable(p_aggregation):
            return p_aggregation
        table = {"sum": torch.add, "max": torch.maximum,
                 "norm_sum": lambda a, b: torch.clamp(a + b, 0.0, 1.0)}
        if p_aggregation not in table:
            raise ParamError(f"p_aggregation {p_aggregation!r} is unknown; use one of {sorted(table)} or a callable.")
        return table[p_aggregation]

    def _detection(self, p_NHW: torch.Tensor) -> torch.Tensor:
        ext = (self.xextent, self.yextent)
        sub_pixel = None not in ext and all((e[1] - e[0]) / n < 1 - 1e-9 for e, n in zip(ext, p_NHW.shape[-2:]))
        return self.integrate(p_NHW, self.raw_th, self.split_th, self.p_aggregation, sub_pixel)

    @staticmethod
    def integrate(p_NHW: torch.Tensor, raw_th: float, split_th: float, aggregation: Callable,
                  sub_pixel: bool = False) -> torch.Tensor:
        """Aggregated detection map (N, H, W); see the class docstring for the steps."""
        p_N1HW = p_NHW.unsqueeze(1)
        if sub_pixel:
            is_max = ((p_N1HW == torch.nn.functional.max_pool2d(p_N1HW, 3, stride=1, padding=1))
                      & (p_N1HW > 0)).to(p_NHW.dtype)
        else:
            candidates = torch.where(p_N1HW > raw_th, p_N1HW, torch.zeros_like(p_N1HW))
            is_max = (p_N1HW == torch.nn.functional.max_pool2d(candidates, 3, stride=1, padding=1)).to(p_NHW.dtype)
        cross = torch.tensor([[1.0 * sub_pixel, 1.0, 1.0 * sub_pixel], [1.0, 1.0, 1.0],
                              [1.0 * sub_pixel, 1.0, 1.0 * sub_pixel]], dtype=p_NHW.dtype,
                             device=p_NHW.device).view(1, 1, 3, 3)
        local_sum = torch.nn.functional.conv2d(p_N1HW, cross, padding=1)
        # Comparing p (not the clipped map) with the pool is DECODE's choice; it matters only for cells at 0.
        rest = p_N1HW * (1 - is_max)
        is_split = (rest > split_th).to(p_NHW.dtype)
        out = aggregation(is_max * local_sum, is_split * local_sum)
        return out.squeeze(1)


_PP_CLASSES = {"SpatialIntegration": SpatialIntegration, "NMS": SpatialIntegration, "LookUp": LookUpPostProcessing}


@dataclass(frozen=True)
class PostSettings:
    """The post-processing of a run, parsed once from the param (:meth:`parse`): ``PostProcessing`` (a name of
    :data:`_PP_CLASSES`, or None: no post-processing, DECODE then fits no emitters), ``PostProcessingParam.raw_th``
    and ``Camera.px_size`` (nm per px, x = first image axis). :func:`build` makes it for an output grid."""

    name: Optional[str]
    raw_th: float
    px_size: Optional[tuple]
    merge_px: float = 0.0  #: ``VAR.merge_px`` (:func:`duplicate_cells`)

    @classmethod
    def parse(cls, param) -> "PostSettings":
        name = getattr(param, "PostProcessing", None)
        if name not in (None, "") and name not in _PP_CLASSES:
            raise ParamError(f"PostProcessing = {name!r} is unknown; use SpatialIntegration, LookUp or leave it empty.")
        px = param.Camera.px_size
        return cls(name or None, param.PostProcessingParam.raw_th, None if px is None else tuple(px),
                   float(getattr(getattr(param, "VAR", None), "merge_px", None) or 0.0))


def build(settings: PostSettings, scale):
    """The post-processing of ``settings`` for the output grid ``scale`` (a :class:`decode_var.core.scales.Scale`),
    or None when it has none."""
    return None if settings.name is None else _PP_CLASSES[settings.name].on_grid(settings, scale)


def parse(param, scale=None):
    """Post-processing for the output grid ``scale`` (a :class:`decode_var.core.scales.Scale`), or None.

    None when ``param.PostProcessing`` is empty (DECODE then fits no emitters). Without ``scale``: the
    finest scale of the param's :class:`~decode_var.core.scales.ScaleSchedule`.
    """
    return build(PostSettings.parse(param), scale or ScaleSchedule.parse(param).finest)
