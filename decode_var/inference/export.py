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

Columns a network does not predict are filled, and documented in docs/spline_render_export.md:
PSF widths (sx, sy, sigma) come from the PSF model of the run at each emitter's z (or a nominal width);
the localization precision (lpx, lpy, uncertainty) is the predicted sigma when the model gives one,
else the CRLB when set, else the shot-noise estimate ``PSF width / sqrt(photons)``; bkgstd is the
Poisson estimate ``sqrt(bg)``.
"""
from __future__ import annotations

import math
import pathlib
from typing import Optional, Sequence, Union

import numpy as np
import torch

from decode_var.core.atomic import atomic_write
from decode_var.core.emitters import EmitterSet
from decode_var.core.errors import InputDataError

__all__ = ["FORMATS", "export", "save_picasso", "save_thunderstorm", "decode_to_picasso_px",
           "decode_to_thunderstorm_nm", "psf_width_px", "export_paths", "write_fit_outputs"]

FORMATS = ("decode", "picasso", "thunderstorm")
TS_COLUMNS_2D = ("id", "frame", "x [nm]", "y [nm]", "sigma [nm]", "intensity [photon]", "offset [photon]",
                 "bkgstd [photon]", "uncertainty [nm]")
TS_COLUMNS_3D = ("id", "frame", "x [nm]", "y [nm]", "z [nm]", "sigma [nm]", "intensity [photon]", "offset [photon]",
                 "bkgstd [photon]", "uncertainty_xy [nm]", "uncertainty_z [nm]")


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


def _precision_px(em: EmitterSet, px_size_nm: np.ndarray, width_px: np.ndarray) -> np.ndarray:
    """(E, 3) localization precision (standard deviation) along DECODE x, y in px and z in nm.

    The model's predicted sigma where set, else the CRLB where set, else ``width / sqrt(photons)`` laterally
    (the shot-noise limit; nan in z).
    """
    n = len(em)
    out = np.full((n, 3), np.nan)
    phot = np.clip(em.phot.double().numpy(), 1e-9, None)
    out[:, :2] = width_px / np.sqrt(phot)[:, None]
    for field, is_var in (("xyz_cr", True), ("xyz_sig", False)):  # later wins: the prediction first
        v = getattr(em, field)
        if v is None:
            continue
        v = v.double().numpy().copy()
        v = np.sqrt(np.clip(v, 0, None)) if is_var else v
        if em.xy_unit == "nm":
            v[:, :2] = v[:, :2] / px_size_nm
        ok = np.isfinite(v)
        out[ok] = v[ok]
    return out


def psf_width_px(param, z_nm: np.ndarray) -> np.ndarray:
    """(E, 2) PSF standard deviation along DECODE x, y in px at each z (nm), from the run's PSF model.

    Gaussian PSF: its astigmatic widths. Spline PSF: the second moments of the calibration's ROI, on a z grid
    across the calibrated range, interpolated. Without a param: 1 px.
    """
    z_nm = np.asarray(z_nm, dtype=np.float64).reshape(-1)
    if param is None:
        return np.ones((z_nm.size, 2))
    if param.VAR.psf == "spline":
        from decode_var.data.spline_psf import SplinePSF, load_calibration

        calib = load_calibration(param.InOut.calibration_file)
        nx, ny, _ = calib.shape
        psf = SplinePSF((-0.5, nx - 0.5), (-0.5, ny - 0.5), (nx, ny), calib)
        lo, hi = calib.z_range_nm
        grid = np.linspace(lo + 1e-3 * (hi - lo), hi, 65)
        centre = torch.tensor(calib.ref0[:2], dtype=torch.float64)
        xyz = torch.cat([centre.expand(grid.size, 2), torch.from_numpy(grid)[:, None]], 1)
        rois, corner = psf.rois(xyz, torch.ones(grid.size, dtype=torch.float64))
        rois = rois.clamp_min(0)
        w = []
        for axis, coord in ((2, torch.arange(rois.size(1), dtype=torch.float64)),
                            (1, torch.arange(rois.size(2), dtype=torch.float64))):
            prof = rois.sum(axis)
            mean = (prof * coord).sum(1) / prof.sum(1)
            w.append((((coord - mean[:, None]) ** 2 * prof).sum(1) / prof.sum(1)).sqrt().numpy())
        return np.stack([np.interp(z_nm, grid, w[0]), np.interp(z_nm, grid, w[1])], 1)
    g = param.VAR.gaussian_psf
    if not g.mode_3d:
        return np.full((z_nm.size, 2), float(g.sigma_0))
    from decode_var.data.simulation import astigmatism

    return astigmatism(torch.from_numpy(z_nm), g.sigma_0, g.foc_shift, g.rl_range).numpy()


def _is_3d(em: EmitterSet) -> bool:
    return bool(len(em)) and bool((em.xyz[:, 2] != 0).any())


def _columns(em: EmitterSet, px_size_nm, width_px, three_d):
    """What every export reads: px size (nm), DECODE positions (px, px, nm), PSF widths (px), localization
    precisions (px, px, nm) and whether the set is 3D."""
    size = _px_size(em, px_size_nm)
    n = len(em)
    width = np.ones((n, 2)) if width_px is None else np.broadcast_to(np.asarray(width_px, np.float64), (n, 2))
    return size, _xyz_px(em, size), width, _precision_px(em, size, width), (_is_3d(em) if three_d is None else three_d)


# Picasso ------------------------------------------------------------------------------------------
def picasso_table(em: EmitterSet, px_size_nm, width_px: Optional[np.ndarray] = None,
                  three_d: Optional[bool] = None) -> np.ndarray:
    """Picasso's localization table (numpy structured array, sorted by frame) for ``em``."""
    size, xyz, width, prec, three_d = _columns(em, px_size_nm, width_px, three_d)
    n = len(em)
    with_lpz = three_d and bool(np.isfinite(prec[:, 2]).all())  # optional in Picasso: left out when unknown
    fields = [("frame", "u4"), ("x", "f4"), ("y", "f4"), ("photons", "f4"), ("sx", "f4"), ("sy", "f4"), ("bg", "f4"),
              ("lpx", "f4"), ("lpy", "f4")] + ([("z", "f4")] if three_d else []) + ([("lpz", "f4")] if with_lpz else [])
    table = np.zeros(n, dtype=fields)
    if n and int(em.frame_ix.min()) < 0:
        raise InputDataError("Emitters with a negative frame index cannot be exported (Picasso counts frames from 0).")
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


def save_picasso(path: Union[str, pathlib.Path], em: EmitterSet, frame_shape: Sequence[int],
                 n_frames: Optional[int] = None, px_size_nm=None, width_px: Optional[np.ndarray] = None,
                 three_d: Optional[bool] = None) -> pathlib.Path:
    """Write Picasso's localization HDF5 (``path``, e.g. ``*_locs.hdf5``) and its ``.yaml`` sidecar.

    Args:
        frame_shape: (size_x, size_y) of the camera frames in px (DECODE's order: rows, columns).
        n_frames: frames of the movie (default: last frame index + 1).
        px_size_nm: (2,) nm per px (default: the emitters' ``px_size``); Picasso needs square pixels.
        width_px: (E, 2) or (2,) PSF widths along DECODE x, y in px (see :func:`psf_width_px`).
    """
    import h5py
    import yaml

    path = pathlib.Path(path)
    if path.suffix.lower() not in (".hdf5", ".h5"):
        raise InputDataError(f"A Picasso file must end in .hdf5 (e.g. emitters_locs.hdf5), got {path}.")
    size = _px_size(em, px_size_nm)
    if abs(size[0] - size[1]) > 1e-6 * size[0]:
        raise InputDataError(f"Picasso assumes square pixels, but the pixel size is {size.tolist()} nm. Resample, or "
                             "use the ThunderSTORM export (nm).")
    table = picasso_table(em, size, width_px, three_d)
    frames = int(n_frames) if n_frames is not None else (int(em.frame_ix.max()) + 1 if len(em) else 0)
    from decode_var import __version__

    info = [{"Generated by": f"decode-var {__version__} (DECODE frame convention converted: x = column, "
                             "pixel centres at integers)",
             "Width": int(frame_shape[1]), "Height": int(frame_shape[0]), "Frames": frames,
             "Pixelsize": float(size[0])}]
    yaml_path = path.with_suffix(".yaml")

    def write(tmp):
        with h5py.File(tmp, "w") as f:
            f.create_dataset("locs", data=table)
        # the sidecar goes in just before the table is renamed into place
        atomic_write(yaml_path, lambda t: pathlib.Path(t).write_text(yaml.safe_dump_all(info, default_flow_style=False)))

    return atomic_write(path, write)


# ThunderSTORM -------------------------------------------------------------------------------------
def thunderstorm_table(em: EmitterSet, px_size_nm=None, width_px: Optional[np.ndarray] = None,
                       three_d: Optional[bool] = None) -> tuple[tuple, np.ndarray]:
    """(column names, (E, C) float64 values) of ThunderSTORM's CSV for ``em``."""
    size, xyz, width, prec, three_d = _columns(em, px_size_nm, width_px, three_d)
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


def save_thunderstorm(path: Union[str, pathlib.Path], em: EmitterSet, px_size_nm=None,
                      width_px: Optional[np.ndarray] = None, three_d: Optional[bool] = None) -> pathlib.Path:
    """Write ThunderSTORM's results CSV (quoted header with units, nm, frames from 1)."""
    path = pathlib.Path(path)
    names, values = thunderstorm_table(em, px_size_nm, width_px, three_d)
    fmt = ["%d" if c in ("id", "frame") else "%.6f" for c in names]

    def write(tmp):
        import io

        with open(tmp, "w", newline="") as f:
            f.write(",".join(f'"{c}"' for c in names) + "\n")
            for s in range(0, len(values), 100_000):
                block = io.StringIO()
                np.savetxt(block, values[s:s + 100_000], fmt=fmt, delimiter=",")
                f.write(block.getvalue().replace("nan", "NaN"))  # Java's Double.parseDouble reads only "NaN"

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
           n_frames: Optional[int] = None, px_size_nm=None, param=None) -> pathlib.Path:
    """Write ``em`` to ``path`` in ``fmt`` (decode: .h5/.csv/.pt by suffix; picasso; thunderstorm).

    ``frame_shape`` (size_x, size_y px) is needed for Picasso; without it the field of view is taken from the
    localizations. ``param`` (the run's) gives the pixel size when the emitters have none, and the PSF widths.
    """
    if fmt not in FORMATS:
        raise InputDataError(f"Unknown export format {fmt!r}; use one of {', '.join(FORMATS)}.")
    if px_size_nm is None and em.px_size is None and param is not None:
        px_size_nm = param.Camera.px_size
    if fmt == "decode":
        from decode_var.data.emitter_io import save_emitters

        return save_emitters(path, em)
    width = psf_width_px(param, em.xyz[:, 2].numpy()) if len(em) else np.ones((0, 2))
    if fmt == "thunderstorm":
        return save_thunderstorm(path, em, px_size_nm, width)
    if frame_shape is None:
        xyz = _xyz_px(em, _px_size(em, px_size_nm)) if len(em) else np.zeros((0, 3))
        frame_shape = tuple(int(math.ceil(v + 0.5)) for v in (xyz[:, :2].max(0) if len(em) else (0.5, 0.5)))
    return save_picasso(path, em, frame_shape, n_frames, px_size_nm, width)


def write_fit_outputs(param_file, em: EmitterSet, out, frames, formats: Sequence[str] = ("decode",),
                      render: bool = True) -> list[pathlib.Path]:
    """What ``decode-var-fit`` writes after its DECODE emitter file ``out``: the ``--format`` exports and the render.

    The camera frame size comes from the TIFF ``frames``; pixel size and PSF from the param. A render that
    cannot be made (e.g. a field of view too large for 10 nm pixels) is reported on stderr and skipped: the
    emitters are saved already.

    Returns the paths written.
    """
    from decode_var.config.param import load_param
    from decode_var.core.log import warn
    from decode_var.data.tiff import TiffStack

    param = load_param(param_file)
    stack = TiffStack(frames)
    frame_shape, n_frames = tuple(int(v) for v in stack.shape[1:]), len(stack)
    if em.px_size is None:
        em.px_size = torch.tensor(param.Camera.px_size, dtype=torch.float32)
    written = []
    for fmt in dict.fromkeys(formats):  # once each, in the order given
        if fmt != "decode":  # --out itself is DECODE's format
            written.append(export(em, export_paths(out, fmt), fmt, frame_shape, n_frames, None, param))
    if render:
        from decode_var.inference.render import render as render_image, save_render

        png = pathlib.Path(out).with_name(pathlib.Path(out).stem + "_render.png")
        try:
            image = render_image(em, frame_shape)
            written += save_render(image, png, title=f"{pathlib.Path(out).name}: {len(em)} localizations, "
                                                     f"{n_frames} frames, Gaussian {image.px_nm:g} nm px")
        except InputDataError as err:
            warn(f"rendering skipped: {err}")
    return written
