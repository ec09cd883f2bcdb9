"""Per-pixel sCMOS maps: offset, gain and read-noise variance of the whole chip (issue 25, item 4).

The maps are the ones a camera calibration makes (Picasso's and SMAP's, or Huang et al. 2013's): a
stack of dark frames gives the per-pixel offset (mean, ADU) and read-noise variance (ADU^2); frames at
several light levels give the gain. Units here:

- ``offset_map``: ADU (the per-pixel ``Camera.baseline``);
- ``gain_map``: electrons per ADU (the per-pixel ``Camera.e_per_adu``); a calibration that gives ADU per
  electron (Huang et al.'s ``g``) must be inverted first (``1 / g``);
- ``read_var_map``: ADU^2 (the variance of a dark pixel, as SMAP's and Huang et al.'s calibrations give it).

A map is a ``.npy`` or ``.tif`` of the whole chip, (H_chip, W_chip); a frame of an acquisition with a
region of interest sits at ``Camera.roi_origin`` = [x0, y0] on the chip (DECODE's x is the row).
A map that is not given takes the scalar keys: offset = ``baseline``, gain = ``e_per_adu``,
read variance = (``read_sigma`` / gain)^2.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import tifffile
import torch

from decode_var.core.errors import ParamError

#: the map keys of ``Camera``, in the order offset, gain, read variance
MAP_KEYS = ("offset_map", "gain_map", "read_var_map")


@functools.lru_cache(maxsize=16)
def _read(path: str, mtime_ns: int, size: int) -> np.ndarray:
    """The array in ``path`` (cached on path, modification time and size, so an edited file is read again)."""
    if path.lower().endswith(".npy"):
        return np.load(path, allow_pickle=False)
    return tifffile.imread(path)


def load_map(path, key: str) -> np.ndarray:
    """The map ``Camera.<key>`` from a ``.npy`` or ``.tif`` file: (H_chip, W_chip) float64, finite.

    Raises:
        ParamError: the file is missing or unreadable, or the array is not 2-D and finite.
    """
    where = f"Camera.{key}"
    if not isinstance(path, (str, os.PathLike)) or not str(path).lower().endswith((".npy", ".tif", ".tiff")):
        raise ParamError(f"{where} must be the path of a .npy or .tif file (the whole chip), got {path!r}.")
    path = os.path.abspath(os.path.expanduser(str(path)))
    if not os.path.isfile(path):
        raise ParamError(f"{where}: no file {path}. Give the path of the calibration map (relative paths are "
                         "taken from the current folder), or leave the key empty for the scalar camera keys.")
    try:
        st = os.stat(path)
        arr = np.asarray(_read(path, st.st_mtime_ns, st.st_size))
    except Exception as err:  # any reader failure is a bad file for the user
        raise ParamError(f"{where}: {path} cannot be read as .npy / .tif ({type(err).__name__}: {err}). "
                         "Save the map with numpy.save or as a single-page TIFF.") from err
    arr = np.squeeze(arr)
    if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.number):
        raise ParamError(f"{where}: {path} holds an array of shape {tuple(arr.shape)}; a map must be 2-D numbers "
                         "(H_chip, W_chip), one value per pixel of the chip.")
    arr = arr.astype(np.float64)
    if not np.isfinite(arr).all():
        raise ParamError(f"{where}: {path} has {int((~np.isfinite(arr)).sum())} NaN or infinite pixels. "
                         "Fill them (e.g. with the median of the map) before use.")
    return arr


@dataclass
class CameraMaps:
    """Offset (ADU), gain (e- / ADU) and read-noise variance (ADU^2) of the whole chip, (H_chip, W_chip) each."""

    offset_HW: torch.Tensor
    gain_HW: torch.Tensor
    read_var_HW: torch.Tensor
    roi_origin: tuple = (0, 0)
    _on: dict = field(default_factory=dict, repr=False)

    @property
    def chip_hw(self) -> tuple:
        return tuple(self.offset_HW.shape)

    @classmethod
    def parse(cls, cam) -> Optional["CameraMaps"]:
        """From the param's ``Camera`` section; None where no map is given (the scalar camera)."""
        paths = {k: cam.get(k) for k in MAP_KEYS}
        if all(p is None for p in paths.values()):
            return None
        arrs = {k: load_map(p, k) for k, p in paths.items() if p is not None}
        shapes = {k: a.shape for k, a in arrs.items()}
        if len(set(shapes.values())) > 1:
            raise ParamError(f"Camera maps of different shapes: {shapes}. All maps must be of the same chip "
                             "(H_chip, W_chip); use the maps of one calibration.")
        hw = next(iter(shapes.values()))
        offset = arrs.get("offset_map", np.full(hw, float(cam.baseline)))
        gain = arrs.get("gain_map", np.full(hw, float(cam.e_per_adu)))
        if not (gain > 0).all():
            raise ParamError(f"Camera.gain_map has {int((gain <= 0).sum())} pixels <= 0; the gain is electrons per "
                             "ADU, > 0 everywhere. Replace dead pixels (e.g. with the median gain).")
        var = arrs.get("read_var_map", (float(cam.read_sigma) / gain) ** 2)
        if not (var >= 0).all():
            raise ParamError(f"Camera.read_var_map has {int((var < 0).sum())} negative pixels; a variance "
                             "(ADU^2) is >= 0. Use the variance map of the calibration, not a difference.")
        origin = cam.get("roi_origin") or (0, 0)
        t = lambda a: torch.as_tensor(a, dtype=torch.float32)  # noqa: E731
        return cls(t(offset), t(gain), t(var), (int(origin[0]), int(origin[1])))

    def on(self, device) -> tuple:
        """(offset, gain, read_var) of the whole chip on ``device`` (cached)."""
        device = torch.device(device)
        if device not in self._on:
            self._on[device] = tuple(m.to(device) for m in (self.offset_HW, self.gain_HW, self.read_var_HW))
        return self._on[device]

    def check_inside(self, origin, hw, what: str) -> None:
        """Raise a :class:`ParamError` where a frame of ``hw`` = (H, W) px at ``origin`` leaves the chip."""
        (x0, y0), (h, w), (hc, wc) = origin, hw, self.chip_hw
        if x0 < 0 or y0 < 0 or x0 + h > hc or y0 + w > wc:
            raise ParamError(f"{what} of {h} x {w} px at Camera.roi_origin [{x0}, {y0}] leaves the chip of the camera "
                             f"maps ({hc} x {wc} px). Set Camera.roi_origin to the frame's first row and column on "
                             "the chip (the camera's ROI position), or use maps of the whole chip.")

    def window(self, hw, device, origin=None, what: str = "The movie frame") -> tuple:
        """(offset_HW, gain_HW, read_var_HW) of the (H, W) frame at ``origin`` (default ``roi_origin``)."""
        origin = self.roi_origin if origin is None else origin
        self.check_inside(origin, hw, what)
        (x0, y0), (h, w) = origin, hw
        return tuple(m[x0:x0 + h, y0:y0 + w] for m in self.on(device))

    def random_windows(self, n: int, hw, device, generator=None) -> tuple:
        """(offset, gain, read_var) of ``n`` (H, W) windows at uniformly drawn places on the chip, (n, H, W) each.

        Draws the places from ``generator`` (on ``device``; None = the global RNG).
        """
        self.check_inside((0, 0), hw, "The training frame (Simulation.img_size)")
        (h, w), (hc, wc) = hw, self.chip_hw
        x0_N = torch.randint(0, hc - h + 1, (n,), generator=generator, device=device)
        y0_N = torch.randint(0, wc - w + 1, (n,), generator=generator, device=device)
        rows_NH = x0_N[:, None] + torch.arange(h, device=device)
        cols_NW = y0_N[:, None] + torch.arange(w, device=device)
        return tuple(m[rows_NH[:, :, None], cols_NW[:, None, :]] for m in self.on(device))
