"""The built-in backend: decode-var's own simulation, targets, post-processing, matching and metrics,
following DECODE 0.10's conventions, for machines without DECODE."""
from __future__ import annotations

from decode_var.backend.base import Backend
from decode_var.core.errors import BackendError
from decode_var.core.scales import Scale


class BuiltinBackend(Backend):
    """decode-var's own classes with DECODE's conventions (no DECODE needed)."""

    name = "builtin"

    # emitters ---------------------------------------------------------------------------------
    def to_native(self, em):
        return em

    def to_builtin(self, em):
        return em

    # targets and weights ----------------------------------------------------------------------
    def target_generator(self, scale: Scale, roi_size: int):
        from decode_var.data.targets import UnifiedEmbeddingTarget

        return UnifiedEmbeddingTarget(scale.xextent, scale.yextent, scale.img_shape, roi_size)

    def weight_generator(self, scale: Scale, roi_size: int):
        from decode_var.data.targets import SimpleWeight

        return SimpleWeight(scale.xextent, scale.yextent, scale.img_shape, roi_size)

    # simulation -------------------------------------------------------------------------------
    def simulator(self, param):
        """A :class:`decode_var.data.simulation.Simulator` (``sample(n, seed) -> Batch``)."""
        from decode_var.data.simulation import Simulator

        return Simulator.parse(param)

    # post-processing, matching, evaluation, emitter files -------------------------------------
    def post_processing(self, param, scale: Scale):
        """Physical-unit (N, 6, sx, sy) output on ``scale`` -> EmitterSet (``forward``), or None."""
        from decode_var.evaluation import postprocessing

        return postprocessing.parse(param, scale)

    def matcher(self, param):
        from decode_var.evaluation.matching import GreedyHungarianMatching

        return GreedyHungarianMatching.parse(param)

    def evaluate(self, tp, fp, fn, tp_match) -> dict:
        from decode_var.evaluation.matching import evaluate

        return evaluate(tp, fp, fn, tp_match)

    def save_emitters(self, path, em) -> None:
        from decode_var.data.emitter_io import save_emitters

        save_emitters(path, em)

    def load_emitters(self, path):
        from decode_var.data.emitter_io import load_emitters

        return load_emitters(path)

    def gmm_chain(self, param):
        raise BackendError(f"HyperParameter.loss_impl {param.HyperParameter.loss_impl!r} (DECODE's parameter-list "
                           "models) needs DECODE's own target and output chain: install DECODE 0.10 and set "
                           "VAR.backend: decode (or auto), or use a six-channel loss (AdaptivePPXYZB, PPXYZB).")
