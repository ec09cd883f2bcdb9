"""Localizations for Picasso and ThunderSTORM, besides DECODE's own formats; written atomically.

Axes and origins (each converted in one named function below):

========================  ======================  ==============================  ===========  ===========
format                    x                       pixel origin                    units        frame
========================  ======================  ==============================  ===========  ===========
DECODE (decode-var)       first image axis (row)  pixel i centred on i            px (z nm)    0-based
Picasso HDF5 + .yaml      column                  pixel i centred on i            camera px    0-based
ThunderSTORM CSV          column                  image corner: pixel i centred   nm           1-based
                                                  on i + 0.5 (ImageJ)
========================  ======================  ==============================  ===========  ===========

- **Picasso**: ``x_picasso = y_decode``, ``y_picasso = x_decode``, no offset. Picasso Localize cuts a box
  ``movie[frame, y - r : y + r + 1, x - r : x + r + 1]`` around an integer pixel and adds the fit on the grid
  ``-r .. r`` (``picasso/localize.py``, ``gausslq.py``): x is the column, pixel centres are integers.
  Written: an HDF5 dataset ``/locs`` (a compound table, as ``picasso.io.save_locs`` writes with h5py) with
  frame, x, y, photons, sx, sy, bg, lpx, lpy (+ z, lpz in nm for 3D), and a ``.yaml`` sidecar of the same
  name with Width, Height, Frames and Pixelsize (nm), the keys Picasso requires.
- **ThunderSTORM**: ``x [nm] = (y_decode + 0.5) * px_y``, ``y [nm] = (x_decode + 0.5) * px_x``: its fitters add
  ``+ 0.5`` to the integer pixel of the fitting box, so (0, 0) is the image's top-left corner, as in ImageJ;
  ``frame`` counts from 1. Columns ``"id","frame","x [nm]","y [nm]",("z [nm]",)"sigma [nm]","intensity [photon]",
  "offset [photon]","bkgstd [photon]","uncertainty [nm]"`` (3D: ``uncertainty_xy [nm]``, ``uncertainty_z [nm]``).

Columns a network does not predict are filled, and documented in docs/formats.md:
PSF widths (sx, sy, sigma) come from the PSF model of the run at each emitter's z (or a nominal width);
bkgstd is the Poisson estimate ``sqrt(bg)``. The localization precision (lpx, lpy, lpz, uncertainty) is
(:func:`localization_precision`) the model's predicted sigma where it gives one; else the CRLB of the run's
PSF at the localization's position, photons and background, scaled by the model's measured RMSE / sqrt(CRLB)
on its own test set (``model_card.json``, :mod:`decode_var.evaluation.model_card`), or unscaled ("uncalibrated
CRLB") without a card; without a PSF model (no ``psf``) the shot-noise limit ``PSF width / sqrt(photons)``, a
lower bound. What was used is written in Picasso's yaml (``Precision``) and in ThunderSTORM's
``<name>-protocol.txt``.

Nothing a reader cannot use is written (:func:`readable_rows`): rows with non-finite x, y, z or photons, a
position beyond ``MAX_POSITION_PX``, a frame index < 0, beyond the movie's frames (when known) or beyond
``MAX_FRAME_INDEX`` are dropped, with a warning counting each reason. Picasso's Width, Height and Frames
cover every row written.
"""
from __future__ import annotations

import io
import math
import pathlib
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import h5py
import numpy as np
import torch
import yaml

from decode_var.config.param import load_param
from decode_var.core.atomic import atomic_write, atomic_write_text
from decode_var.core.emitters import EmitterSet
from decode_var.core.errors import InputDataError
from decode_var.core.log import note, warn
from decode_var.core.version import __version__
from decode_var.data.emitter_io import save_emitters
from decode_var.data.tiff import open_stack
from decode_var.evaluation.crlb_scoring import CrlbModel
from decode_var.evaluation.model_card import ModelCard, load_card
from decode_var.inference.render import render as render_image, save_render

__all__ = ["FORMATS", "export", "save_picasso", "save_thunderstorm", "decode_to_picasso_px",
           "decode_to_thunderstorm_nm", "psf_width_px", "export_paths", "write_fit_outputs", "readable_rows",
           "localization_precision", "Precision", "MAX_FRAME_INDEX", "MAX_POSITION_PX", "lateral_sigma_nm",
           "filter_max_sigma"]

FORMATS = ("decode", "picasso", "thunderstorm")
TS_COLUMNS_2D = ("id", "frame", "x [nm]", "y [nm]", "sigma [nm]", "intensity [photon]", "offset [photon]",
                 "bkgstd [photon]", "uncertainty [nm]")
TS_COLUMNS_3D = ("id", "frame", "x [nm]", "y [nm]", "z [nm]", "sigma [nm]", "intensity [photon]", "offset [photon]",
                 "bkgstd [photon]", "uncertainty_xy [nm]", "uncertainty_z [nm]")
#: the largest frame index written: ThunderSTORM's frame (index + 1) must be a Java int, Picasso's fits uint32
MAX_FRAME_INDEX = 2 ** 31 - 2
#: |x|, |y| in px beyond which a position is no camera's (float32 px lose their fraction from 2^23 on)
MAX_POSITION_PX = 2.0 ** 23
#: more localizations than this: the CRLB is interpolated from a grid of (z, photons, bg) nodes (:func:`_crlb_var`)
CRLB_GRID_ABOVE = 50_000
CRLB_GRID = (33, 24, 16)


# what readers accept ------------------------------------------------------------------------------
def readable_rows(em: EmitterSet, n_frames: Optional[int] = None,
                  what: str = "export") -> tuple[EmitterSet, np.ndarray]:
    """(the rows of ``em`` a reader can use, their (E,) bool mask); the others are dropped with one warning
    counting each reason: non-finite x, y, z or photons; |x| or |y| > ``MAX_POSITION_PX`` px; frame index < 0,
    >= ``n_frames`` (the movie's frames, when known) or > ``MAX_FRAME_INDEX``."""
    keep, reasons = _unreadable(em, n_frames)
    if reasons:
        warn(f"{what}: {int((~keep).sum())} of {len(em)} localizations dropped, which no reader can use: "
             f"{'; '.join(reasons)}.")
        em = em[torch.from_numpy(keep)]
    return em, keep


def _unreadable(em: EmitterSet, n_frames: Optional[int] = None) -> tuple[np.ndarray, list[str]]:
    """(E,) bool mask of the rows a reader can use, and the count of each reason to drop the others."""
    if len(em) == 0:
        return np.ones(0, bool), []
    xyz = em.xyz.double().numpy()
    frame = em.frame_ix.numpy()
    nonfinite = ~(np.isfinite(xyz).all(1) & np.isfinite(em.phot.double().numpy()))
    xy_px = xyz[:, :2]
    if em.xy_unit == "nm" and em.px_size is not None:
        xy_px = xy_px / torch.as_tensor(em.px_size, dtype=torch.float64).reshape(-1).expand(2).numpy()
    far = ~nonfinite & (np.abs(xy_px) > MAX_POSITION_PX).any(1)
    negative = frame < 0
    limit = MAX_FRAME_INDEX + 1 if n_frames is None else min(int(n_frames), MAX_FRAME_INDEX + 1)
    beyond = ~negative & (frame >= limit)
    where = f"the movie's {int(n_frames)} frames" if limit != MAX_FRAME_INDEX + 1 else f"index {MAX_FRAME_INDEX}"
    reasons = [f"{int(c)} {r}" for c, r in ((nonfinite.sum(), "with a non-finite x, y, z or photon count"),
                                           (far.sum(), f"with |x| or |y| beyond {MAX_POSITION_PX:.0f} px"),
                                           (negative.sum(), "with a negative frame index"),
                                           (beyond.sum(), f"with a frame index beyond {where}")) if c]
    return ~(nonfinite | far | negative | beyond), reasons


# the conversions -------------------------------------------------------------------------------
def decode_to_picasso_px(xy_px: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """DECODE (x = row, y = column; pixel i centred on i) -> Picasso (x = column, y = row; same centres)."""
    return xy_px[:, 1].copy(), xy_px[:, 0].copy()


def decode_to_thunderstorm_nm(xy_px: np.ndarray, px_size_nm: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """DECODE px -> ThunderSTORM nm: x = column, y = row, origin at the image corner (pixel i centred on i + 0.5)."""
    return (xy_px[:, 1] + 0.5) * px_size_nm[1], (xy_px[:, 0] + 0.5) * px_size_nm[0]


def _px_size(em: EmitterSet, px_size) -> np.ndarray:
    size = px_size if px_size is not None else em.px_size
    if size is None:
        raise InputDataError("The emitters have no pixel size: set Camera.px_size in the param file, or pass "
                             "--px-size NM NM.")
    size = np.asarray(torch.as_tensor(size, dtype=torch.float64).reshape(-1).tolist(), dtype=np.float64)
    if size.size == 1:
        size = np.repeat(size, 2)
    if size.size != 2 or not np.all(np.isfinite(size)) or np.any(size <= 0):
        raise InputDataError(f"Pixel size must be two numbers > 0 (nm per px along x and y), got {size.tolist()}.")
    return size


def _xyz_px(em: EmitterSet, px_size_nm: np.ndarray) -> np.ndarray:
    em = EmitterSet(em.xyz, em.phot, em.frame_ix, xy_unit=em.xy_unit, px_size=px_size_nm)
    return em.xyz_px.double().numpy()


@dataclass
class Precision:
    """Localization precision of each row and what it is.

    Attributes:
        sigma_E3: (E, 3) standard deviations along DECODE x, y (px) and z (nm); nan where unknown.
        basis: what the values are before any scaling (one phrase).
        ratios: (3,) factors applied along DECODE x, y, z (None: that axis not scaled), or None: no calibration.
        card: the model card the ratios come from.
    """

    sigma_E3: np.ndarray
    basis: str
    ratios: Optional[tuple] = None
    card: Optional[ModelCard] = None

    def describe(self, axis_names: Sequence[str]) -> str:
        """One line for a file's header; ``axis_names``: DECODE's x, y, z as the format calls them."""
        if self.ratios is None:
            return self.basis
        p = self.card.precision
        scaled = ", ".join(f"{name} x {r:.3g}" for name, r in zip(axis_names, self.ratios) if r is not None)
        epoch = f", epoch {p.epoch}" if p.epoch is not None else ""
        return (f"{self.basis}, scaled by the RMSE / sqrt(CRLB) measured on the model's test set: {scaled} "
                f"({p.n_matched} matched emitters{epoch}, {p.measured_by}; {self.card.path})")


def localization_precision(em: EmitterSet, px_size_nm: np.ndarray, width_px: np.ndarray, psf: Optional[CrlbModel] = None,
                           card: Optional[ModelCard] = None) -> Precision:
    """The precision every export writes (see the module docstring for the order of sources).

    Args:
        em: the rows to write (finite positions and photons).
        px_size_nm: (2,) nm per px. width_px: (E, 2) PSF widths in px (the shot-noise limit without ``psf``).
        psf: the run's PSF model and camera (:class:`~decode_var.evaluation.crlb_scoring.CrlbModel`), or None.
        card: the model's card, or None.
    """
    n = len(em)
    sigma = np.full((n, 3), np.nan)
    var = None if em.xyz_cr is None else _in_px(em.xyz_cr.double().numpy(), em, px_size_nm, squared=True)
    if psf is not None:
        kind = "Gaussian" if psf.kind == "gaussian" else psf.kind
        basis = f"CRLB of the run's {kind} PSF at each localization's position, photons and background"
        need = np.ones(n, bool) if var is None else ~np.isfinite(var).all(1)  # an emitter file's own CRLB stays
        var = np.full((n, 3), np.nan) if var is None else var
        if need.any():
            var[need] = _crlb_var(psf, _xyz_px(em, px_size_nm)[need],
                                  np.clip(em.phot.double().numpy()[need], 1.0, None), _background(em)[need])
        if em.bg is None:
            basis += " (background unknown, taken as 0: a bound too low)"
    else:
        basis = ("PSF width / sqrt(photons), the shot-noise limit (no PSF model given: pass the run's param for the "
                 "CRLB); a lower bound, several times below the true error")
        sigma[:, :2] = width_px / np.sqrt(np.clip(em.phot.double().numpy(), 1e-9, None))[:, None]
    ratios = None
    if var is not None:
        if psf is None:
            basis = "the CRLB of the emitter file"
        sigma = np.where(np.isfinite(var), np.sqrt(np.clip(var, 0, None)), sigma)
        if card is not None and card.precision is not None:
            ratios = card.precision.ratios()
            sigma = sigma * np.array([1.0 if r is None else r for r in ratios])
        else:
            basis = "uncalibrated " + basis + " (no model card: not scaled to the model's measured error)"
    return _with_predicted_sigma(Precision(sigma, basis, ratios, card if ratios else None), em, px_size_nm)


def _with_predicted_sigma(prec: Precision, em: EmitterSet, px_size_nm: np.ndarray) -> Precision:
    """The model's own predicted sigma (``xyz_sig``) wins where it gives one."""
    if em.xyz_sig is None:
        return prec
    sig = _in_px(em.xyz_sig.double().numpy(), em, px_size_nm, squared=False)
    ok = np.isfinite(sig)
    if not ok.any():
        return prec
    prec.sigma_E3 = np.where(ok, sig, prec.sigma_E3)
    if ok.all():
        return Precision(prec.sigma_E3, "the model's predicted sigma")
    prec.basis = "the model's predicted sigma where it gives one, else the " + prec.basis
    return prec


def lateral_sigma_nm(em: EmitterSet, px_size_nm=None) -> np.ndarray:
    """(E,) the model's predicted lateral sigma in nm, ``sqrt((x_sig^2 + y_sig^2) / 2)`` (ThunderSTORM's
    ``uncertainty``), nan where it gives none. ``px_size_nm``: (2,) nm / px (default: the emitters' own)."""
    if em.xyz_sig is None:
        return np.full(len(em), np.nan)
    size = _px_size(em, px_size_nm)
    sig = em.xyz_sig[:, :2].double().numpy()
    sig_nm = sig if em.xy_unit == "nm" else sig * size
    return np.sqrt((sig_nm ** 2).mean(1))


def filter_max_sigma(em: EmitterSet, max_sigma_nm: float, px_size_nm=None) -> EmitterSet:
    """The localizations whose predicted lateral sigma (:func:`lateral_sigma_nm`) is at most ``max_sigma_nm``
    (``decode-var-fit --max-sigma NM``); those without one are dropped too. One note counts what was dropped.

    Raises:
        InputDataError: ``max_sigma_nm`` is not a number > 0, or no localization carries a predicted sigma
            (the model was trained without ``VAR.model.uncertainty``).
    """
    if not (isinstance(max_sigma_nm, (int, float)) and math.isfinite(max_sigma_nm) and max_sigma_nm > 0):
        raise InputDataError(f"--max-sigma must be a number of nm > 0, got {max_sigma_nm!r}.")
    sigma_nm = lateral_sigma_nm(em, px_size_nm)
    if len(em) and not np.isfinite(sigma_nm).any():
        raise InputDataError("--max-sigma filters on the model's predicted sigma, but these localizations carry none: "
                             "train the model with VAR.model.uncertainty: true (docs/models.md), or leave --max-sigma "
                             "out.")
    keep = np.isfinite(sigma_nm) & (sigma_nm <= max_sigma_nm)
    if not keep.all():
        note(f"--max-sigma {max_sigma_nm:g} nm: {int((~keep).sum())} of {len(em)} localizations dropped "
             f"({int((~np.isfinite(sigma_nm)).sum())} without a sigma).")
    kept = em[torch.from_numpy(keep)]
    if hasattr(em, "fit_report"):  # decode-var-fit's record of the movie (write_fit_outputs reads it)
        kept.fit_report = em.fit_report
    return kept


def _in_px(v: np.ndarray, em: EmitterSet, px_size_nm: np.ndarray, squared: bool) -> np.ndarray:
    """(E, 3) x, y uncertainties of ``em``'s unit -> px (z stays nm); ``squared`` for variances."""
    v = v.copy()
    if em.xy_unit == "nm":
        v[:, :2] = v[:, :2] / (px_size_nm ** 2 if squared else px_size_nm)
    return v


def _background(em: EmitterSet) -> np.ndarray:
    """(E,) photons / px for the CRLB: the localizations' own, >= 0 (0 where unknown)."""
    if em.bg is None:
        return np.zeros(len(em))
    return np.clip(np.nan_to_num(em.bg.double().numpy(), nan=0.0, posinf=0.0), 0.0, None)


def _crlb_var(psf: CrlbModel, xyz_px: np.ndarray, phot: np.ndarray, bg: np.ndarray) -> np.ndarray:
    """(E, 3) CRLB variances of the run's PSF: x, y in px^2, z in nm^2 (:meth:`CrlbModel.px`).

    Exact for up to ``CRLB_GRID_ABOVE`` localizations (50 to 300 us each on one core). Beyond, interpolated
    (linearly in log variance) from the bounds on a grid of z x log photons x log(1 + bg) over the localizations'
    range, at a pixel centre: a few seconds for any number of localizations, within a few percent of the exact
    bound (its sub-pixel dependence).
    """
    if len(phot) <= CRLB_GRID_ABOVE:
        var = psf.px(torch.from_numpy(xyz_px), torch.from_numpy(phot), torch.from_numpy(bg))
        return var[:, :3].double().numpy()
    from scipy.interpolate import RegularGridInterpolator  # lazy: 0.4 s, for large exports only

    query = np.column_stack([xyz_px[:, 2], np.log(phot), np.log1p(bg)])
    axes = [np.linspace(lo, hi if hi > lo else lo + 1.0, k)
            for lo, hi, k in zip(query.min(0), query.max(0), CRLB_GRID)]
    z, log_phot, log1p_bg = (a.ravel() for a in np.meshgrid(*axes, indexing="ij"))
    centre = np.round(np.median(xyz_px[:, :2], 0))
    nodes = np.column_stack([np.broadcast_to(centre, (z.size, 2)), z])
    var = psf.px(torch.from_numpy(nodes), torch.from_numpy(np.exp(log_phot)),
                 torch.from_numpy(np.expm1(log1p_bg)))[:, :3].double().numpy()
    out = np.empty((len(phot), 3))
    for i in range(3):
        with np.errstate(invalid="ignore", divide="ignore"):  # z of a 2D PSF: nan throughout
            table = np.log(var[:, i]).reshape(tuple(CRLB_GRID))
        out[:, i] = np.exp(RegularGridInterpolator(axes, table, bounds_error=False, fill_value=None)(query))
    return out


def psf_width_px(psf: Optional[CrlbModel], z_nm: np.ndarray) -> np.ndarray:
    """(E, 2) PSF standard deviation along DECODE x, y in px at each z (nm), from the run's PSF model
    (:meth:`~decode_var.evaluation.crlb_scoring.CrlbModel.width_px`); without one: 1 px."""
    if psf is None:
        return np.ones((np.asarray(z_nm).size, 2))
    return psf.width_px(z_nm)


def _is_3d(em: EmitterSet) -> bool:
    return bool(len(em)) and bool((em.xyz[:, 2] != 0).any())


def _columns(em: EmitterSet, px_size_nm, width_px, three_d, precision=None):
    """What every export reads: px size (nm), DECODE positions (px, px, nm), PSF widths (px), localization
    precisions (px, px, nm; ``precision`` (E, 3), default :func:`localization_precision` without a PSF model) and
    whether the set is 3D. Rows a reader cannot use are refused (the ``save_*`` functions drop them first)."""
    _, reasons = _unreadable(em)
    if reasons:
        raise InputDataError(f"Localizations no reader can use: {'; '.join(reasons)}. Drop them first "
                             "(readable_rows; save_picasso and save_thunderstorm do).")
    size = _px_size(em, px_size_nm)
    n = len(em)
    width = np.ones((n, 2)) if width_px is None else np.broadcast_to(np.asarray(width_px, np.float64), (n, 2))
    prec = localization_precision(em, size, width).sigma_E3 if precision is None else np.asarray(precision)
    return size, _xyz_px(em, size), width, prec, (_is_3d(em) if three_d is None else three_d)


def _prepare(em: EmitterSet, n_frames, px_size_nm, width_px, psf, card, what: str):
    """The rows to write (:func:`readable_rows`), px size, their PSF widths (given, or the run's PSF's) and
    precision: what ``save_picasso`` and ``save_thunderstorm`` share."""
    em, keep = readable_rows(em, n_frames, what)
    size = _px_size(em, px_size_nm)
    if width_px is None:
        width = psf_width_px(psf, em.xyz[:, 2].numpy())
    else:
        width = np.asarray(width_px, np.float64)
        width = width[keep] if width.ndim == 2 and width.shape[0] == keep.size else width
        width = np.broadcast_to(width, (len(em), 2))
    return em, size, width, localization_precision(em, size, width, psf, card)


# Picasso ------------------------------------------------------------------------------------------
def picasso_table(em: EmitterSet, px_size_nm, width_px: Optional[np.ndarray] = None,
                  three_d: Optional[bool] = None, precision: Optional[np.ndarray] = None) -> np.ndarray:
    """Picasso's localization table (numpy structured array, sorted by frame) for ``em``."""
    size, xyz, width, prec, three_d = _columns(em, px_size_nm, width_px, three_d, precision)
    n = len(em)
    with_lpz = three_d and bool(np.isfinite(prec[:, 2]).all())  # optional in Picasso: left out when unknown
    fields = [("frame", "u4"), ("x", "f4"), ("y", "f4"), ("photons", "f4"), ("sx", "f4"), ("sy", "f4"), ("bg", "f4"),
              ("lpx", "f4"), ("lpy", "f4")] + ([("z", "f4")] if three_d else []) + ([("lpz", "f4")] if with_lpz else [])
    table = np.zeros(n, dtype=fields)
    table["frame"] = em.frame_ix.numpy()
    table["x"], table["y"] = decode_to_picasso_px(xyz[:, :2])
    table["photons"] = em.phot.numpy()
    table["sx"], table["sy"] = width[:, 1], width[:, 0]  # Picasso x = DECODE y
    table["bg"] = 0.0 if em.bg is None else np.nan_to_num(em.bg.numpy())
    table["lpx"], table["lpy"] = prec[:, 1], prec[:, 0]
    if three_d:
        table["z"] = xyz[:, 2]
    if with_lpz:
        table["lpz"] = prec[:, 2]
    return table[np.argsort(table["frame"], kind="stable")]


def _picasso_info(table: np.ndarray, size: np.ndarray, frame_shape, n_frames, prec: "Precision") -> dict:
    """The yaml's first document: Width, Height (px) and Frames cover every row written."""
    shape = (0, 0) if frame_shape is None else (int(frame_shape[0]), int(frame_shape[1]))
    extent = [int(math.ceil(float(table[k].max()) + 0.5)) if len(table) else 1 for k in ("y", "x")]  # rows, cols
    frames = int(n_frames) if n_frames is not None else (int(table["frame"].max()) + 1 if len(table) else 0)
    return {"Generated by": f"decode-var {__version__} (DECODE frame convention converted: x = column, "
                            "pixel centres at integers)",
            "Width": max(shape[1], extent[1]), "Height": max(shape[0], extent[0]), "Frames": frames,
            "Pixelsize": float(size[0]), "Precision": prec.describe(("lpy", "lpx", "lpz"))}


def save_picasso(path: Union[str, pathlib.Path], em: EmitterSet, frame_shape: Optional[Sequence[int]] = None,
                 n_frames: Optional[int] = None, px_size_nm=None, width_px: Optional[np.ndarray] = None,
                 three_d: Optional[bool] = None, psf: Optional[CrlbModel] = None,
                 card: Optional[ModelCard] = None) -> pathlib.Path:
    """Write Picasso's localization HDF5 (``path``, e.g. ``*_locs.hdf5``) and its ``.yaml`` sidecar.

    Rows no reader can use are dropped with a warning (:func:`readable_rows`; with ``n_frames``, those
    beyond the movie too). The yaml's Width / Height (px) and Frames are the movie's, grown to cover every
    localization written; its ``Precision`` says what lpx, lpy, lpz are (:func:`localization_precision`).

    Args:
        frame_shape: (size_x, size_y) of the camera frames in px (DECODE's order: rows, columns); default: the
            localizations' extent.
        n_frames: frames of the movie (default: last frame index + 1).
        px_size_nm: (2,) nm per px (default: the emitters' ``px_size``); Picasso needs square pixels.
        width_px: (E, 2) or (2,) PSF widths along DECODE x, y in px (default: :func:`psf_width_px` of ``psf``).
        psf: the run's PSF model and camera, for the CRLB (:meth:`CrlbModel.parse` of the run's param); card: the
            model's card (its calibration).
    """
    path = pathlib.Path(path)
    if path.suffix.lower() not in (".hdf5", ".h5"):
        raise InputDataError(f"A Picasso file must end in .hdf5 (e.g. emitters_locs.hdf5), got {path}.")
    size = _px_size(em, px_size_nm)
    if abs(size[0] - size[1]) > 1e-6 * size[0]:
        raise InputDataError(f"Picasso assumes square pixels, but the pixel size is {size.tolist()} nm. Resample, or "
                             "use the ThunderSTORM export (nm).")
    em, size, width, prec = _prepare(em, n_frames, size, width_px, psf, card, f"Picasso export {path.name}")
    table = picasso_table(em, size, width, three_d, prec.sigma_E3)
    info = [_picasso_info(table, size, frame_shape, n_frames, prec)]
    yaml_path = path.with_suffix(".yaml")

    def write(tmp):
        with h5py.File(tmp, "w") as f:
            f.create_dataset("locs", data=table)
        # the sidecar goes in just before the table is renamed into place
        atomic_write(yaml_path, lambda t: pathlib.Path(t).write_text(yaml.safe_dump_all(info, default_flow_style=False)))

    return atomic_write(path, write)


# ThunderSTORM -------------------------------------------------------------------------------------
def thunderstorm_table(em: EmitterSet, px_size_nm=None, width_px: Optional[np.ndarray] = None,
                       three_d: Optional[bool] = None,
                       precision: Optional[np.ndarray] = None) -> tuple[tuple, np.ndarray]:
    """(column names, (E, C) float64 values) of ThunderSTORM's CSV for ``em``."""
    size, xyz, width, prec, three_d = _columns(em, px_size_nm, width_px, three_d, precision)
    n = len(em)
    x_nm, y_nm = decode_to_thunderstorm_nm(xyz[:, :2], size)
    bg = np.full(n, np.nan) if em.bg is None else em.bg.double().numpy()
    cols = {"id": em.id.numpy(), "frame": em.frame_ix.numpy() + 1, "x [nm]": x_nm, "y [nm]": y_nm,
            "z [nm]": xyz[:, 2],
            "sigma [nm]": np.sqrt(width[:, 0] * size[0] * width[:, 1] * size[1]),
            "intensity [photon]": em.phot.double().numpy(), "offset [photon]": bg,
            "bkgstd [photon]": np.sqrt(np.clip(bg, 0, None)),
            "uncertainty [nm]": np.sqrt((prec[:, 0] ** 2 * size[0] ** 2 + prec[:, 1] ** 2 * size[1] ** 2) / 2)}
    cols["uncertainty_xy [nm]"] = cols["uncertainty [nm]"]
    cols["uncertainty_z [nm]"] = prec[:, 2]
    names = TS_COLUMNS_3D if three_d else TS_COLUMNS_2D
    values = np.stack([np.asarray(cols[c], dtype=np.float64) for c in names], 1) if n else np.zeros((0, len(names)))
    order = np.argsort(values[:, 1], kind="stable") if n else slice(None)
    return names, values[order]


def thunderstorm_protocol_path(path: Union[str, pathlib.Path]) -> pathlib.Path:
    """``<name>-protocol.txt`` next to the CSV, where ThunderSTORM itself writes how a table was made."""
    path = pathlib.Path(path)
    return path.with_name(path.stem + "-protocol.txt")


def save_thunderstorm(path: Union[str, pathlib.Path], em: EmitterSet, px_size_nm=None,
                      width_px: Optional[np.ndarray] = None, three_d: Optional[bool] = None,
                      n_frames: Optional[int] = None, psf: Optional[CrlbModel] = None,
                      card: Optional[ModelCard] = None) -> pathlib.Path:
    """Write ThunderSTORM's results CSV (quoted header with units, nm, frames from 1) and, next to it,
    ``<name>-protocol.txt`` saying what the columns are (the CSV's header has room for names only).

    Rows no reader can use are dropped with a warning (:func:`readable_rows`); arguments as :func:`save_picasso`.
    """
    path = pathlib.Path(path)
    em, size, width, prec = _prepare(em, n_frames, px_size_nm, width_px, psf, card,
                                     f"ThunderSTORM export {path.name}")
    names, values = thunderstorm_table(em, size, width, three_d, prec.sigma_E3)
    fmt = ["%d" if c in ("id", "frame") else "%.6f" for c in names]
    protocol = (f"decode-var {__version__} localizations for ThunderSTORM: {path.name}\n"
                "x [nm], y [nm]: x = column, y = row of the camera frame, from the image corner (pixel i centred on "
                "i + 0.5 px); frame: from 1\n"
                f"uncertainty: {prec.describe(('rows', 'columns', 'z'))}\n")

    def write(tmp):
        with open(tmp, "w", newline="") as f:
            f.write(",".join(f'"{c}"' for c in names) + "\n")
            for s in range(0, len(values), 100_000):
                block = io.StringIO()
                np.savetxt(block, values[s:s + 100_000], fmt=fmt, delimiter=",")
                f.write(block.getvalue().replace("nan", "NaN"))  # Java's Double.parseDouble reads only "NaN"
        atomic_write_text(thunderstorm_protocol_path(path), protocol)

    return atomic_write(path, write)


# one entry point ----------------------------------------------------------------------------------
def export_paths(out: Union[str, pathlib.Path], fmt: str) -> pathlib.Path:
    """Where ``--format fmt`` goes next to the DECODE emitter file ``out``."""
    out = pathlib.Path(out)
    if fmt == "decode":
        return out
    if fmt == "picasso":
        return out.with_name(out.stem + "_locs.hdf5")
    if fmt == "thunderstorm":
        return out.with_name(out.stem + "_thunderstorm.csv")
    raise InputDataError(f"Unknown export format {fmt!r}; use one of {', '.join(FORMATS)}.")


def export(em: EmitterSet, path: Union[str, pathlib.Path], fmt: str, frame_shape: Optional[Sequence[int]] = None,
           n_frames: Optional[int] = None, px_size_nm=None, psf: Optional[CrlbModel] = None,
           card: Optional[ModelCard] = None) -> pathlib.Path:
    """Write ``em`` to ``path`` in ``fmt`` (decode: .h5/.csv/.pt by suffix; picasso; thunderstorm).

    ``frame_shape`` (size_x, size_y px) and ``n_frames`` describe the movie for Picasso; without them the field
    of view and the frames are taken from the localizations. ``psf`` (the run's PSF model and camera,
    :meth:`CrlbModel.parse`) gives the pixel size when the emitters have none, the PSF widths and the CRLB; ``card`` (the model's, :func:`load_card`) calibrates it.
    """
    if fmt not in FORMATS:
        raise InputDataError(f"Unknown export format {fmt!r}; use one of {', '.join(FORMATS)}.")
    if px_size_nm is None and em.px_size is None and psf is not None:
        px_size_nm = psf.px_size
    if fmt == "decode":
        return save_emitters(path, em)
    if fmt == "thunderstorm":
        return save_thunderstorm(path, em, px_size_nm, None, None, n_frames, psf, card)
    return save_picasso(path, em, frame_shape, n_frames, px_size_nm, None, None, psf, card)


def write_fit_outputs(param_file, em: EmitterSet, out, frames, formats: Sequence[str] = ("decode",),
                      render: bool = True, model=None) -> list[pathlib.Path]:
    """What ``decode-var-fit`` writes after its DECODE emitter file ``out``: the ``--format`` exports and the render.

    The camera frame size and frame count come from the TIFF ``frames``; pixel size and PSF from the param; the
    precision calibration from the card next to ``model`` (the model file or its folder; none: uncalibrated).
    A render that cannot be made (e.g. a field of view too large for 10 nm pixels) is reported on stderr and
    skipped: the emitters are saved already.

    Returns the paths written.
    """
    param = load_param(param_file)
    report = getattr(em, "fit_report", None)
    if report is not None:  # decode-var-fit has read the movie: its record, not a second pass over the files
        frame_shape, n_frames = tuple(report.frame_hw), report.n_frames
    else:
        with open_stack(frames) as stack:
            frame_shape, n_frames = tuple(int(v) for v in stack.shape[1:]), len(stack)
    if em.px_size is None:
        em.px_size = torch.tensor(param.Camera.px_size, dtype=torch.float32)
    card = load_card(model) if model is not None else None
    psf = CrlbModel.parse(param)
    written = []
    for fmt in dict.fromkeys(formats):  # once each, in the order given
        if fmt != "decode":  # --out itself is DECODE's format
            written.append(export(em, export_paths(out, fmt), fmt, frame_shape, n_frames, None, psf, card))
    if render:
        png = pathlib.Path(out).with_name(pathlib.Path(out).stem + "_render.png")
        try:
            image = render_image(em, frame_shape)
            written += save_render(image, png, title=f"{pathlib.Path(out).name}: {len(em)} localizations, "
                                                     f"{n_frames} frames, Gaussian {image.px_nm:g} nm px")
        except InputDataError as err:
            warn(f"rendering skipped: {err}")
    return written
