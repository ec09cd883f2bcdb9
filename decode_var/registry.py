"""Models and losses by name, as ``HyperParameter.architecture`` and ``HyperParameter.loss_impl`` name them.

Holds decode-var's own classes, DECODE's (SigmaMUNet, DoubleMUnet, SimpleSMLMNet; GaussianMMLoss,
PPXYZBLoss) when real DECODE is importable, and third-party entries
from the package entry-point groups ``decode_var.models`` and ``decode_var.losses``:

.. code-block:: ini

    # setup.cfg of a third-party package
    [options.entry_points]
    decode_var.models =
        MyNet = mypackage.models:MyNet
    decode_var.losses =
        MyLoss = mypackage.loss:MyLoss

An entry is a class with ``parse(param)`` (DECODE's convention). An unknown name fails with the
list of names that exist.
"""
from __future__ import annotations

import difflib
from importlib import metadata
from typing import Callable, Dict

from decode_var.core.errors import ParamError

MODEL_GROUP = "decode_var.models"
LOSS_GROUP = "decode_var.losses"

_models: Dict[str, Callable] = {}
_losses: Dict[str, Callable] = {}
_loaded = False


def register_model(name: str | None = None):
    """Decorator (or call) recording a model class under ``name`` (default: the class name)."""
    def wrap(cls):
        _models[name or cls.__name__] = cls
        return cls
    return wrap


def register_loss(name: str | None = None):
    def wrap(cls):
        _losses[name or cls.__name__] = cls
        return cls
    return wrap


def _load() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    from decode_var.nn.loss import LOSSES
    from decode_var.nn.model import MODELS

    _models.update({k: v for k, v in MODELS.items() if k not in _models})
    _losses.update({k: v for k, v in LOSSES.items() if k not in _losses})
    from decode_var.backend import decode_available

    if decode_available():
        from decode_var.backend.decode import decode_losses, decode_models

        for k, v in decode_models().items():
            _models.setdefault(k, v)
        for k, v in decode_losses().items():
            _losses.setdefault(k, v)
    for group, table in ((MODEL_GROUP, _models), (LOSS_GROUP, _losses)):
        for ep in metadata.entry_points(group=group):
            try:
                table.setdefault(ep.name, ep.load())
            except Exception as err:  # a broken plugin must not break the others
                import warnings

                warnings.warn(f"entry point {group}:{ep.name} could not be loaded: {err}")


def list_models() -> list[str]:
    _load()
    return sorted(_models)


def list_losses() -> list[str]:
    _load()
    return sorted(_losses)


def _get(table: dict, name: str, key: str, kind: str):
    _load()
    if name not in table:
        close = difflib.get_close_matches(str(name), list(table), n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        plural = {"loss": "losses"}.get(kind, kind + "s")
        raise ParamError(f"{key} names an unknown {kind} {name!r}.{hint} Known {plural}: {', '.join(sorted(table))}. "
                         f"DECODE's own models and losses appear here when DECODE is installed.")
    return table[name]


def get_model(name: str):
    return _get(_models, name, "HyperParameter.architecture", "model")


def get_loss(name: str):
    return _get(_losses, name, "HyperParameter.loss_impl", "loss")


def build_model(param):
    return get_model(param.HyperParameter.architecture).parse(param)


def build_loss(param):
    return get_loss(param.HyperParameter.loss_impl).parse(param)


def register_with_decode() -> list[str]:
    """Add decode-var's models and losses to ``decode.neuralfitter.models`` / ``.loss``.

    Each class goes in under its registry name (``VARMultiScale``; ``PPXYZB``, ``AdaptivePPXYZB``),
    the name a param file's ``architecture`` / ``loss_impl`` uses. A name DECODE already defines is
    never replaced (decode-var's ``PPXYZB`` class is called ``PPXYZBLoss`` in Python, DECODE's
    ``PPXYZBLoss`` stays DECODE's). Code that resolves a class by name in DECODE's namespaces then
    finds them, e.g. ``getattr(decode.neuralfitter.models, 'VARMultiScale')``. Returns the names added.
    """
    from decode_var.backend import resolve_backend_name

    resolve_backend_name("decode")  # clear error when DECODE is not usable
    from decode_var.backend.decode import decode_namespaces
    from decode_var.nn.loss import LOSSES
    from decode_var.nn.model import MODELS

    namespaces = decode_namespaces()
    return (add_absent(namespaces["decode.neuralfitter.models"], MODELS, "decode.neuralfitter.models")
            + add_absent(namespaces["decode.neuralfitter.loss"], LOSSES, "decode.neuralfitter.loss"))


def add_absent(namespace, entries: Dict[str, Callable], where: str) -> list[str]:
    """Set ``namespace.<name> = cls`` for each entry whose name ``namespace`` does not have yet.

    A plugin never replaces its host's names: a taken name is left as it is, with a warning naming
    it (unless it already holds the same class, as after a second call). Returns the names added.
    """
    import warnings

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
