"""Super-resolution rendering of localizations: histogram or Gaussian, z colour-coded, with a scale bar.

The image has the camera frame's orientation: rows follow DECODE's x (the first image axis), columns y, and
the field of view is the frames' ``[-0.5, size - 0.5)`` px, so the render overlays the raw movie. Render
pixels are ``px_nm`` nm (default 10). Localizations are accumulated chunk by chunk into one image (never one
image per frame), so fits of millions of localizations render in the memory of the final image:

- ``hist``: localizations per render pixel;
- ``gaussian``: the histogram blurred with a Gaussian of ``sigma_nm`` (default: the median lateral
  localization precision of the emitters when they carry one, at least one render pixel; else 2 render
  pixels): a fixed-width Gaussian render;
- ``precision``: each localization a Gaussian of its own lateral precision (``xyz_sig``, a model's predicted
  sigma, else the square root of ``xyz_cr``; localizations without one take the median; at least half a
  render pixel), as Picasso's "individual localization precision" blur. The localizations are grouped into
  bins of sigma 10 % apart, each bin accumulated and blurred once: the cost is a few dozen blurs of the
  image, whatever the number of localizations.

For 3D data each pixel is coloured by the mean z of its localizations (weighted like the density, colour
map ``turbo`` over ``z_range``) and its brightness is the density. Outputs (:func:`save_render`): a PNG with
a scale bar (and a z colour bar for 3D), and a float32 TIFF for analysis (page 0: density, localizations
per pixel; page 1 for 3D: mean z in nm), with the pixel size in ImageJ's resolution tags.
"""
from __future__ import annotations

import math
import pathlib
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import numpy as np
import tifffile
import torch

from decode_var.core.atomic import atomic_write
from decode_var.core.emitters import EmitterSet
from decode_var.core.errors import InputDataError
from decode_var.core.log import warn

__all__ = ["Render", "render", "save_render", "MAX_RENDER_PX", "MODES"]

MODES = ("gaussian", "hist", "precision")
#: neighbouring sigma bins of the ``precision`` render are this factor apart
SIGMA_BIN_RATIO = 1.1

#: refuse renders larger than this many pixels (a 16k x 16k image), with the fix in the message
MAX_RENDER_PX = 2 ** 28


@dataclass
class Render:
    """A rendered image.

    Attributes:
        density_HW: localizations per render pixel (blurred for ``gaussian``), float64.
        z_HW: mean z in nm per pixel (nan where empty), or None for 2D.
        px_nm: render pixel size, nm.
        z_range: (low, high) nm of the colour scale, or None.
        mode: 'hist', 'gaussian' or 'precision'; sigma_nm: the blur used (0 for hist; the median one for
            precision).
    """

    density_HW: np.ndarray
    z_HW: Optional[np.ndarray]
    px_nm: float
    z_range: Optional[tuple]
    mode: str
    sigma_nm: float


def _render_index(xy_px: np.ndarray, camera_px_nm: np.ndarray, px_nm: float, shape_HW) -> np.ndarray:
    """DECODE px (pixel i centred on i, FOV from -0.5) -> flat render-pixel index, -1 outside the image."""
    r = np.floor((xy_px[:, 0] + 0.5) * camera_px_nm[0] / px_nm).astype(np.int64)
    c = np.floor((xy_px[:, 1] + 0.5) * camera_px_nm[1] / px_nm).astype(np.int64)
    inside = (r >= 0) & (r < shape_HW[0]) & (c >= 0) & (c < shape_HW[1])
    return np.where(inside, r * shape_HW[1] + c, -1)


def _lateral_precision_nm(em: EmitterSet, camera_px_nm: np.ndarray) -> Optional[np.ndarray]:
    """The finite lateral precisions (nm) of ``em``'s first field that has any (``xyz_sig``, ``xyz_cr``)."""
    v = _each_lateral_precision_nm(em, camera_px_nm)
    return None if v is None else v[np.isfinite(v)]


def _each_lateral_precision_nm(em: EmitterSet, camera_px_nm: np.ndarray) -> Optional[np.ndarray]:
    """(E,) lateral precision ``sqrt((sx^2 + sy^2) / 2)`` in nm from ``xyz_sig``, else ``sqrt(xyz_cr)`` (the first
    field with a finite value; nan where a row has none), or None when neither has one."""
    for field, is_var in (("xyz_sig", False), ("xyz_cr", True)):
        v = getattr(em, field)
        if v is None:
            continue
        v = v[:, :2].double().numpy()
        v = np.sqrt(np.clip(v, 0, None)) if is_var else v
        if em.xy_unit == "px":
            v = v * camera_px_nm
        v = np.sqrt((v ** 2).mean(1))
        if np.isfinite(v).any():
            return v
    return None


def _finite_rows(em: EmitterSet, camera_px_nm: np.ndarray) -> tuple[EmitterSet, np.ndarray]:
    """(the localizations with finite x, y, z, their (E, 3) x, y in px and z in nm); the others are skipped
    with a warning giving their count (a render has no place for them)."""
    xyz = EmitterSet(em.xyz, em.phot, em.frame_ix, xy_unit=em.xy_unit, px_size=camera_px_nm).xyz_px.double().numpy()
    ok = np.isfinite(xyz).all(1)
    if not ok.all():
        warn(f"render: {int((~ok).sum())} of {len(em)} localizations with a non-finite x, y or z skipped.")
        em, xyz = em[torch.from_numpy(ok)], xyz[ok]
    return em, xyz


def render(em: EmitterSet, frame_shape: Optional[Sequence[int]] = None, camera_px_nm=None, px_nm: float = 10.0,
           mode: str = "gaussian", sigma_nm: Optional[float] = None, color_z: Optional[bool] = None,
           z_range: Optional[Sequence[float]] = None, chunk: int = 1_000_000) -> Render:
    """Render ``em`` on the camera field of view; localizations with a non-finite x, y or z are skipped (counted
    in a warning).

    Args:
        frame_shape: (size_x, size_y) px of the camera frames; default: the localizations' extent.
        camera_px_nm: (2,) nm per camera px; default: the emitters' ``px_size``.
        px_nm: render pixel size, nm.
        mode: 'gaussian' or 'hist'.
        sigma_nm: Gaussian blur, nm (see the module docstring for the default).
        color_z: colour by z; default: when any z is not 0.
        z_range: (low, high) nm of the colour scale; default: the 1st and 99th percentile of z.
        chunk: localizations accumulated at a time.
    """
    if mode not in MODES:
        raise InputDataError(f"Render mode must be 'gaussian' or 'hist', or 'precision' (each localization blurred by "
                             f"its own precision), got {mode!r}.")
    if not (px_nm > 0 and math.isfinite(px_nm)):
        raise InputDataError(f"Render pixel size must be > 0 nm, got {px_nm}.")
    size = em.px_size if camera_px_nm is None else camera_px_nm
    if size is None:
        raise InputDataError("The emitters have no camera pixel size: pass --camera-px NM NM (or -p param_run.yaml).")
    camera_px_nm = np.broadcast_to(np.asarray(np.asarray(size, dtype=np.float64).reshape(-1)), (2,)).astype(np.float64)
    em, xyz = _finite_rows(em, camera_px_nm)
    if frame_shape is None:
        frame_shape = [int(math.ceil(v + 0.5)) for v in (xyz[:, :2].max(0) if len(em) else (0.5, 0.5))]
    shape_HW = tuple(max(1, int(math.ceil(frame_shape[i] * camera_px_nm[i] / px_nm))) for i in range(2))
    if shape_HW[0] * shape_HW[1] > MAX_RENDER_PX:
        raise InputDataError(f"A {shape_HW[0]} x {shape_HW[1]} px render at {px_nm} nm is too large; choose a larger "
                             "render pixel (--px-size) or a smaller field of view.")
    color_z = bool(len(em)) and bool(np.any(xyz[:, 2] != 0)) if color_z is None else color_z
    used_sigma = 0.0
    if mode == "precision":
        density, z_sum, used_sigma = _render_own_sigma(em, xyz, camera_px_nm, px_nm, shape_HW, color_z, chunk)
    else:
        density, z_sum = _accumulate(xyz, camera_px_nm, px_nm, shape_HW, color_z, chunk)
    if mode == "gaussian":
        from scipy.ndimage import gaussian_filter  # lazy: 0.25 s, and the hist mode does without

        if sigma_nm is None:
            prec = _lateral_precision_nm(em, camera_px_nm)
            sigma_nm = max(px_nm, float(np.median(prec))) if prec is not None and len(prec) else 2 * px_nm
        used_sigma = float(sigma_nm)
        density = gaussian_filter(density, used_sigma / px_nm, mode="constant")
        if z_sum is not None:
            z_sum = gaussian_filter(z_sum, used_sigma / px_nm, mode="constant")
    z_mean = None
    if z_sum is not None:
        with np.errstate(invalid="ignore", divide="ignore"):
            z_mean = np.where(density > 1e-12, z_sum / np.maximum(density, 1e-300), np.nan)
        if z_range is None:
            z_range = tuple(np.percentile(xyz[:, 2], [1, 99])) if len(em) else (-1.0, 1.0)
            if z_range[1] <= z_range[0]:
                z_range = (z_range[0] - 1.0, z_range[0] + 1.0)
        z_range = (float(z_range[0]), float(z_range[1]))
    return Render(density, z_mean, float(px_nm), z_range if color_z else None, mode, used_sigma)


def _render_own_sigma(em: EmitterSet, xyz: np.ndarray, camera_px_nm, px_nm: float, shape_HW, color_z: bool,
                      chunk: int):
    """(density, z sum or None, median sigma in nm) of the ``precision`` render: each localization blurred by
    its own lateral precision, binned by sigma (bins ``SIGMA_BIN_RATIO`` apart, each blurred once)."""
    from scipy.ndimage import gaussian_filter  # lazy: as in render

    sigma_nm = _each_lateral_precision_nm(em, camera_px_nm)
    if sigma_nm is None:
        raise InputDataError("The 'precision' render blurs each localization by its own precision, but these "
                             "localizations carry none (xyz_sig or xyz_cr): use the 'gaussian' render, or fit with a "
                             "model trained with VAR.model.uncertainty: true.")
    finite = np.isfinite(sigma_nm)
    sigma_px = np.where(finite, sigma_nm, np.median(sigma_nm[finite]) if finite.any() else px_nm) / px_nm
    sigma_px = np.maximum(sigma_px, 0.5)
    bins = np.round(np.log(sigma_px) / np.log(SIGMA_BIN_RATIO)).astype(np.int64)
    density, z_sum = np.zeros(shape_HW), (np.zeros(shape_HW) if color_z else None)
    for b in np.unique(bins):
        sel = bins == b
        d, z = _accumulate(xyz[sel], camera_px_nm, px_nm, shape_HW, color_z, chunk)
        blur = float(SIGMA_BIN_RATIO ** b)
        density += gaussian_filter(d, blur, mode="constant")
        if color_z:
            z_sum += gaussian_filter(z, blur, mode="constant")
    return density, z_sum, float(np.median(sigma_px) * px_nm) if len(sigma_px) else 0.0


def _accumulate(xyz: np.ndarray, camera_px_nm, px_nm: float, shape_HW, color_z: bool, chunk: int):
    """(localizations per render px, sum of their z in nm or None) as (H, W) arrays, ``chunk`` at a time."""
    n_px = shape_HW[0] * shape_HW[1]
    density = np.zeros(n_px)
    z_sum = np.zeros(n_px) if color_z else None
    for s in range(0, len(xyz), chunk):
        idx = _render_index(xyz[s:s + chunk, :2], camera_px_nm, px_nm, shape_HW)
        ok = idx >= 0
        density += np.bincount(idx[ok], minlength=n_px)
        if color_z:
            z_sum += np.bincount(idx[ok], weights=xyz[s:s + chunk, 2][ok], minlength=n_px)
    return density.reshape(shape_HW), None if z_sum is None else z_sum.reshape(shape_HW)


def to_rgb(r: Render, saturation_percentile: float = 99.5) -> np.ndarray:
    """(H, W, 3) float RGB in [0, 1]: brightness = density (saturated at a percentile of the lit pixels),
    hue = z (turbo) for 3D, 'hot' for 2D."""
    import matplotlib  # lazy: 0.2 s at the start of decode-var-fit, which writes a render only at the end

    lit = r.density_HW[r.density_HW > 0]
    top = float(np.percentile(lit, saturation_percentile)) if lit.size else 1.0
    bright = np.clip(r.density_HW / max(top, 1e-12), 0, 1)
    if r.z_HW is None:
        return matplotlib.colormaps["hot"](bright)[..., :3]
    lo, hi = r.z_range
    hue = np.clip((np.nan_to_num(r.z_HW, nan=lo) - lo) / (hi - lo), 0, 1)
    return matplotlib.colormaps["turbo"](hue)[..., :3] * bright[..., None]


def _scale_bar_nm(width_nm: float) -> float:
    """A round length (1, 2 or 5 x 10^k nm) near a fifth of the image width."""
    target = width_nm / 5
    k = 10 ** math.floor(math.log10(max(target, 1e-9)))
    return max((m * k for m in (1, 2, 5) if m * k <= target), default=k)


def save_render(r: Render, png: Union[str, pathlib.Path], tiff: Optional[Union[str, pathlib.Path]] = None,
                title: Optional[str] = None) -> list[pathlib.Path]:
    """Write the PNG (scale bar, z colour bar for 3D) and the float32 TIFF (default: the PNG's path with .tif)."""
    # lazy: matplotlib's figure costs 0.4 s at the start of decode-var-fit, which writes a render only at the end
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    png = pathlib.Path(png)
    tiff = png.with_suffix(".tif") if tiff is None else pathlib.Path(tiff)
    rgb = to_rgb(r)
    h, w = rgb.shape[:2]
    dpi = 100
    scale = max(1.0, 480 / max(h, w))  # small renders are shown larger, nearest-neighbour
    fig = Figure(figsize=(w * scale / dpi + (1.4 if r.z_HW is not None else 0.0), h * scale / dpi + 0.3), dpi=dpi)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0, 0, w * scale / dpi / fig.get_figwidth(), 1 - 0.3 / fig.get_figheight()))
    ax.imshow(rgb, interpolation="nearest")
    ax.set_axis_off()
    bar_nm = _scale_bar_nm(w * r.px_nm)
    bar_px = bar_nm / r.px_nm
    ax.add_patch(Rectangle((w - 0.05 * w - bar_px, h - 0.06 * h), bar_px, max(1.0, 0.012 * h), color="white"))
    ax.text(w - 0.05 * w - bar_px / 2, h - 0.075 * h, f"{bar_nm / 1000:g} µm" if bar_nm >= 1000 else f"{bar_nm:g} nm",
            color="white", ha="center", va="bottom", fontsize=9)
    fig.text(0.01, 1 - 0.2 / fig.get_figheight(), title or f"{r.mode} render, {r.px_nm:g} nm px"
             + (f", sigma {r.sigma_nm:.0f} nm" if r.mode == "gaussian" else "")
             + (f", own sigma (median {r.sigma_nm:.0f} nm)" if r.mode == "precision" else ""), fontsize=8, va="center", color="white")
    if r.z_HW is not None:
        import matplotlib  # lazy: as above

        cax = fig.add_axes((1 - 0.9 / fig.get_figwidth(), 0.15, 0.15 / fig.get_figwidth(), 0.7))
        sm = matplotlib.cm.ScalarMappable(norm=matplotlib.colors.Normalize(*r.z_range), cmap="turbo")
        fig.colorbar(sm, cax=cax).set_label("z [nm]", fontsize=8, color="white")
        cax.tick_params(labelsize=7, colors="white")
    out = [atomic_write(png, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi, facecolor="black"))]
    pages = np.stack([r.density_HW, r.z_HW], 0) if r.z_HW is not None else r.density_HW[None]
    px_um = r.px_nm / 1000.0
    out.append(atomic_write(tiff, lambda tmp: tifffile.imwrite(
        tmp, pages.astype(np.float32), imagej=True, resolution=(1 / px_um, 1 / px_um),
        metadata={"unit": "um", "axes": "CYX", "Labels": ["density [locs/px]", "z [nm]"][:len(pages)]})))
    return out
