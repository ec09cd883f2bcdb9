"""The one description of the output scales, read by the data path, the model and the loss.

A *scale* is an output grid laid over the same field of view as the input frame. It is given
relative to the input frame by a factor: 0.25 on a 40 x 40 px frame is a 10 x 10 grid whose cells
are 4 input px wide; 2.0 is an 80 x 80 grid whose cells are 0.5 input px wide (super-resolved).

Conventions (DECODE 0.10):

- Image axes follow DECODE: a frame tensor is indexed ``[..., x, y]``; ``img_shape[0]`` is the size
  along x.
- Coordinates are in *input* px. The field of view is ``xextent`` x ``yextent`` (DECODE's
  ``Simulation.psf_extent``, by default ``(-0.5, W - 0.5)``, so input pixel ``i`` is centred on
  ``i``). Every scale covers the same extent, so a cell of scale ``k`` is ``1 / factor_k`` input px.
- Physical units (the backend's target generators, post-processing): on every scale, the x and y
  target channels are offsets from the centre of the cell the emitter falls into, **in input px**.
  They lie in ``[-0.5/f, 0.5/f)`` for the central cell of a scale of factor ``f``.
- Network units (:class:`~decode_var.data.targets.TargetRescale`, model outputs, the maps finer scales
  are conditioned on): the same offsets divided by :attr:`Scale.cell_size`, i.e. **in cells of that
  scale**, in ``[-0.5, 0.5)`` for the central cell on every scale.
- z is in nm and photons are in photons on every scale. The background channel is in photons per
  **input** pixel on every scale, i.e. the background is resampled, not re-integrated: a coarse
  cell holds the mean, a fine cell the (nearest) value of the input pixel it lies in.
"""
from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import Iterator, Sequence

from decode_var.core.errors import ParamError


@dataclass(frozen=True)
class Scale:
    """One output grid.

    Attributes:
        index: position in the schedule, 0 = coarsest.
        factor: cells per input px along each axis (0.25, 0.5, 1, 2, ...).
        img_shape: grid size ``(size_x, size_y)`` in cells.
        xextent: field of view along x, in input px.
        yextent: field of view along y, in input px.
    """

    index: int
    factor: float
    img_shape: tuple[int, int]
    xextent: tuple[float, float]
    yextent: tuple[float, float]

    @property
    def cell_size(self) -> tuple[float, float]:
        """Cell size in input px, ``(along x, along y)``."""
        return ((self.xextent[1] - self.xextent[0]) / self.img_shape[0],
                (self.yextent[1] - self.yextent[0]) / self.img_shape[1])

    @property
    def name(self) -> str:
        return f"s{self.index}_{self.img_shape[0]}x{self.img_shape[1]}"


class ScaleSchedule:
    """Ordered scales, coarse to fine, over one input frame.

    Args:
        input_shape: input frame size ``(size_x, size_y)`` in px.
        factors: one factor per scale, strictly increasing. Each ``factor * size`` must be a whole
            number of cells, at least 1.
        xextent, yextent: field of view in input px; default ``(-0.5, size - 0.5)``.
    """

    def __init__(self, input_shape: Sequence[int], factors: Sequence[float],
                 xextent: Sequence[float] | None = None, yextent: Sequence[float] | None = None):
        if len(input_shape) != 2 or any(int(s) != s or s < 1 for s in input_shape):
            raise ParamError(f"Simulation.img_size must be two positive integers, got {list(input_shape)}.")
        self.input_shape = (int(input_shape[0]), int(input_shape[1]))
        xextent = tuple(float(v) for v in (xextent or (-0.5, self.input_shape[0] - 0.5)))
        yextent = tuple(float(v) for v in (yextent or (-0.5, self.input_shape[1] - 0.5)))
        if not factors:
            raise ParamError("VAR.scales is empty: give at least one factor, e.g. [0.25, 0.5, 1.0].")
        scales = []
        for i, f in enumerate(factors):
            if isinstance(f, bool) or not isinstance(f, (int, float)) or not f > 0:
                raise ParamError(f"VAR.scales[{i}] = {f!r} is not a positive number. "
                                 "Give factors relative to the input frame, e.g. [0.25, 0.5, 1.0, 2.0].")
            shape = []
            for size in self.input_shape:
                cells = Fraction(f).limit_denominator(1024) * size
                if cells.denominator != 1 or cells < 1:
                    fits = _fitting_factors(size)
                    raise ParamError(
                        f"VAR.scales[{i}] = {f} does not fit Simulation.img_size {list(self.input_shape)}: "
                        f"{f} x {size} px = {float(cells):g} cells is not a whole number >= 1. "
                        f"Factors that fit {size} px include {fits}.")
                shape.append(int(cells))
            scales.append(Scale(index=i, factor=float(f), img_shape=(shape[0], shape[1]),
                                xextent=xextent, yextent=yextent))
        for a, b in zip(scales, scales[1:]):
            if not b.factor > a.factor:
                raise ParamError(f"VAR.scales must be strictly increasing (coarse to fine); got "
                                 f"{[s.factor for s in scales]}.")
        self.scales: tuple[Scale, ...] = tuple(scales)
        self.xextent, self.yextent = xextent, yextent

    @classmethod
    def parse(cls, param, factors: Sequence[float] | None = None) -> "ScaleSchedule":
        """Build from a loaded param (``Simulation.img_size``, ``Simulation.psf_extent``) and ``factors``
        (default ``VAR.scales``; a model's own, :func:`decode_var.training.tasks.scale_factors`)."""
        ext = param.Simulation.psf_extent
        return cls(param.Simulation.img_size, param.VAR.scales if factors is None else factors,
                   xextent=ext[0] if ext else None, yextent=ext[1] if ext else None)

    def __len__(self) -> int:
        return len(self.scales)

    def __iter__(self) -> Iterator[Scale]:
        return iter(self.scales)

    def __getitem__(self, i: int) -> Scale:
        return self.scales[i]

    @property
    def finest(self) -> Scale:
        return self.scales[-1]

    @property
    def coarsest(self) -> Scale:
        return self.scales[0]

    @property
    def factors(self) -> tuple[float, ...]:
        return tuple(s.factor for s in self.scales)

    def index_of_factor(self, factor: float) -> int:
        """Index of the scale with this factor (e.g. 1.0, the input grid)."""
        for s in self.scales:
            if abs(s.factor - factor) < 1e-9:
                return s.index
        raise KeyError(f"no scale with factor {factor}; scales are {self.factors}")

    def __repr__(self) -> str:
        grids = ", ".join(f"{s.img_shape[0]}x{s.img_shape[1]}" for s in self.scales)
        return f"ScaleSchedule(input={self.input_shape[0]}x{self.input_shape[1]}, grids=[{grids}])"


def _fitting_factors(size: int) -> list:
    """A few factors that give a whole number of cells on ``size`` px (for error messages)."""
    out = [Fraction(d, size) for d in range(1, size + 1) if size % d == 0 and d < size][-3:]
    return [float(f) for f in out] + [1.0, 2.0, 4.0]
