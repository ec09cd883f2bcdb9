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

Each name is written once, in its decorator (``@register_model()``, ``@register_loss("PPXYZB")``):
these tables are what :func:`decode_var.backend.register_with_decode` offers to DECODE (the entries
of :data:`PACKAGE`) and what a loss's checkpoint state names it by (:func:`name_of`).
"""
from __future__ import annotations

import difflib
import importlib
import warnings
from dataclasses import dataclass
from importlib import metadata
from typing import Callable, Dict

from decode_var.core.errors import ParamError

MODEL_GROUP = "decode_var.models"
LOSS_GROUP = "decode_var.losses"
#: The package whose own entries go into DECODE's namespaces (``decode_var``).
PACKAGE = __name__.partition(".")[0]


@dataclass(frozen=True)
class Entry:
    """A registered class and the top-level package that provides it (``decode_var``, ``decode``, a plugin's)."""

    cls: Callable
    package: str


_models: Dict[str, Entry] = {}
_losses: Dict[str, Entry] = {}
_loaded = False


def _entry(cls, package: str | None = None) -> Entry:
    return Entry(cls, package or str(getattr(cls, "__module__", "")).partition(".")[0])


def register_model(name: str | None = None, package: str | None = None):
    """Class decorator recording a model under ``name`` (default: the class name). A name taken
    already keeps its first class (a built-in is never replaced by a later registration).
    ``package``: who provides it (default: the top-level package of the class's module)."""
    def wrap(cls):
        _models.setdefault(name or cls.__name__, _entry(cls, package))
        return cls
    return wrap


def register_loss(name: str | None = None, package: str | None = None):
    """Class decorator recording a loss under ``name`` (default: the class name); see :func:`register_model`."""
    def wrap(cls):
        _losses.setdefault(name or cls.__name__, _entry(cls, package))
        return cls
    return wrap


def name_of(cls) -> str:
    """The name ``cls`` was first registered under (model or loss); its class name if it has none."""
    for table in (_models, _losses):
        for name, entry in table.items():
            if entry.cls is cls:
                return name
    return cls.__name__


#: Modules whose import registers built-in entries, and hooks that register DECODE's classes when
#: DECODE is usable; loaded by name on the first lookup, like entry points (the registry imports
#: none of them itself, so it stays a leaf of the package's import graph).
PROVIDERS = ("decode_var.nn", "decode_var.backend:register_decode_classes")


def _load() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for provider in PROVIDERS:
        module, _, hook = provider.partition(":")
        mod = importlib.import_module(module)
        if hook:
            getattr(mod, hook)()
    for group, table in ((MODEL_GROUP, _models), (LOSS_GROUP, _losses)):
        for ep in metadata.entry_points(group=group):
            try:
                table.setdefault(ep.name, _entry(ep.load()))
            except Exception as err:  # a broken plugin must not break the others
                warnings.warn(f"entry point {group}:{ep.name} could not be loaded: {err}")


def _classes(table: dict, package: str | None) -> dict:
    _load()
    return {name: e.cls for name, e in sorted(table.items()) if package is None or e.package == package}


def models(package: str | None = None) -> dict:
    """Name -> model class, sorted by name; ``package``: only the entries that package provides."""
    return _classes(_models, package)


def losses(package: str | None = None) -> dict:
    """Name -> loss class, sorted by name; ``package``: only the entries that package provides."""
    return _classes(_losses, package)


def list_models() -> list[str]:
    return list(models())


def list_losses() -> list[str]:
    return list(losses())


def _get(table: dict, name: str, key: str, kind: str):
    _load()
    if name not in table:
        close = difflib.get_close_matches(str(name), list(table), n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        plural = {"loss": "losses"}.get(kind, kind + "s")
        raise ParamError(f"{key} names an unknown {kind} {name!r}.{hint} Known {plural}: {', '.join(sorted(table))}. "
                         f"DECODE's own models and losses appear here when DECODE is installed.")
    return table[name].cls


def get_model(name: str):
    return _get(_models, name, "HyperParameter.architecture", "model")


def get_loss(name: str):
    return _get(_losses, name, "HyperParameter.loss_impl", "loss")


def build_model(param):
    return get_model(param.HyperParameter.architecture).parse(param)


def build_loss(param):
    return get_loss(param.HyperParameter.loss_impl).parse(param)
