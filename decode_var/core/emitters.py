"""Built-in emitter-set container with DECODE 0.10's field names and units.

Only the fields decode-var uses are kept. With the ``decode`` backend, DECODE's own
``decode.generic.emitter.EmitterSet`` is used instead; :func:`to_builtin` and the backend's
``to_native`` convert between the two.
"""
from __future__ import annotations

from typing import Iterable, Optional, Sequence

import torch

from decode_var.core.errors import ShapeError

_OPTIONAL = ("prob", "bg", "xyz_cr", "phot_cr", "bg_cr", "xyz_sig", "phot_sig", "bg_sig")


def as_xyz3(xyz, dtype: torch.dtype, what: str) -> torch.Tensor:
    """(E, 3) positions from (E, 2) or (E, 3) ones (x, y in px, z in nm; a missing z is 0)."""
    xyz = torch.as_tensor(xyz, dtype=dtype)
    if xyz.dim() != 2 or xyz.size(1) not in (2, 3):
        raise ShapeError(f"{what} must be (E, 2) or (E, 3), got {tuple(xyz.shape)}.")
    if xyz.size(1) == 2:
        xyz = torch.cat([xyz, torch.zeros_like(xyz[:, :1])], 1)
    return xyz


class EmitterSet:
    """A set of emitters.

    Args:
        xyz: (E, 3) or (E, 2) positions. x, y in ``xy_unit`` (px or nm), z always in nm.
        phot: (E,) photon counts (photons).
        frame_ix: (E,) frame index of each emitter.
        id: (E,) emitter identity (the same id on consecutive frames for a blinking emitter).
        prob: (E,) detection probability (predictions only).
        bg: (E,) background at the emitter (photons / px).
        xyz_cr, phot_cr, bg_cr: Cramér-Rao lower bounds (variances) in ``xy_unit``^2, photons^2.
        xyz_sig, phot_sig, bg_sig: predicted uncertainties (standard deviations).
        xy_unit: 'px' or 'nm'.
        px_size: (2,) nm per px along x and y; needed to convert between px and nm.
    """

    def __init__(self, xyz, phot, frame_ix, id=None, prob=None, bg=None, xyz_cr=None, phot_cr=None,
                 bg_cr=None, xyz_sig=None, phot_sig=None, bg_sig=None, xy_unit: str = "px",
                 px_size: Optional[Sequence[float]] = None):
        xyz = as_xyz3(xyz, torch.float32, "EmitterSet xyz")
        n = xyz.size(0)
        self.xyz = xyz
        self.phot = self._vec(phot, n, "phot", torch.float32)
        self.frame_ix = self._vec(frame_ix, n, "frame_ix", torch.long)
        self.id = self._vec(id if id is not None else torch.arange(n, device=xyz.device), n, "id", torch.long)
        for name, value in zip(_OPTIONAL, (prob, bg, xyz_cr, phot_cr, bg_cr, xyz_sig, phot_sig, bg_sig)):
            if value is not None:
                value = torch.as_tensor(value, dtype=torch.float32)
                if value.size(0) != n:
                    raise ShapeError(f"EmitterSet {name} has {value.size(0)} rows, expected {n}.")
            setattr(self, name, value)
        if xy_unit not in ("px", "nm"):
            raise ValueError(f"xy_unit must be 'px' or 'nm', got {xy_unit!r}")
        self.xy_unit = xy_unit
        self.px_size = None if px_size is None else torch.as_tensor(px_size, dtype=torch.float32)

    @staticmethod
    def _vec(value, n, name, dtype):
        value = torch.as_tensor(value, dtype=dtype).reshape(-1)
        if value.numel() != n:
            raise ShapeError(f"EmitterSet {name} has {value.numel()} values, expected {n} (one per emitter).")
        return value

    @classmethod
    def empty(cls, xy_unit: str = "px", px_size=None) -> "EmitterSet":
        return cls(torch.zeros(0, 3), torch.zeros(0), torch.zeros(0, dtype=torch.long),
                   xy_unit=xy_unit, px_size=px_size)

    def __len__(self) -> int:
        return self.xyz.size(0)

    def __repr__(self) -> str:
        frames = f"frames {int(self.frame_ix.min())}..{int(self.frame_ix.max())}" if len(self) else "no frames"
        return f"EmitterSet({len(self)} emitters, {frames}, xy_unit={self.xy_unit})"

    # units -------------------------------------------------------------------------------------
    def _convert(self, to_unit: str) -> torch.Tensor:
        if self.xy_unit == to_unit:
            return self.xyz
        if self.px_size is None:
            raise ValueError(f"Cannot convert from {self.xy_unit} to {to_unit}: px_size is not set. "
                             "Set Camera.px_size in the param file.")
        factor = (self.px_size if to_unit == "nm" else 1.0 / self.px_size).to(self.xyz.device)
        xyz = self.xyz.clone()
        xyz[:, :2] = xyz[:, :2] * factor
        return xyz

    @property
    def xyz_px(self) -> torch.Tensor:
        """(E, 3): x, y in px, z in nm."""
        return self._convert("px")

    @property
    def xyz_nm(self) -> torch.Tensor:
        """(E, 3): x, y, z in nm."""
        return self._convert("nm")

    # subsets -----------------------------------------------------------------------------------
    def __getitem__(self, item) -> "EmitterSet":
        if isinstance(item, int):
            item = slice(item, item + 1 if item != -1 else None)
        fields = {k: getattr(self, k) for k in ("xyz", "phot", "frame_ix", "id") + _OPTIONAL}
        return EmitterSet(**{k: (v[item] if v is not None else None) for k, v in fields.items()},
                          xy_unit=self.xy_unit, px_size=self.px_size)

    @property
    def device(self) -> torch.device:
        return self.xyz.device

    def to(self, device, non_blocking: bool = False) -> "EmitterSet":
        """The same emitters with every tensor on ``device`` (``px_size`` stays on the CPU)."""
        fields = {k: getattr(self, k) for k in ("xyz", "phot", "frame_ix", "id") + _OPTIONAL}
        return EmitterSet(**{k: (v.to(device, non_blocking=non_blocking) if v is not None else None)
                             for k, v in fields.items()}, xy_unit=self.xy_unit, px_size=self.px_size)

    def clone(self) -> "EmitterSet":
        return self[torch.ones(len(self), dtype=torch.bool, device=self.device)]

    def get_subset_frame(self, frame_start: int, frame_end: int, frame_ix_shift: int | None = None) -> "EmitterSet":
        """Emitters with ``frame_start <= frame_ix <= frame_end``, frame index shifted by ``frame_ix_shift``."""
        em = self[(self.frame_ix >= frame_start) & (self.frame_ix <= frame_end)]
        if frame_ix_shift:
            em.frame_ix = em.frame_ix + frame_ix_shift
        return em

    def split_in_frames(self, ix_low: int = 0, ix_high: int | None = None) -> list["EmitterSet"]:
        """One EmitterSet per frame ``ix_low..ix_high`` (inclusive)."""
        if ix_high is None:
            ix_high = int(self.frame_ix.max()) if len(self) else ix_low - 1
        return [self[self.frame_ix == i] for i in range(ix_low, ix_high + 1)]

    @staticmethod
    def cat(sets: Iterable["EmitterSet"], step_frame_ix: int | None = None) -> "EmitterSet":
        """Concatenate; with ``step_frame_ix``, set i gets its frame index shifted by ``i * step``."""
        sets = list(sets)
        if not sets:
            return EmitterSet.empty()
        units = {s.xy_unit for s in sets}
        if len(units) > 1:
            raise ValueError(f"Cannot concatenate EmitterSets with different xy units {units}.")
        frame_ix = [s.frame_ix + (i * step_frame_ix if step_frame_ix else 0) for i, s in enumerate(sets)]
        kw = {}
        for name in _OPTIONAL:
            vals = [getattr(s, name) for s in sets]
            if all(v is not None for v in vals):
                kw[name] = torch.cat(vals, 0)
        return EmitterSet(torch.cat([s.xyz for s in sets], 0), torch.cat([s.phot for s in sets]),
                          torch.cat(frame_ix), id=torch.cat([s.id for s in sets]), xy_unit=sets[0].xy_unit,
                          px_size=sets[0].px_size, **kw)

    def to_dict(self) -> dict:
        """Plain dict of tensors (None where unset), DECODE's key names."""
        d = {k: getattr(self, k) for k in ("xyz", "phot", "frame_ix", "id") + _OPTIONAL}
        d["xy_unit"] = self.xy_unit
        d["px_size"] = self.px_size
        return d
