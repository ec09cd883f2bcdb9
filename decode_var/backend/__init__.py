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
import warnings

from decode_var import registry
from decode_var.backend.base import Backend
from decode_var.backend.builtin import BuiltinBackend
from decode_var.core.errors import BackendError

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


@functools.lru_cache(maxsize=None)
def _make(name: str) -> Backend:
    if name == "decode":
        from decode_var.backend.decode import DecodeBackend  # lazy: imports DECODE, optional

        return DecodeBackend()
    return BuiltinBackend()


def get_backend(name: str = "auto") -> Backend:
    """The backend for ``VAR.backend`` (auto, decode or builtin)."""
    return _make(resolve_backend_name(name))


def register_decode_classes() -> None:
    """Put DECODE's models and losses into :mod:`decode_var.registry` when real DECODE is usable
    (the registry calls this when it first looks a name up)."""
    if decode_available():
        from decode_var.backend.decode import register_decode_classes as _register  # lazy: imports DECODE

        _register()


def register_with_decode() -> list[str]:
    """Add decode-var's models and losses to ``decode.neuralfitter.models`` / ``.loss``.

    Each class decode-var registers (``registry.models(registry.PACKAGE)``, ``registry.losses(...)``:
    ``VARMultiScale``; ``PPXYZB``, ``AdaptivePPXYZB``) goes in under its registry name, the name a param
    file's ``architecture`` / ``loss_impl`` uses; DECODE's own entries and plugins' are not offered.
    A name DECODE already defines is never replaced (decode-var's ``PPXYZB`` class is called
    ``PPXYZBLoss`` in Python; DECODE's ``PPXYZBLoss`` stays DECODE's). Code that resolves a class by name
    in DECODE's namespaces then finds them, e.g. ``getattr(decode.neuralfitter.models, 'VARMultiScale')``.
    Returns the names added.
    """
    resolve_backend_name("decode")  # clear error when DECODE is not usable
    from decode_var.backend.decode import decode_namespaces  # imports DECODE: only once it is known usable

    namespaces = decode_namespaces()
    return (add_absent(namespaces["decode.neuralfitter.models"], registry.models(registry.PACKAGE),
                       "decode.neuralfitter.models")
            + add_absent(namespaces["decode.neuralfitter.loss"], registry.losses(registry.PACKAGE),
                         "decode.neuralfitter.loss"))


def add_absent(namespace, entries: dict, where: str) -> list[str]:
    """Set ``namespace.<name> = cls`` for each entry whose name ``namespace`` does not have yet.

    A plugin never replaces its host's names: a taken name is left as it is, with a warning naming
    it (unless it already holds the same class, as after a second call). Returns the names added.
    """
    added = []
    for name, cls in entries.items():
        if hasattr(namespace, name):
            if getattr(namespace, name) is not cls:
                warnings.warn(f"{where}.{name} exists already and is left as it is; decode-var's "
                              f"{getattr(cls, '__name__', name)} stays reachable through decode_var.registry.")
            continue
        setattr(namespace, name, cls)
        added.append(f"{where}.{name}")
    return added
