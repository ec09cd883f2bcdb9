"""The ``decode`` backend: DECODE 0.10's own classes behind decode-var's backend interface.

This is the only module of decode-var that imports ``decode``. It is imported only after
:func:`decode_var.backend.decode_status` has confirmed that real DECODE 0.10.x is importable.
Inputs and outputs at the seam stay decode-var's built-in types; conversion happens here.
"""
from __future__ import annotations

from pathlib import Path

import torch

import decode.evaluation.evaluation as _d_eval
import decode.neuralfitter.coord_transform as _d_coord
import decode.neuralfitter.loss as _d_loss
import decode.neuralfitter.models as _d_models
from decode.neuralfitter.models import model_param
import decode.evaluation.match_emittersets as _d_match
import decode.generic.emitter as _d_emitter
import decode.neuralfitter.post_processing as _d_post
import decode.neuralfitter.scale_transform as _d_scale
import decode.neuralfitter.target_generator as _d_target
import decode.neuralfitter.weight_generator as _d_weight
import decode.simulation.camera as _d_camera
import decode.simulation.psf_kernel as _d_psf

from decode_var.backend.builtin import BuiltinBackend
from decode_var import registry
from decode_var.core.atomic import atomic_write
from decode_var.core.emitters import EmitterSet
from decode_var.core.errors import ParamError
from decode_var.core.scales import Scale
from decode_var.data.simulation import GaussianPSF, Simulator

_FIELDS = ("prob", "bg", "xyz_cr", "phot_cr", "bg_cr", "xyz_sig", "phot_sig", "bg_sig")

#: DECODE's GaussianPSF uses these astigmatism constants and offers no way to change them.
DECODE_GAUSS_FOC_SHIFT, DECODE_GAUSS_RL_RANGE = 250.0, 280.0


class _PSFAdapter:
    """DECODE PSF -> decode-var's ``forward(xyz, phot, frame_ix, n_frames)``."""

    def __init__(self, psf):
        self.psf = psf

    def forward(self, xyz, phot, frame_ix, n_frames):
        return self.psf.forward(xyz, phot, frame_ix.long(), 0, n_frames - 1)


class _CameraAdapter:
    def __init__(self, camera):
        self.camera = camera

    def forward(self, x):
        return self.camera.forward(x)


class DecodeBackend(BuiltinBackend):
    name = "decode"

    def gmm_chain(self, param):
        return GMMChain(param, self)

    def to_native(self, em: EmitterSet):
        kw = {k: getattr(em, k) for k in _FIELDS if getattr(em, k) is not None}
        return _d_emitter.EmitterSet(xyz=em.xyz, phot=em.phot, frame_ix=em.frame_ix.long(), id=em.id.long(),
                                     xy_unit=em.xy_unit, px_size=em.px_size, **kw)

    def to_builtin(self, em) -> EmitterSet:
        if isinstance(em, EmitterSet):
            return em
        kw = {k: getattr(em, k, None) for k in _FIELDS}
        return EmitterSet(em.xyz, em.phot, em.frame_ix, id=em.id, xy_unit=em.xy_unit, px_size=em.px_size, **kw)

    def target_generator(self, scale: Scale, roi_size: int):
        return _d_target.UnifiedEmbeddingTarget(xextent=scale.xextent, yextent=scale.yextent,
                                                img_shape=scale.img_shape, roi_size=roi_size)

    def weight_generator(self, scale: Scale, roi_size: int):
        return _d_weight.SimpleWeight(xextent=scale.xextent, yextent=scale.yextent, img_shape=scale.img_shape,
                                      roi_size=roi_size, weight_mode="const")

    def psf(self, param):
        sim, var = param.Simulation, param.VAR
        ext = sim.psf_extent
        if var.psf == "spline":
            import decode.utils.calibration_io as _d_calib  # lazy: only spline runs need DECODE's loader

            calib = Path(param.InOut.calibration_file)
            if not calib.exists():
                raise ParamError(f"InOut.calibration_file {calib} does not exist. Give your SMAP spline "
                                 "calibration (.mat), or use VAR.psf: gaussian, which needs no calibration.")
            psf = _d_calib.SMAPSplineCoefficient(calib_file=str(calib)).init_spline(
                xextent=ext[0], yextent=ext[1], img_shape=sim.img_size, device=param.Hardware.device_simulation,
                roi_size=sim.roi_size, roi_auto_center=sim.roi_auto_center)
            return _PSFAdapter(psf)
        g = var.gaussian_psf
        if g.foc_shift != DECODE_GAUSS_FOC_SHIFT or g.rl_range != DECODE_GAUSS_RL_RANGE:
            # DECODE's GaussianPSF has these constants built in; keep the user's PSF instead
            return GaussianPSF.parse(param)
        zext = sim.emitter_extent[2] if g.mode_3d else None
        return _PSFAdapter(_d_psf.GaussianPSF(xextent=ext[0], yextent=ext[1], zextent=zext,
                                              img_shape=sim.img_size, sigma_0=g.sigma_0))

    def simulator(self, param):
        sim = Simulator.parse(param, psf=self.psf(param))
        c = param.Camera
        sim.camera = _CameraAdapter(_d_camera.Photon2Camera(
            qe=c.qe, spur_noise=c.spur_noise, em_gain=c.em_gain, e_per_adu=c.e_per_adu, baseline=c.baseline,
            read_sigma=c.read_sigma, photon_units=c.convert2photons, device="cpu"))
        return sim

    def post_processing(self, settings, scale: Scale):
        if abs(scale.factor - 1.0) > 1e-9 or settings.merge_px > 0:
            # DECODE's post-processing assumes the output grid is the input frame's pixel grid, and drops no
            # repeated emitter (VAR.merge_px): decode-var's, the same as DECODE's on the 1x grid without merging
            return super().post_processing(settings, scale)
        px, th = settings.px_size, settings.raw_th
        if settings.name is None:
            return None
        if settings.name == "LookUp":
            pp = _d_post.LookUpPostProcessing(raw_th=th, xy_unit="px", px_size=px, pphotxyzbg_mapping=[0, 1, 2, 3, 4, 5],
                                              photxyz_sigma_mapping=None)
        else:
            pp = _d_post.SpatialIntegration(raw_th=th, xy_unit="px", px_size=px, pphotxyzbg_mapping=[0, 1, 2, 3, 4, 5],
                                            photxyz_sigma_mapping=None)
        offset2coord = _d_coord.Offset2Coordinate(xextent=scale.xextent, yextent=scale.yextent,
                                                  img_shape=scale.img_shape)
        return _PostAdapter(pp, offset2coord, self)

    def matcher(self, param):
        ev = param.Evaluation
        return _MatchAdapter(_d_match.GreedyHungarianMatching(match_dims=ev.match_dims, dist_lat=ev.dist_lat,
                                                              dist_ax=ev.dist_ax, dist_vol=ev.dist_vol), self)

    def evaluate(self, tp, fp, fn, tp_match) -> dict:
        out = _d_eval.SMLMEvaluation().forward(self.to_native(tp), self.to_native(fp), self.to_native(fn),
                                               self.to_native(tp_match))
        result = {k: float(v) for k, v in out._asdict().items()}
        # photon and background errors are decode-var additions; compute them the built-in way
        extra = super().evaluate(tp, fp, fn, tp_match)
        for k, v in extra.items():
            result.setdefault(k, v)
        return result

    def save_emitters(self, path, em) -> None:
        atomic_write(path, lambda tmp: self.to_native(em).save(tmp))

    def load_emitters(self, path):
        return self.to_builtin(_d_emitter.EmitterSet.load(path))


class _PostAdapter:
    """DECODE's chain after the rescale: Offset2Coordinate, then LookUp / SpatialIntegration."""

    def __init__(self, pp, offset2coord, backend):
        self.pp, self.offset2coord, self.backend = pp, offset2coord, backend

    def forward(self, output_N6HW: torch.Tensor) -> EmitterSet:
        # DECODE's post-processing works in place: give it a copy
        coords = self.offset2coord.forward(output_N6HW.clone())
        return self.backend.to_builtin(self.pp.forward(coords))


class _MatchAdapter:
    def __init__(self, matcher, backend):
        self.matcher, self.backend = matcher, backend

    def forward(self, output: EmitterSet, target: EmitterSet):
        b = self.backend
        return tuple(b.to_builtin(e) for e in self.matcher.forward(b.to_native(output), b.to_native(target)))


def decode_models() -> dict:
    """DECODE's models as ``HyperParameter.architecture`` names them."""
    return {"SigmaMUNet": _d_models.SigmaMUNet, "DoubleMUnet": model_param.DoubleMUnet,
            "SimpleSMLMNet": model_param.SimpleSMLMNet}


def decode_losses() -> dict:
    """DECODE's losses; ``PPXYZBLoss`` is DECODE's, ``PPXYZB`` decode-var's."""
    return {"GaussianMMLoss": _GaussianMMLoss, "PPXYZBLoss": _d_loss.PPXYZBLoss}


class _GaussianMMLoss(_d_loss.GaussianMMLoss):
    """DECODE's GaussianMMLoss with the ``parse(param)`` its live_engine builds inline; trained with
    :class:`decode_var.training.tasks.GMMTask` (``task``)."""

    task = "gmm"

    @classmethod
    def parse(cls, param):
        return cls(xextent=param.Simulation.psf_extent[0], yextent=param.Simulation.psf_extent[1],
                   img_shape=param.Simulation.img_size, device=param.Hardware.device,
                   chweight_stat=param.HyperParameter.chweight_stat)


def register_decode_classes() -> None:
    """Record DECODE's models and losses in :mod:`decode_var.registry` (a built-in name is kept), as
    provided by ``decode``: never offered back to DECODE (:func:`decode_var.backend.register_with_decode`)."""
    for name, cls in decode_models().items():
        registry.register_model(name, package="decode")(cls)
    for name, cls in decode_losses().items():
        registry.register_loss(name, package="decode")(cls)


def decode_namespaces() -> dict:
    """DECODE's module namespaces that :func:`add_to_decode_namespaces` adds names to."""
    return {"decode.neuralfitter.models": _d_models, "decode.neuralfitter.loss": _d_loss}


class GMMChain:
    """DECODE's chain of SigmaMUNet + GaussianMMLoss (DECODE's live_engine), for
    :class:`decode_var.training.tasks.GMMTask`.

    Targets: ParameterListTarget -> ParameterListRescale; output: InverseParamListRescale ->
    Offset2Coordinate -> SpatialIntegration / LookUp with the sigma channels.
    """

    def __init__(self, param, backend):
        self.backend = backend
        sim, sc = param.Simulation, param.Scaling
        self.psf_extent = (sim.psf_extent[0], sim.psf_extent[1])
        self.n_max = param.HyperParameter.max_number_targets
        self.rescale = _d_scale.ParameterListRescale(phot_max=sc.phot_max, z_max=sc.z_max, bg_max=sc.bg_max)
        self.inverse_rescale = _d_scale.InverseParamListRescale(phot_max=sc.phot_max, z_max=sc.z_max, bg_max=sc.bg_max)
        self.offset2coord = _d_coord.Offset2Coordinate(xextent=sim.psf_extent[0], yextent=sim.psf_extent[1],
                                                       img_shape=sim.img_size)
        th, px = param.PostProcessingParam.raw_th, param.Camera.px_size
        if param.PostProcessing == "LookUp":
            self.pp = _d_post.LookUpPostProcessing(raw_th=th, xy_unit="px", px_size=px,
                                                   pphotxyzbg_mapping=[0, 1, 2, 3, 4, -1])
        else:
            self.pp = _d_post.SpatialIntegration(raw_th=th, xy_unit="px", px_size=px)
        self.photon_min = param.HyperParameter.emitter_label_photon_min

    def targets(self, batch, n):
        """DECODE's (param list, mask, bg) targets of the batch's centre frames."""
        em = batch.em
        if self.photon_min is not None and len(em):
            em = em[em.phot >= self.photon_min]
        gen = _d_target.ParameterListTarget(n_max=self.n_max, xextent=self.psf_extent[0], yextent=self.psf_extent[1],
                                            ix_low=0, ix_high=n - 1)
        param_tar, mask, _ = gen.forward(self.backend.to_native(em), None)
        return self.rescale.forward(param_tar, mask, batch.bg_NHW.clone())

    def inverse(self, output):
        """Network output -> physical units (photons, px offsets, nm, photons / px)."""
        return self.inverse_rescale.forward(output.float())

    def postprocess(self, out_phys):
        return self.postprocessor().forward(out_phys)

    def postprocessor(self, grid=None) -> "_GMMPost":
        """Offsets to coordinates and DECODE's post-processing on ``grid`` (a :class:`Scale` on the input
        pixel grid of a frame of any size; default: the training frames)."""
        if grid is None:
            return _GMMPost(self.offset2coord, self.pp, self.backend)
        o2c = _d_coord.Offset2Coordinate(xextent=tuple(grid.xextent), yextent=tuple(grid.yextent),
                                         img_shape=tuple(grid.img_shape))
        return _GMMPost(o2c, self.pp, self.backend)


class _GMMPost:
    """DECODE's Offset2Coordinate + SpatialIntegration / LookUp on a 10-channel physical output
    ``[p, phot, x, y, z, phot_sig, x_sig, y_sig, z_sig, bg]``: emitters with their predicted sigmas."""

    def __init__(self, offset2coord, pp, backend):
        self.offset2coord, self.pp, self.backend = offset2coord, pp, backend

    def forward(self, out_phys) -> EmitterSet:
        return self.backend.to_builtin(self.pp.forward(self.offset2coord.forward(out_phys.clone())))
