"""The one seam between decode-var and DECODE.

``decode``: real DECODE 0.10.x is importable (it has ``decode.neuralfitter``); its simulation,
target generators, weight maps, post-processing, matching, evaluation and emitter I/O are used.
``builtin``: decode-var's own implementation of the same conventions, for machines without DECODE.

``VAR.backend: auto`` picks ``decode`` when it is usable, else ``builtin``. Only
:mod:`decode_var.backend.decode` imports ``decode``; everything else asks this module.

PyPI's ``decode`` is an unrelated package (DESHIMA astronomy code): it imports, but it has no
``decode.neuralfitter``. It is recognised and refused, with a message saying what was found.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util

from decode_var.core.errors import BackendError
from decode_var.core.scales import Scale

INSTALL_HINT = ("DECODE is installed with conda, not pip (PyPI's 'decode' is an unrelated package): "
                "see https://github.com/TuragaLab/DECODE (release 0.10.2, 'conda install -c turagalab "
                "-c pytorch -c conda-forge decode=0.10'). Without it, use VAR.backend: builtin.")


@functools.lru_cache(maxsize=1)
def decode_status() -> tuple[bool, str]:
    """(usable, what was found). Usable = real DECODE 0.10.x with ``decode.neuralfitter``."""
    if importlib.util.find_spec("decode") is None:
        return False, "no package named 'decode' is importable"
    try:
        decode = importlib.import_module("decode")
    except Exception as err:  # a broken install must not break the builtin backend
        return False, f"'import decode' failed: {type(err).__name__}: {err}"
    where = getattr(decode, "__file__", None) or "?"
    version = str(getattr(decode, "__version__", "unknown"))
    try:
        importlib.import_module("decode.neuralfitter")
    except Exception as err:
        return False, (f"found a package 'decode' (version {version}) at {where}, but it has no "
                       f"decode.neuralfitter ({type(err).__name__}: {err}); it is not DECODE "
                       f"(PyPI's 'decode' is unrelated astronomy code)")
    if not version.startswith("0.10"):
        return False, f"found DECODE version {version} at {where}; decode-var needs DECODE 0.10.x"
    return True, f"DECODE {version} at {where}"


def decode_available() -> bool:
    return decode_status()[0]


def resolve_backend_name(name: str = "auto") -> str:
    """'auto' -> 'decode' or 'builtin'; 'decode' when DECODE is unusable -> :class:`BackendError`."""
    if name == "auto":
        return "decode" if decode_available() else "builtin"
    if name == "builtin":
        return "builtin"
    if name == "decode":
        ok, found = decode_status()
        if not ok:
            raise BackendError(f"VAR.backend is 'decode' but DECODE cannot be used: {found}. {INSTALL_HINT}")
        return "decode"
    raise BackendError(f"Unknown backend {name!r}: use auto, decode or builtin.")


class Backend:
    """Built-in backend: decode-var's own classes with DECODE's conventions.

    Every factory takes and returns built-in types at the seam (``decode_var.core.emitters.EmitterSet``),
    so callers never see which backend they have; ``to_native`` is for the generators' inputs.
    """

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


@functools.lru_cache(maxsize=None)
def _make(name: str) -> Backend:
    if name == "decode":
        from decode_var.backend.decode import DecodeBackend

        return DecodeBackend()
    return Backend()


def get_backend(name: str = "auto") -> Backend:
    """The backend for ``VAR.backend`` (auto, decode or builtin)."""
    return _make(resolve_backend_name(name))
