"""``decode-var-init``'s estimates, key by key: a movie sample and what the user knows -> a complete param.

The user's ``known.yaml`` (a partial param) says what is known; every key it gives is kept as given. The
rest is estimated from the movie (:mod:`decode_var.data.estimate`) or, where a movie cannot tell (the
quantum efficiency, the read noise), taken from decode-var's defaults. Every key written carries a note: its
value's source and how it was estimated. Where the movie disagrees with a given camera key by more than
:data:`CAMERA_TOLERANCE`, a warning names the key and both values.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch

from decode_var.config.param import load_reference, param_from_dict
from decode_var.core.errors import InputDataError, ParamError
from decode_var.core.scales import ScaleSchedule
from decode_var.data import estimate as est
from decode_var.data.movie import simulate_movie
from decode_var.data.simulation import Camera, GaussianPSF, Simulator
from decode_var.data.spline_psf import SplinePSF

#: Relative disagreement between a given camera key and the movie's photon transfer that is warned about.
CAMERA_TOLERANCE = 0.25
#: Read noise (electrons) taken for an sCMOS camera when known.yaml gives none (the default, 74.4, is an EMCCD's).
SCMOS_READ_SIGMA = 1.6
#: Largest relative standard error of the photon transfer line's slope, and of the baseline it gives (relative to
#: the background above the baseline), for them to count as measured: a flat, steady background gives no line.
MAX_TRANSFER_ERROR = 0.05
#: Frames the calibration simulates at least (more than a short movie has: a steadier comparison).
MIN_SIM_FRAMES = 400


@dataclass
class Key:
    """One key of the written param: its value and the note written next to it."""

    value: Any
    note: str
    estimated: bool = True


@dataclass
class InitResult:
    """Everything ``decode-var-init`` found (the keys to write and what the report shows).

    Attributes:
        keys: ``"Section.key"`` -> :class:`Key`. warnings: one line each.
        camera: the camera the frames were converted with. photons_BTHW, bg_BTHW: the sample in photons and
        its background maps (photons / px). background: the background settings. real, spots: the sample's
        measured values and spots. settings: the emitter settings found. sim: the measured values of a movie
        simulated with them. roi: the fit's ROI, px.
    """

    keys: dict
    warnings: list
    camera: Camera
    photons_BTHW: torch.Tensor
    bg_BTHW: torch.Tensor
    background: est.BackgroundModel
    real: est.SpotStats
    spots: est.Spots
    settings: est.EmitterSettings
    sim: est.SpotStats
    roi: int
    transfer: Optional[est.PhotonTransfer] = None


def get(data: dict, path: str, default=None):
    """``data["A"]["b"]`` for ``path`` ``"A.b"``; ``default`` where a level is missing."""
    for part in path.split("."):
        if not isinstance(data, dict) or part not in data:
            return default
        data = data[part]
    return data


def given(data: dict, path: str) -> bool:
    """Whether the (raw) param ``data`` sets ``path``."""
    marker = object()
    return get(data, path, marker) is not marker


def sample_blocks(stack, max_pixels: float = 2.5e7, block: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
    """A sample of ``stack`` (T, H, W) in evenly spaced blocks of consecutive frames, at most ``max_pixels``
    pixels in all (at least 40 frames): (adu_BTHW float32, frame_BT: each frame's index in the movie).

    Raises:
        InputDataError: fewer than 20 frames.
    """
    T, H, W = (int(v) for v in stack.shape)
    if T < 20:
        raise InputDataError(f"The movie has {T} frames; decode-var-init needs at least 20 consecutive frames "
                             "(the camera and the on-time are measured between consecutive frames).")
    budget = int(min(T, max(40, max_pixels // (H * W))))
    if budget >= T:
        starts, length = [0], T
    else:
        length = min(block, budget)
        starts = np.linspace(0, T - length, max(1, budget // length)).round().astype(int).tolist()
    adu = torch.stack([torch.from_numpy(np.asarray(stack.read(s, s + length), dtype=np.float32)) for s in starts])
    frame_BT = torch.tensor(starts)[:, None] + torch.arange(length)[None]
    return adu, frame_BT


# ------------------------------------------------------------------------------------------ camera
def _camera_type(excess: float, user: dict) -> tuple[bool, str, list]:
    """(EMCCD?, how it was decided, warnings): given by ``Camera.em_gain``, else from the ``excess`` noise."""
    measured = f"the noise's third cumulant (excess ratio {excess:.2f}; 1.0 sCMOS, 1.5 EMCCD)"
    if "em_gain" not in user:
        emccd = excess > est.EXCESS_SPLIT
        return emccd, f"{'EMCCD' if emccd else 'sCMOS'} from {measured}", []
    emccd = user["em_gain"] is not None
    warnings = []
    if emccd and excess < est.EXCESS_SPLIT - 0.1 or not emccd and excess > est.EXCESS_SPLIT + 0.1:
        says = f"{user['em_gain']} (an EMCCD)" if emccd else "empty (an sCMOS)"
        warnings.append(f"Camera.em_gain: known.yaml says {says}, the movie's noise looks like "
                        f"{'an sCMOS' if emccd else 'an EMCCD'}'s: {measured}. Check the camera and its EM gain.")
    return emccd, "given", warnings


def _transfer_slope(pt: est.PhotonTransfer, user: dict, ref: dict) -> tuple[float, str]:
    """The slope (ADU per ADU) and how it was found: a fitted line, or through the baseline (a flat background)."""
    if est.slope_error(pt) <= MAX_TRANSFER_ERROR:
        return pt.slope, (f"photon transfer (variance over mean of background pixels, {pt.mean_lo:.0f} to "
                          f"{pt.mean_hi:.0f} ADU)")
    b = float(user.get("baseline", ref["baseline"]))
    r_adu = float(user["read_sigma"]) / float(user["e_per_adu"]) if "read_sigma" in user and "e_per_adu" in user \
        else 0.0
    return est.slope_through(pt, b, r_adu), (f"photon transfer at one background level ({pt.level:.0f} ADU) and "
                                             f"baseline {b:g} ADU (the background is too flat for a line)")


def _conversion_keys(c_est: float, emccd: bool, how: str, user: dict, ref: dict) -> tuple[dict, list]:
    """``em_gain`` and ``e_per_adu`` from the measured electrons per ADU of one photo-electron ``c_est``."""
    measured = f"{how}: {c_est:.3g} e-/ADU per photo-electron" + (" (EMCCD, excess noise factor 2)" if emccd else "")
    keys, warnings = {}, []
    if "em_gain" in user:
        gain = user["em_gain"]
        keys["em_gain"] = Key(gain, "given", False)
    elif emccd and "e_per_adu" in user:
        gain = round(float(user["e_per_adu"]) / c_est, 3)
        keys["em_gain"] = Key(gain, f"estimated: e_per_adu / ({measured})")
    elif emccd:
        gain = ref["em_gain"]
        keys["em_gain"] = Key(gain, "assumed (decode-var's default): a movie measures only e_per_adu / em_gain", False)
    else:
        gain = None
        keys["em_gain"] = Key(None, "estimated: sCMOS, no EM gain")
    if "e_per_adu" not in user:
        keys["e_per_adu"] = Key(round(c_est * (gain or 1.0), 4),
                                f"estimated: {measured}" + (f" x em_gain {gain:g}" if gain else ""))
        return keys, warnings
    e = float(user["e_per_adu"])
    c_user = e / (gain or 1.0)
    keys["e_per_adu"] = Key(e, f"given; the movie's {how} says {c_est * (gain or 1.0):.3g} "
                               f"(given / movie = {c_user / c_est:.2f})", False)
    if abs(c_user - c_est) > CAMERA_TOLERANCE * c_est:
        if gain:
            warnings.append(f"Camera.e_per_adu / Camera.em_gain: known.yaml says {e:g} / {gain:g} = {c_user:.3g} "
                            f"e-/ADU per photo-electron, the movie's photon transfer says {c_est:.3g} ({c_user / c_est:.2f}x; "
                            f"EMCCD, excess noise factor 2): e_per_adu {c_est * gain:.3g} at em_gain {gain:g}, or em_gain "
                            f"{e / c_est:.3g} at e_per_adu {e:g}. Photons converted with the given keys are off by that factor.")
        else:
            warnings.append(f"Camera.e_per_adu: known.yaml says {e:g}, the movie's photon transfer says {c_est:.3g} "
                            f"e-/ADU ({c_user / c_est:.2f}x; sCMOS). Photons converted with the given value are off by "
                            "that factor: check the camera's gain setting.")
    return keys, warnings


def _baseline_key(pt: est.PhotonTransfer, user: dict, ref: dict, read_sigma_adu: float) -> tuple[Key, list]:
    """``baseline``: measured where the photon transfer line reaches the read noise, compared with a given one
    relative to the background above it (the part of a pixel a wrong baseline corrupts)."""
    b_est = est.transfer_baseline(pt, read_sigma_adu)
    b_err = est.baseline_error(pt, read_sigma_adu)
    if not b_err <= MAX_TRANSFER_ERROR * max(pt.level - b_est, 0.0):
        b_est = None
    flat = ("the background is too flat to measure it (the photon transfer needs background levels that differ; "
            f"here the baseline is uncertain by {b_err:.3g} ADU)")
    if "baseline" not in user:
        if b_est is None:
            return Key(ref["baseline"], f"decode-var's default, NOT measured: {flat}", False), [
                f"Camera.baseline is not in known.yaml and {flat}: decode-var's default {ref['baseline']} ADU is "
                "written. Give the camera's offset (the mean of a dark frame)."]
        return Key(round(b_est, 1), f"estimated (+- {b_err:.2g} ADU): where the photon transfer line reaches the "
                                    f"read noise ({read_sigma_adu:.2f} ADU) and the floor's 1/12 ADU^2"), []
    b = float(user["baseline"])
    if b_est is None:
        return Key(b, f"given ({flat})", False), []
    signal = max(pt.level - b_est, 1e-9)
    off = abs(b - b_est) / signal
    warnings = [] if off <= CAMERA_TOLERANCE or abs(b - b_est) <= 3 * b_err else [
        f"Camera.baseline: known.yaml says {b:g} ADU, the movie's photon transfer says {b_est:.1f} ADU; the "
        f"difference is {off:.0%} of the background above the baseline ({signal:.0f} ADU), so backgrounds and "
        "photons converted with the given value are off. Check the camera's offset (the mean of a dark frame)."]
    return Key(b, f"given; the movie's photon transfer says {b_est:.1f} +- {b_err:.2g} ADU ({off:.0%} of the "
                  "background)", False), warnings


def camera_keys(pt: est.PhotonTransfer, user: dict, ref: dict) -> tuple[dict, list]:
    """Every ``Camera`` key but ``px_size`` (``"Camera.key"`` -> :class:`Key`) and the warnings, from the
    photon transfer ``pt``, the keys the user gave (``user``) and decode-var's defaults (``ref``)."""
    slope, how = _transfer_slope(pt, user, ref)
    if not slope > 0:
        raise InputDataError("The movie's background noise does not grow with its brightness (photon transfer slope "
                             f"{slope:.3g}): are the frames raw camera counts? Frames already in photons need "
                             "Camera.convert2photons: false in known.yaml; background-subtracted frames cannot be used.")
    emccd, type_note, warnings = _camera_type(pt.excess_for(slope), user)
    keys, more = _conversion_keys((2.0 if emccd else 1.0) / slope, emccd, how, user, ref)
    warnings += more
    keys["em_gain"].note += "" if "em_gain" in user else f"; {type_note}"
    if "read_sigma" in user:
        keys["read_sigma"] = Key(user["read_sigma"], "given", False)
    elif emccd:  # the default camera's read noise in ADU (74.4 e- / 45 e-/ADU), whatever e_per_adu is
        r_adu = ref["read_sigma"] / ref["e_per_adu"]
        keys["read_sigma"] = Key(round(r_adu * keys["e_per_adu"].value, 3), f"assumed: decode-var's default camera's "
                                 f"read noise in ADU ({r_adu:.2f} ADU), in electrons", False)
    else:
        keys["read_sigma"] = Key(SCMOS_READ_SIGMA, "assumed: a typical sCMOS read noise (electrons)", False)
    read_sigma = keys["read_sigma"].value
    keys["baseline"], more = _baseline_key(pt, user, ref, read_sigma / keys["e_per_adu"].value)
    warnings += more
    keys["qe"] = Key(user.get("qe", ref["qe"]), "given" if "qe" in user else
                     "decode-var's default; a movie cannot measure it (photons = photo-electrons / qe)", False)
    spur = user.get("spur_noise", ref["spur_noise"] if emccd else 0.0)
    keys["spur_noise"] = Key(spur, "given" if "spur_noise" in user else
                             ("decode-var's default" if emccd else "sCMOS: no clock-induced charge"), False)
    keys["convert2photons"] = Key(user.get("convert2photons", True), "given" if "convert2photons" in user else
                                  "the movie holds raw camera counts (ADU)", False)
    return {f"Camera.{k}": v for k, v in keys.items()}, warnings


def camera_of(keys: dict) -> Camera:
    """The :class:`Camera` (photons out) of the ``Camera.*`` keys."""
    k = {name.split(".", 1)[1]: key.value for name, key in keys.items() if name.startswith("Camera.")}
    return Camera(k["qe"], k["spur_noise"], k["em_gain"], k["e_per_adu"], k["baseline"], k["read_sigma"])


# ------------------------------------------------------------------------------------------- frames
def fitting_size(size: int, scales) -> int:
    """The largest frame size <= ``size`` px that every factor of ``scales`` divides into whole cells."""
    for s in range(int(size), 0, -1):
        try:
            ScaleSchedule((s, s), scales)
            return s
        except ParamError:
            continue
    raise ParamError(f"VAR.scales {list(scales)} fit no frame size up to {size} px. Give factors such as "
                     "[0.25, 0.5, 1.0].")


def _px_size_key(raw: dict, px_meta) -> tuple[Key, list]:
    """``Camera.px_size``: the movie's metadata first, else known.yaml; a disagreement is warned about."""
    user = get(raw, "Camera.px_size")
    if px_meta is None:
        if user is not None:
            return Key(list(user), "given (the movie's metadata states no pixel size)", False), []
        default = load_reference()["Camera"]["px_size"]
        return Key(default, "decode-var's default: neither the movie's metadata nor known.yaml states it", False), [
            f"Camera.px_size: neither the movie's metadata nor known.yaml gives the pixel size; {default} nm is "
            "written. Set Camera.px_size in known.yaml (nm per px along x = rows and y = columns)."]
    (px, source) = px_meta
    value = [round(px[0], 3), round(px[1], 3)]
    warnings = []
    if user is not None and any(abs(u - m) > 0.01 * m for u, m in zip(user, value)):
        warnings.append(f"Camera.px_size: known.yaml says {list(user)} nm, the movie's {source} metadata says {value} "
                        "nm; the metadata's is written. Fix the one that is wrong.")
    return Key(value, f"from the movie's {source} metadata (nm per px along x = rows, y = columns)"), warnings


#: Largest training frame side written by ``decode-var-init`` (px): the quickstart's 40 x 40 px windows. The
#: attention windows and receptive field are far smaller, and training time grows with the frame's area.
TRAIN_SIZE = 40


def frame_keys(shape_HW, raw: dict, px_meta=None) -> tuple[dict, list, float]:
    """Frame size, extents and pixel size: (keys, warnings, simulated frame area / the movie's frame area).

    ``Simulation.img_size`` is the movie's frame size, at most :data:`TRAIN_SIZE` px a side (cropped to the
    largest size ``VAR.scales`` divides), unless known.yaml sets it; the z range is known.yaml's or decode-var's default."""
    ref = load_reference()
    H, W = (int(v) for v in shape_HW)
    scales = get(raw, "VAR.scales", ref["VAR"]["scales"])
    keys = {}
    if given(raw, "Simulation.img_size"):
        size = [int(v) for v in raw["Simulation"]["img_size"]]
        keys["Simulation.img_size"] = Key(size, f"given (training frames); the movie's frames are {H} x {W} px", False)
    else:
        size = [fitting_size(min(H, TRAIN_SIZE), scales), fitting_size(min(W, TRAIN_SIZE), scales)]
        keys["Simulation.img_size"] = Key(size, f"training frames of at most {TRAIN_SIZE} px a side (the movie's are "
                                                f"{H} x {W} px; a model fits frames of any size, and larger training "
                                                "frames only slow training); emitter_av is per training frame")
    xy = [[-0.5, size[0] - 0.5], [-0.5, size[1] - 0.5]]
    z = get(raw, "Simulation.emitter_extent", ref["Simulation"]["emitter_extent"])[2]
    psf_z = get(raw, "Simulation.psf_extent", ref["Simulation"]["psf_extent"])[2]
    z_note = "known.yaml's" if given(raw, "Simulation.emitter_extent") else "decode-var's default"
    for path, value, note in (
            ("Simulation.emitter_extent", xy + [z], f"x, y: the frame (px); z: {z_note} range (nm; a movie does not "
                                                    "show it, and an astigmatic PSF's rl_range is scaled to it)"),
            ("Simulation.psf_extent", xy + [psf_z], "the frame (px)"),
            ("TestSet.img_size", size, "as Simulation.img_size"),
            ("TestSet.frame_extent", xy + [None], "the frame (px)")):
        keys[path] = Key(get(raw, path), "given", False) if given(raw, path) else Key(value, note, False)
    keys["Camera.px_size"], warnings = _px_size_key(raw, px_meta)
    return keys, warnings, (size[0] * size[1]) / (H * W)


# --------------------------------------------------------------------------------------- background
def background_keys(bm: est.BackgroundModel, raw: dict) -> dict:
    """``Simulation.bg_*`` and ``VAR.bg_drift`` from the movie's :class:`~decode_var.data.estimate.BackgroundModel`."""
    flat = bm.perlin_amplitude is None
    smooth = "" if flat else ", less the smooth field's mean"
    keys = {
        "Simulation.bg_uniform": Key([round(v, 2) for v in bm.bg_uniform],
                                     f"estimated: 5th to 95th percentile of the movie's per-frame background levels"
                                     f"{smooth} (photons / px; spots masked; mean background {bm.mean:.1f})"),
        "Simulation.bg_perlin_amplitude": Key(
            None if flat else round(bm.perlin_amplitude, 2),
            f"estimated: none, the time-averaged background is flat ({bm.rel_spatial_sd:.1%} sd across the frame)"
            if flat else f"estimated: the time-averaged background varies by {bm.rel_spatial_sd:.1%} (sd) across the "
                         "frame; a Perlin field with this peak (photons / px) varies as much"),
        "Simulation.bg_perlin_scale": Key(bm.perlin_scale, "not used: no Perlin field" if flat else
                                          f"estimated: background features about {2 * bm.halfwidth:.0f} px wide "
                                          "(autocorrelation), the Perlin scale whose features match", not flat),
        "Simulation.bg_perlin_draw_amps": Key(False, "the movie's background structure stays (no random amplitude)",
                                              False),
        "VAR.bg_drift": Key(round(min(bm.drift, 1.0), 6), f"estimated: the background level changes {bm.change:+.0%} "
                                                         f"over the movie ({bm.drift:.2g} of its mean per frame)"),
    }
    return {k: Key(get(raw, k), "given", False) if given(raw, k) else v for k, v in keys.items()}


# ----------------------------------------------------------------------------------------- emitters
def psf_mode(raw: dict) -> str:
    """``fixed`` (a spline calibration: nothing to estimate), ``2d`` or ``astigmatic`` (a Gaussian PSF)."""
    ref = load_reference()
    if get(raw, "VAR.psf", ref["VAR"]["psf"]) == "spline":
        return "fixed"
    return "astigmatic" if get(raw, "VAR.gaussian_psf.mode_3d", ref["VAR"]["gaussian_psf"]["mode_3d"]) else "2d"


def fixed_settings(raw: dict, mode: str, area_ratio: float) -> dict:
    """The :class:`~decode_var.data.estimate.EmitterSettings` known.yaml gives (they are kept, not estimated);
    the astigmatism counts as given when either of its keys is."""
    ref, fixed = load_reference(), {}
    if given(raw, "Simulation.intensity_mu_sig"):
        fixed["mu"], fixed["sig"] = (float(v) for v in raw["Simulation"]["intensity_mu_sig"])
    if given(raw, "Simulation.emitter_av"):
        av = raw["Simulation"]["emitter_av"]
        fixed["emitter_av"] = float(np.mean(av)) / area_ratio
    if given(raw, "Simulation.lifetime_avg"):
        fixed["lifetime"] = float(raw["Simulation"]["lifetime_avg"])
    g = {**ref["VAR"]["gaussian_psf"], **(get(raw, "VAR.gaussian_psf") or {})}
    if mode != "fixed" and given(raw, "VAR.gaussian_psf.sigma_0"):
        fixed["sigma_0"] = float(g["sigma_0"])
    if mode == "astigmatic" and (given(raw, "VAR.gaussian_psf.foc_shift") or given(raw, "VAR.gaussian_psf.rl_range")):
        fixed["foc_shift"], fixed["rl_range"] = float(g["foc_shift"]), float(g["rl_range"])
    return fixed


def psf_factory(raw: dict, mode: str, shape_HW):
    """``settings -> PSF`` on frames of ``shape_HW``: the given spline calibration, or the Gaussian PSF with the
    settings' width and astigmatism (known.yaml's or the defaults where a setting is None)."""
    H, W = (int(v) for v in shape_HW)
    ext = [[-0.5, H - 0.5], [-0.5, W - 0.5]]
    if mode == "fixed":
        spline = SplinePSF.parse(param_from_dict(raw, overrides={"Simulation": {
            "img_size": [H, W], "psf_extent": ext + [None], "emitter_extent": ext + [
                get(raw, "Simulation.emitter_extent", load_reference()["Simulation"]["emitter_extent"])[2]]},
            "TestSet": {"img_size": [H, W], "frame_extent": ext + [None]}, "VAR": {"scales": [1.0]}}))
        return lambda s: spline
    g = {**load_reference()["VAR"]["gaussian_psf"], **(get(raw, "VAR.gaussian_psf") or {})}

    def psf(s: est.EmitterSettings) -> GaussianPSF:
        def pick(v, k):
            return float(g[k]) if v is None else v
        return GaussianPSF(ext[0], ext[1], (H, W), pick(s.sigma_0, "sigma_0"), pick(s.foc_shift, "foc_shift"),
                           pick(s.rl_range, "rl_range"), mode == "astigmatic")
    return psf


def measure_movie(photons_BTHW: torch.Tensor) -> tuple[est.SpotStats, est.Spots, int]:
    """The sample's spots, measured with the ROI their width asks for: (values, spots, ROI edge in px).

    Raises:
        InputDataError: fewer than 20 spots (no emitters, or frames that are not what the camera keys say)."""
    spots = est.measure_spots(photons_BTHW, 7)
    try:
        stats = est.spot_stats(spots)
        roi = est.roi_for_width(stats.sigma)
        if roi != 7:
            spots = est.measure_spots(photons_BTHW, roi)
            stats = est.spot_stats(spots)
    except ValueError:
        raise InputDataError(f"Only {len(spots.phot)} spots were found in {spots.n_frames} frames of the movie: "
                             "decode-var-init needs emitters to measure (at least 20 spots). Is it a blinking "
                             "SMLM movie, in raw camera counts?") from None
    return stats, spots, roi


def simulated_measure(psf_for, camera: Camera, bg_BTHW: torch.Tensor, z_range, roi: int):
    """``(settings, seed) -> SpotStats``: movies simulated on the background ``bg_BTHW`` (photons / px, each
    block a continuous movie; repeated up to :data:`MIN_SIM_FRAMES` frames) with ``camera`` and the PSF
    ``psf_for(settings)``, measured as the user's movie is."""
    B, T, H, W = bg_BTHW.shape
    reps = max(1, math.ceil(MIN_SIM_FRAMES / (B * T)))
    extent = [[-0.5, H - 0.5], [-0.5, W - 0.5], [float(v) for v in z_range]]

    def measure(s: est.EmitterSettings, seed: int) -> est.SpotStats:
        sim = Simulator(psf_for(s), camera, extent, (s.mu, s.sig), s.emitter_av, s.lifetime, 0.0, frame_window=1)
        g = torch.Generator().manual_seed(int(seed))
        photons = torch.stack([camera.backward(simulate_movie(sim, bg_THW, generator=g).adu_THW)
                               for _ in range(reps) for bg_THW in bg_BTHW])
        return est.spot_stats(est.measure_spots(photons, roi))
    return measure


def emitter_keys(s: est.EmitterSettings, real: est.SpotStats, sim: est.SpotStats, raw: dict, mode: str,
                 area_ratio: float, img_size) -> dict:
    """``Simulation`` emitter keys and ``VAR.gaussian_psf`` from the calibrated settings ``s``."""
    calib = (f"refined until a movie simulated with them gives the same spots (median photons {sim.phot_q[1]:.0f} vs "
             f"{real.phot_q[1]:.0f}, spots / frame {sim.per_frame:.2f} vs {real.per_frame:.2f})")
    keys = {
        "Simulation.intensity_mu_sig": Key([round(s.mu, 1), round(s.sig, 1)], "estimated: photons per frame of full "
                                           f"on-time, mean and sd; {real.n} spots fitted (Gaussian MLE), {calib}"),
        "Simulation.emitter_av": Key(round(s.emitter_av * area_ratio, 3), f"estimated: emitters on per "
                                     f"{img_size[0]} x {img_size[1]} px frame, dim and overlapping ones included "
                                     f"({real.per_frame:.2f} spots / movie frame found)"),
        "Simulation.lifetime_avg": Key(round(s.lifetime, 3), f"estimated: mean on-time (frames); spots linked in "
                                       f"consecutive frames ({real.track_len:.2f} frames per track found)"),
    }
    if mode != "fixed":
        keys["VAR.gaussian_psf.sigma_0"] = Key(round(s.sigma_0, 4), f"estimated: in-focus width (px); median fitted "
                                               f"width of the brighter spots {real.sigma:.3f} px, refined likewise")
        keys["VAR.gaussian_psf.mode_3d"] = Key(mode == "astigmatic", "given" if given(raw, "VAR.gaussian_psf.mode_3d")
                                               else "decode-var's default (astigmatic)", False)
    if mode == "2d":  # z leaves no trace in a 2D PSF: matching on z would score unknowable axial errors
        keys["Evaluation.match_dims"] = Key(2, "a 2D PSF: z is not measured, localizations are matched on x, y", False)
        z_lo, z_hi = get(raw, "Simulation.emitter_extent", load_reference()["Simulation"]["emitter_extent"])[2]
        keys["Evaluation.dist_ax"] = Key(2.0 * (z_hi - z_lo), "a 2D PSF: twice the z range, z never blocks a match",
                                         False)
    if mode == "astigmatic":
        how = "estimated (nm): from the fitted widths' astigmatism and the z range of Simulation.emitter_extent"
        pair = [given(raw, f"VAR.gaussian_psf.{k}") for k in ("foc_shift", "rl_range")]
        if any(pair):  # one given: the other keeps its default (see fixed_settings)
            how = "decode-var's default, kept with the other astigmatism key given"
        keys["VAR.gaussian_psf.foc_shift"] = Key(round(s.foc_shift, 1), how, not any(pair))
        keys["VAR.gaussian_psf.rl_range"] = Key(round(s.rl_range, 1), how, not any(pair))
    return {k: Key(get(raw, k), "given", False) if given(raw, k) else v for k, v in keys.items()}


# ------------------------------------------------------------------------------------------ together
def _camera(adu_BTHW: torch.Tensor, mask_BTHW: torch.Tensor, raw: dict):
    """(camera keys, warnings, photon transfer or None): measured, or taken as given for frames in photons."""
    ref = load_reference()["Camera"]
    user = {k: v for k, v in (get(raw, "Camera") or {}).items() if k != "px_size"}
    if user.get("convert2photons", ref["convert2photons"]) is False:
        keys = {f"Camera.{k}": Key(user.get(k, ref[k]), "given" if k in user else "decode-var's default (the frames "
                                   "are in photons: the camera is not measured)", False)
                for k in ("baseline", "e_per_adu", "em_gain", "qe", "read_sigma", "spur_noise", "convert2photons")}
        return keys, [], None
    pt = est.photon_transfer(adu_BTHW, mask_BTHW)
    keys, warnings = camera_keys(pt, user, ref)
    return keys, warnings, pt


def estimate(adu_BTHW: torch.Tensor, frame_BT: torch.Tensor, n_movie_frames: int, raw: dict, px_meta=None,
             rounds: int = 6) -> InitResult:
    """Every key ``decode-var-init`` writes, from a movie sample (:func:`sample_blocks`: raw frames, ADU) and the
    user's known.yaml (``raw``, as read). ``px_meta``: the pixel size the movie's metadata states
    (:func:`decode_var.data.tiff_metadata.pixel_size_nm`)."""
    mask = est.spot_mask(adu_BTHW)
    keys, warnings, pt = _camera(adu_BTHW, mask, raw)
    camera = camera_of(keys)
    photons = adu_BTHW if pt is None else camera.backward(adu_BTHW)
    bg = est.background_maps(photons, mask)
    bm = est.background_model(bg, frame_BT, n_movie_frames)
    fkeys, more, area_ratio = frame_keys(adu_BTHW.shape[-2:], raw, px_meta)
    keys.update(fkeys)
    warnings += more
    mode = psf_mode(raw)
    real, spots, roi = measure_movie(photons)
    z_range = keys["Simulation.emitter_extent"].value[2]
    measure = simulated_measure(psf_factory(raw, mode, adu_BTHW.shape[-2:]), camera, bg, z_range, roi)
    start = est.first_guess(real, mode, float(z_range[1] - z_range[0]))
    settings, sim, _ = est.calibrate(real, start, measure, rounds, fixed_settings(raw, mode, area_ratio))
    keys.update(background_keys(bm, raw))
    keys.update(emitter_keys(settings, real, sim, raw, mode, area_ratio, keys["Simulation.img_size"].value))
    return InitResult(keys, warnings, camera, photons, bg, bm, real, spots, settings, sim, roi, pt)


def param_data(raw: dict, keys: dict) -> dict:
    """known.yaml's data with every key of ``keys`` set (sections in decode-var's reference order first)."""
    order = list(load_reference())
    data = copy.deepcopy(raw)
    for path, key in keys.items():
        node = data
        *parents, last = path.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = copy.deepcopy(key.value)
    return {k: data[k] for k in sorted(data, key=lambda k: order.index(k) if k in order else len(order))}


# ------------------------------------------------------------------------------------------- report
@dataclass
class SampleSummary:
    """What the report shows of a movie (or a simulation), all measured the same way.

    Attributes:
        frame_HW: a typical frame (its spot count nearest the median), photons.
        phot: (E,) the spots' fitted photons. bg_levels: (N,) per-frame background, photons / px.
        per_frame: (N,) spots per frame.
    """

    frame_HW: np.ndarray
    phot: np.ndarray
    bg_levels: np.ndarray
    per_frame: np.ndarray


def summarize(photons_BTHW: torch.Tensor, spots: est.Spots) -> SampleSummary:
    """:class:`SampleSummary` of frames (photons) and their spots; each frame's background level from its own
    pixels away from spots (a simulator draws a new level every frame)."""
    frames_NHW = photons_BTHW.flatten(0, 1)
    counts = torch.bincount(spots.frame, minlength=len(frames_NHW)).numpy()
    typical = int(np.argmin(np.abs(counts - np.median(counts))))
    bg_BTHW = est.background_maps(photons_BTHW, est.spot_mask(photons_BTHW), stretch=1)
    return SampleSummary(frames_NHW[typical].numpy(), spots.phot.numpy(),
                         bg_BTHW.mean((-2, -1)).flatten().numpy(), counts)


def simulated_summary(param, roi: int, n_frames: int = 300, seed: int = 0) -> SampleSummary:
    """:class:`SampleSummary` of about ``n_frames`` frames of the training simulator of ``param`` (a loaded
    param: the one written), measured as the movie was (on the CPU)."""
    sim = Simulator.parse(param, device="cpu")
    batch = sim.sample(max(1, n_frames // sim.frame_window), seed)
    photons = batch.frames_NCHW if param.Camera.convert2photons else sim.camera.backward(batch.frames_NCHW)
    return summarize(photons, est.measure_spots(photons, roi))
