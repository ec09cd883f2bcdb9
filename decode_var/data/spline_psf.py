"""Built-in cubic-spline PSF: SMAP / DECODE spline calibrations rendered in torch, no compiled module.

**The calibration file** (SMAP's ``*_3dcal.mat``, read with scipy as DECODE's ``SMAPSplineCoefficient``
does): a struct ``SXY`` with a struct ``cspline`` holding

- ``coeff``: (Nx, Ny, Nz, 64) float coefficients (SMAP stores it in a 1 x 1 cell; both are read);
- ``dz``: voxel height in nm;
- ``z0``: voxel coordinate of z = 0 nm;
- ``x0``: 1-based voxel coordinate of the lateral centre (the reference is ``x0 - 1`` in x and y).

**The model** (the conventions of DECODE 0.10's ``CubicSplinePSF`` and SplinePSF's C/CUDA kernels, written
anew here). Voxel ``(i, j, k)`` holds a tricubic polynomial
``f(dx, dy, dz) = sum_{a,b,c} coeff[i, j, k, 16 c + 4 b + a] dx^a dy^b dz^c`` with ``dx, dy, dz`` in
``[0, 1)``: the PSF at spline coordinate ``(i + dx, j + dy, k + dz)``. The spline samples the pixel-
integrated PSF (SMAP fits it to bead images), so a pixel's value is the spline at the pixel centre.
An emitter at x, y in px (DECODE's frame: x = first image axis, pixel i centred on i) and z in nm gives
pixel ``p`` (along x) the value ``phot * S(ref_x + p - x, ..., z0 - z / dz)``. Concretely, per emitter:

- a ROI of ``roi_size`` px (default: the coefficients' Nx x Ny) whose first pixel is frame pixel
  ``floor(x - ref_re)`` (``ref_re`` = the reference, or the ROI centre with ``roi_auto_center``);
- ROI pixel ``i`` uses voxel ``floor(xc) + i`` with ``xc = -(x mod 1) + xextent[0] + 0.5 - (ref_re - ref)``,
  at ``dx = xc - floor(xc)``; likewise y; ``zc = z0 - z / dz``;
- a ROI pixel whose voxel lies outside the calibration laterally gets ``1e-10`` (not scaled by photons);
- z outside the calibrated range ``(z0 - Nz) dz < z <= z0 dz`` is **not** refused: the voxel index is
  clamped to the first / last voxel while dz keeps its unclamped value, i.e. the edge voxel's
  polynomial is extrapolated, exactly as DECODE does. :meth:`SplinePSF.parse` warns when
  ``Simulation.emitter_extent`` reaches past the calibrated range;
- ROI pixels outside the frame are dropped; emitters outside the frame still light its edge pixels.

Units: x, y in px, z in nm, photons; frames are expected photons per px.
"""
from __future__ import annotations

import math
import pathlib
import warnings
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch

from decode_var.core.atomic import atomic_write
from decode_var.core.errors import InputDataError, ParamError, ShapeError
from decode_var.data.accumulate import accumulate, frame_slots
from decode_var.data.fisher import crlb_from_model

__all__ = ["SplineCalibration", "load_calibration", "save_calibration", "make_calibration",
           "gaussian_pixel_model", "SplinePSF", "OUT_OF_ROI_VALUE"]

#: value of a ROI pixel whose voxel lies outside the calibration (SplinePSF's ``roi_out_eps``)
OUT_OF_ROI_VALUE = 1e-10
_FIELDS = ("coeff", "dz", "z0", "x0")


@dataclass
class SplineCalibration:
    """A cubic-spline calibration.

    Attributes:
        coeff_XYZ64: (Nx, Ny, Nz, 64) float32 coefficients, index ``16 c + 4 b + a`` multiplies dx^a dy^b dz^c.
        dz_nm: voxel height, nm.
        z0: voxel coordinate of z = 0 nm.
        x0: SMAP's 1-based lateral centre (DECODE's reference is ``x0 - 1`` voxels in x and y).
        path: the file it was read from (None when made in memory).
    """

    coeff_XYZ64: np.ndarray
    dz_nm: float
    z0: float
    x0: float
    path: Optional[pathlib.Path] = None

    @property
    def ref0(self) -> tuple[float, float, float]:
        """DECODE's reference (x, y in voxels, z in voxels): ``(x0 - 1, x0 - 1, z0)``."""
        return (float(self.x0) - 1.0, float(self.x0) - 1.0, float(self.z0))

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.coeff_XYZ64.shape[:3])

    @property
    def z_range_nm(self) -> tuple[float, float]:
        """(low, high) z in nm that the voxels cover: ``zc = z0 - z / dz`` in ``[0, Nz)``."""
        nz = self.shape[2]
        return ((self.z0 - nz) * self.dz_nm, self.z0 * self.dz_nm)


# reading and writing ----------------------------------------------------------------------------
def _one_number(cspline, f: str, path) -> float:
    """``SXY.cspline.<f>`` as one finite float, or an InputDataError naming the file and the field."""
    v = np.asarray(getattr(cspline, f), dtype=object).reshape(-1)
    try:
        value = float(v[0]) if v.size == 1 else math.nan
    except (TypeError, ValueError):
        value = math.nan
    if not math.isfinite(value):
        raise InputDataError(f"Spline calibration {path}: SXY.cspline.{f} must be one finite number, got "
                             f"{getattr(cspline, f)!r}.")
    return value


def load_calibration(path: Union[str, pathlib.Path]) -> SplineCalibration:
    """Read a SMAP / DECODE spline calibration (.mat).

    Raises:
        InputDataError: missing or unreadable file, or a file without ``SXY.cspline.{coeff,dz,z0,x0}``, or
            with values of the wrong shape; the message names the file and the field.
    """
    import scipy.io as sio  # lazy: 0.2 s on every start-up (simulation imports this module), for spline runs only

    path = pathlib.Path(path)
    if not path.is_file():
        raise InputDataError(f"Spline calibration {path} does not exist (or is not a file). Give your SMAP "
                             "calibration (*_3dcal.mat), or make one with decode-var-make-calibration.")
    try:
        mat = sio.loadmat(str(path), struct_as_record=False, squeeze_me=True)
    except Exception as err:  # scipy raises ValueError, TypeError, OSError, MatReadError... for bad files
        raise InputDataError(f"Spline calibration {path} is not a readable MATLAB .mat file ({type(err).__name__}: "
                             f"{err}). A truncated download or a file of another kind? Re-export it from SMAP, or "
                             "make one with decode-var-make-calibration.") from err
    if "SXY" not in mat:
        found = sorted(k for k in mat if not k.startswith("__"))
        raise InputDataError(f"Spline calibration {path} lacks the struct 'SXY' (found {found}). It must be SMAP's "
                             "3D calibration (*_3dcal.mat) with SXY.cspline.")
    sxy = mat["SXY"]
    if isinstance(sxy, np.ndarray):  # several channels: SMAP's struct array; DECODE reads one channel
        if sxy.size == 0:
            raise InputDataError(f"Spline calibration {path}: 'SXY' is empty.")
        sxy = sxy.flat[0]
    cspline = getattr(sxy, "cspline", None)
    if cspline is None:
        raise InputDataError(f"Spline calibration {path} lacks the field 'SXY.cspline' (the cubic-spline "
                             "calibration). Calibrate with SMAP's 'cspline' mode.")
    missing = [f for f in _FIELDS if not hasattr(cspline, f)]
    if missing:
        raise InputDataError(f"Spline calibration {path} lacks the field(s) "
                             f"{', '.join('SXY.cspline.' + f for f in missing)} (needs {', '.join(_FIELDS)}).")
    coeff = cspline.coeff
    if isinstance(coeff, np.ndarray) and coeff.dtype == object:  # a cell that squeeze_me did not unpack
        if coeff.size == 0:
            raise InputDataError(f"Spline calibration {path}: SXY.cspline.coeff is an empty cell.")
        coeff = coeff.flat[0]
    coeff = np.asarray(coeff)
    if coeff.ndim != 4 or coeff.shape[3] != 64 or min(coeff.shape[:3]) < 1 or coeff.dtype.kind not in "fiu":
        raise InputDataError(f"Spline calibration {path}: SXY.cspline.coeff has shape {coeff.shape} "
                             f"({coeff.dtype}); expected numbers of shape (Nx, Ny, Nz, 64). Truncated file?")
    values = {f: _one_number(cspline, f, path) for f in ("dz", "z0", "x0")}
    if values["dz"] <= 0:
        raise InputDataError(f"Spline calibration {path}: SXY.cspline.dz must be > 0 nm, got {values['dz']}.")
    if not np.isfinite(coeff).all():
        raise InputDataError(f"Spline calibration {path}: SXY.cspline.coeff holds NaN or Inf values.")
    return SplineCalibration(np.ascontiguousarray(coeff, dtype=np.float32), values["dz"], values["z0"], values["x0"],
                             path)


def save_calibration(path: Union[str, pathlib.Path], calib: SplineCalibration) -> pathlib.Path:
    """Write ``calib`` in SMAP's structure (``SXY.cspline.{coeff (1 x 1 cell), dz, z0, x0}``), atomically."""
    import scipy.io as sio  # lazy: as in load_calibration

    cell = np.empty((1, 1), dtype=object)
    cell[0, 0] = np.asarray(calib.coeff_XYZ64, dtype=np.float32)
    content = {"SXY": {"cspline": {"coeff": cell, "dz": float(calib.dz_nm), "z0": float(calib.z0),
                                   "x0": float(calib.x0)}}}
    return atomic_write(path, lambda tmp: sio.savemat(str(tmp), content, do_compression=True))


# making a calibration from a PSF model -----------------------------------------------------------
def gaussian_pixel_model(sigma_0: float = 1.0, foc_shift: float = 250.0, rl_range: float = 280.0,
                         mode_3d: bool = True) -> Callable:
    """Unit-photon pixel values of the package's (astigmatic) Gaussian PSF, for :func:`make_calibration`.

    Returns ``f(dx_px, dy_px, z_nm) -> value`` on broadcastable float64 arrays, ``dx = pixel centre - emitter``
    along x (first image axis): the pixel-integrated Gaussian of ``decode_var.data.simulation.GaussianPSF``.
    """
    from scipy.special import erf  # lazy: 0.2 s on every start-up; only the calibration CLI needs it

    def width(z, sign):
        if not mode_3d:
            return np.full_like(z, float(sigma_0))
        return sigma_0 * np.sqrt(1 + ((z + sign * foc_shift) / rl_range) ** 2)

    def f(dx, dy, z):
        sx = width(z, +1.0) * math.sqrt(2)
        sy = width(z, -1.0) * math.sqrt(2)
        px = 0.5 * (erf((dx + 0.5) / sx) - erf((dx - 0.5) / sx))
        py = 0.5 * (erf((dy + 0.5) / sy) - erf((dy - 0.5) / sy))
        return px * py

    return f


def make_calibration(model: Callable, roi_size: int = 21, z_range_nm: Sequence[float] = (-800.0, 800.0),
                     dz_nm: float = 50.0) -> SplineCalibration:
    """Fit a cubic spline to a PSF model and return it as a SMAP-style calibration.

    Each voxel's tricubic polynomial interpolates the model at 4 x 4 x 4 points (voxel fractions 0, 1/3,
    2/3, 1 on each axis), as SMAP builds its coefficients; neighbouring voxels share their face points, so
    the spline is continuous.

    Args:
        model: ``f(dx_px, dy_px, z_nm)`` -> unit-photon value of the pixel whose centre is ``dx, dy`` px from
            the emitter (x = first image axis), on broadcastable numpy arrays. See :func:`gaussian_pixel_model`.
        roi_size: odd ROI edge in px (the calibration's Nx = Ny); the emitter's pixel is the centre.
        z_range_nm: (low, high) z the voxels cover, nm; ``high - low`` must be a whole number of ``dz_nm``.
        dz_nm: voxel height, nm.
    """
    roi_size = int(roi_size)
    if roi_size < 3 or roi_size % 2 != 1:
        raise ParamError(f"roi_size must be an odd number of px >= 3, got {roi_size}.")
    z_lo, z_hi = (float(v) for v in z_range_nm)
    nz_f = (z_hi - z_lo) / dz_nm
    nz = int(round(nz_f))
    if dz_nm <= 0 or nz < 1 or abs(nz - nz_f) > 1e-6:
        raise ParamError(f"z range {z_lo}..{z_hi} nm must be a positive whole number of dz = {dz_nm} nm voxels.")
    ref = (roi_size - 1) / 2  # voxel coordinate of the emitter's pixel centre
    z0 = z_hi / dz_nm  # zc = z0 - z / dz: z_hi -> 0, z_lo -> nz
    n_xy = roi_size
    u = np.arange(3 * n_xy + 1) / 3.0  # sample points, voxel units
    w = np.arange(3 * nz + 1) / 3.0
    values = np.asarray(model((u - ref)[:, None, None], (u - ref)[None, :, None], ((z0 - w) * dz_nm)[None, None, :]),
                        dtype=np.float64)
    values = np.broadcast_to(values, (u.size, u.size, w.size))
    # per voxel, the 4 samples along each axis; polynomial coefficients = inverse Vandermonde on each axis
    ix = 3 * np.arange(n_xy)[:, None] + np.arange(4)[None]  # (Nxy, 4)
    iz = 3 * np.arange(nz)[:, None] + np.arange(4)[None]  # (Nz, 4)
    blocks = values[ix][:, :, ix][:, :, :, :, iz]  # (Nx, 4, Ny, 4, Nz, 4)
    t = np.arange(4) / 3.0
    inv_vander = np.linalg.inv(t[:, None] ** np.arange(4)[None, :])  # (power, sample)
    c_XYZabc = np.einsum("pa,qb,rc,iajbkc->ijkpqr", inv_vander, inv_vander, inv_vander, blocks)
    # coefficient index 16 c + 4 b + a multiplies dx^a dy^b dz^c
    coeff = c_XYZabc.transpose(0, 1, 2, 5, 4, 3).reshape(n_xy, n_xy, nz, 64)
    return SplineCalibration(coeff.astype(np.float32), float(dz_nm), float(z0), ref + 1.0)


# rendering ---------------------------------------------------------------------------------------
class SplinePSF:
    """Cubic-spline PSF, batched in torch (CPU or GPU), with DECODE 0.10's ``CubicSplinePSF`` conventions.

    Args:
        xextent, yextent: field of view in px, (-0.5, W - 0.5) for pixel i centred on i; its width must
            equal ``img_shape`` (as DECODE requires).
        img_shape: (size_x, size_y) frame size, px.
        calib: a :class:`SplineCalibration`.
        roi_size: (rx, ry) ROI in px; None = the calibration's Nx, Ny.
        roi_auto_center: centre the ROI on the emitter's pixel (odd roi_size only), as DECODE's option.
        chunk: emitters per vectorised block (memory: chunk * rx * ry * 64 values).
    """

    def __init__(self, xextent, yextent, img_shape, calib: SplineCalibration, roi_size=None,
                 roi_auto_center: bool = False, chunk: int = 256):
        self.img_shape = tuple(int(s) for s in img_shape)
        self.xextent = tuple(float(v) for v in xextent)
        self.yextent = tuple(float(v) for v in yextent)
        if (self.xextent[1] - self.xextent[0] != self.img_shape[0]
                or self.yextent[1] - self.yextent[0] != self.img_shape[1]):
            raise ParamError(f"Simulation.psf_extent {[list(self.xextent), list(self.yextent)]} must span "
                             f"Simulation.img_size {list(self.img_shape)} px (1 px per pixel) for the spline PSF, "
                             "e.g. [[-0.5, W - 0.5], [-0.5, H - 0.5], null].")
        self.calib = calib
        nx, ny, self.nz = calib.shape
        self.roi_size = (nx, ny) if roi_size is None else tuple(int(s) for s in roi_size)
        if len(self.roi_size) != 2 or min(self.roi_size) < 1:
            raise ParamError(f"Simulation.roi_size must be empty or [rx, ry] px, got {roi_size!r}.")
        ref0 = torch.tensor(calib.ref0, dtype=torch.float32)
        if roi_auto_center:
            if self.roi_size[0] % 2 != 1 or self.roi_size[1] % 2 != 1:
                raise ParamError(f"Simulation.roi_auto_center needs an odd Simulation.roi_size, got "
                                 f"{list(self.roi_size)}.")
            ref_re = torch.tensor([(self.roi_size[0] - 1) // 2, (self.roi_size[1] - 1) // 2, float(calib.z0)])
        else:
            ref_re = ref0.clone()
        self.ref0, self.ref_diff = ref0, ref_re - ref0
        # (Nz, Nx, Ny, 64): the gather indexes z first
        self.coeff_ZXY64 = torch.from_numpy(np.ascontiguousarray(calib.coeff_XYZ64.transpose(2, 0, 1, 3)))
        self.chunk = int(chunk)
        self._coeff = {}  # (device, dtype) -> (Nz * Nx * Ny, 64) coefficients there

    def coeff_K64(self, device, dtype) -> torch.Tensor:
        """The coefficients as (Nz * Nx * Ny, 64) rows on ``device`` in ``dtype`` (copied there once, not per
        block of emitters: the simulation of a GPU batch then reads them from GPU memory)."""
        key = (str(device), dtype)
        if key not in self._coeff:
            self._coeff[key] = self.coeff_ZXY64.to(device=device, dtype=dtype).reshape(-1, 64)
        return self._coeff[key]

    @classmethod
    def parse(cls, param) -> "SplinePSF":
        """From ``InOut.calibration_file``, ``Simulation.{psf_extent, img_size, roi_size, roi_auto_center}``."""
        calib_file = param.InOut.calibration_file
        if not calib_file:
            raise ParamError("VAR.psf is spline but InOut.calibration_file is empty. Set it to your SMAP spline "
                             "calibration (.mat), make one with decode-var-make-calibration, or use "
                             "VAR.psf: gaussian.")
        path = pathlib.Path(calib_file)
        if not path.is_file():
            raise ParamError(f"InOut.calibration_file {path} does not exist. Give your SMAP spline calibration "
                             f"(.mat), make one with 'decode-var-make-calibration --out {path}', or use "
                             "VAR.psf: gaussian, which needs no calibration.")
        sim = param.Simulation
        roi = sim.roi_size
        if isinstance(roi, int) and not isinstance(roi, bool):
            roi = (roi, roi)
        psf = cls(sim.psf_extent[0], sim.psf_extent[1], sim.img_size, load_calibration(path), roi,
                  bool(getattr(sim, "roi_auto_center", False)))
        z_lo, z_hi = psf.calib.z_range_nm
        ez = sim.emitter_extent[2]
        if ez is not None and (min(ez) <= z_lo or max(ez) > z_hi):
            warnings.warn(f"Simulation.emitter_extent z {list(ez)} nm reaches past the range the calibration "
                          f"{path} covers ({z_lo:g} .. {z_hi:g} nm); there the edge voxels are extrapolated, "
                          "as DECODE does. Narrow the z extent to the calibrated range.", stacklevel=2)
        return psf

    # geometry -------------------------------------------------------------------------------
    def _impl_coords(self, xyz_E3: torch.Tensor):
        """Spline coordinates of each emitter's first ROI pixel and that pixel's place on the frame.

        The operations follow DECODE's ``frame2roi_coord`` + ``coord2impl`` step by step, in the input's
        dtype, so that the voxel choice at pixel borders is the same as DECODE's in float32.

        Returns:
            impl_E3: (xc, yc) in voxels, zc in voxels; corner_E2: long frame pixel of ROI pixel (0, 0).
        """
        ref0 = self.ref0.to(xyz_E3)
        ref_diff = self.ref_diff.to(xyz_E3)
        frac_E2 = torch.remainder(xyz_E3[:, :2], 1.0)
        roi_E2 = frac_E2 + ref0[:2]
        offset = torch.tensor([self.xextent[0] + 0.5, self.yextent[0] + 0.5], dtype=xyz_E3.dtype,
                              device=xyz_E3.device)
        xy_impl = -roi_E2 + offset + ref0[:2] - ref_diff[:2]
        z_impl = -xyz_E3[:, 2:3] / self.calib.dz_nm + ref0[2] - ref_diff[2]
        corner_E2 = torch.floor(xyz_E3[:, :2] - ref0[:2] - ref_diff[:2]).long()
        return torch.cat([xy_impl, z_impl], 1), corner_E2

    # ROIs -----------------------------------------------------------------------------------
    def rois(self, xyz_E3: torch.Tensor, phot_E: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Expected photons in each emitter's ROI (differentiable in xyz and phot).

        Args:
            xyz_E3: (E, 3) x, y in px (frame coordinates), z in nm.
            phot_E: (E,) photons.

        Returns:
            rois_ERR: (E, rx, ry) photons per px; corner_E2: (E, 2) frame pixel of ROI pixel (0, 0).
        """
        xyz_E3 = torch.as_tensor(xyz_E3)
        if not xyz_E3.is_floating_point():
            xyz_E3 = xyz_E3.float()
        phot_E = torch.as_tensor(phot_E, dtype=xyz_E3.dtype, device=xyz_E3.device).reshape(-1)
        if xyz_E3.dim() != 2 or xyz_E3.size(1) != 3 or phot_E.numel() != xyz_E3.size(0):
            raise ShapeError(f"SplinePSF expects xyz (E, 3) and phot (E,), got {tuple(xyz_E3.shape)} and "
                             f"{tuple(phot_E.shape)}.")
        impl_E3, corner_E2 = self._impl_coords(xyz_E3)
        out = [self._rois_block(impl_E3[s:s + self.chunk], phot_E[s:s + self.chunk])
               for s in range(0, xyz_E3.size(0), self.chunk)]
        rx, ry = self.roi_size
        rois_ERR = torch.cat(out, 0) if out else xyz_E3.new_zeros(0, rx, ry)
        return rois_ERR, corner_E2

    def _rois_block(self, impl_E3: torch.Tensor, phot_E: torch.Tensor) -> torch.Tensor:
        nx, ny, nz = self.calib.shape
        rx, ry = self.roi_size
        start_E3 = torch.floor(impl_E3)
        delta_E3 = impl_E3 - start_E3  # dx, dy, dz in [0, 1)
        start = start_E3.detach().long()
        ix_ER = start[:, :1] + torch.arange(rx, device=impl_E3.device)
        iy_ER = start[:, 1:2] + torch.arange(ry, device=impl_E3.device)
        iz_E = start[:, 2].clamp(0, nz - 1)
        inside_ERR = (((ix_ER >= 0) & (ix_ER < nx))[:, :, None] & ((iy_ER >= 0) & (iy_ER < ny))[:, None, :])
        coeff_K64 = self.coeff_K64(impl_E3.device, impl_E3.dtype)
        row_ERR = ((iz_E[:, None, None] * nx + ix_ER.clamp(0, nx - 1)[:, :, None]) * ny
                   + iy_ER.clamp(0, ny - 1)[:, None, :])
        c_ERR64 = coeff_K64.index_select(0, row_ERR.reshape(-1)).view(*row_ERR.shape, 64)
        # powers 0..3 as products (pow's derivative of d ** 0 is nan at d = 0)
        pow_E34 = torch.stack([torch.ones_like(delta_E3), delta_E3, delta_E3 * delta_E3,
                               delta_E3 * delta_E3 * delta_E3], -1)
        # index 16 c + 4 b + a  <->  dz^c dy^b dx^a
        poly_E64 = (pow_E34[:, 2, :, None, None] * pow_E34[:, 1, None, :, None] * pow_E34[:, 0, None, None, :])
        value_ERR = torch.einsum("exyk,ek->exy", c_ERR64, poly_E64.reshape(-1, 64))
        return torch.where(inside_ERR, value_ERR * phot_E[:, None, None],
                           torch.full_like(value_ERR, OUT_OF_ROI_VALUE))

    # frames ---------------------------------------------------------------------------------
    def forward(self, xyz: torch.Tensor, phot: torch.Tensor, frame_ix: torch.Tensor, n_frames: int) -> torch.Tensor:
        """Expected photons per px, (n_frames, size_x, size_y), from (E, 3) positions (px, px, nm).

        Emitters with ``frame_ix`` outside ``[0, n_frames)`` are left out, as DECODE's ``ix_low/ix_high``.
        """
        xyz = torch.as_tensor(xyz, dtype=torch.float32) if not torch.is_tensor(xyz) else xyz
        frame_ix = torch.as_tensor(frame_ix).long().reshape(-1)
        keep = (frame_ix >= 0) & (frame_ix < n_frames)
        sx, sy = self.img_shape
        frames = torch.zeros(n_frames * sx * sy, dtype=xyz.dtype if xyz.is_floating_point() else torch.float32,
                             device=xyz.device)
        if not bool(keep.any()):
            return frames.view(n_frames, sx, sy)
        rois_ERR, corner_E2 = self.rois(xyz[keep], torch.as_tensor(phot)[keep])
        rx, ry = self.roi_size
        px_ER = corner_E2[:, :1] + torch.arange(rx, device=xyz.device)
        py_ER = corner_E2[:, 1:] + torch.arange(ry, device=xyz.device)
        on_ERR = (((px_ER >= 0) & (px_ER < sx))[:, :, None] & ((py_ER >= 0) & (py_ER < sy))[:, None, :])
        flat_ERR = (frame_ix[keep][:, None, None] * (sx * sy) + px_ER[:, :, None] * sy + py_ER[:, None, :])

        def slot():  # GPUs: each emitter's rank in its frame; summed rank by rank, in a fixed order
            return frame_slots(frame_ix[keep])[:, None, None].expand_as(flat_ERR)[on_ERR]

        frames = accumulate(frames, flat_ERR[on_ERR], rois_ERR[on_ERR].to(frames.dtype), slot)
        return frames.view(n_frames, sx, sy)

    __call__ = forward

    # Cramér-Rao bound -----------------------------------------------------------------------
    def crlb(self, xyz_px, phot, bg, em_gain: bool = False) -> torch.Tensor:
        """(E, 5) CRLB variances of x, y (px^2), z (nm^2), phot (photons^2), bg ((photons / px)^2).

        The Fisher information of each emitter's ROI (the calibration's ROI, as DECODE's ``crlb``), from
        autograd derivatives of :meth:`rois`; ``em_gain`` doubles the variances (EMCCD excess noise).
        """

        def model(xyz_E3, phot_E, bg_E):
            rois_ERR, _ = self.rois(xyz_E3, phot_E)
            return rois_ERR.flatten(1) + bg_E[:, None]

        return crlb_from_model(model, xyz_px, phot, bg, em_gain=em_gain)
