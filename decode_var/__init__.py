"""decode-var: multi-scale next-scale-prediction models and a numerically safe 6-channel loss for DECODE.

Public entry points:

- :func:`decode_var.config.param.load_param`: DECODE-format param files with the plugin's ``VAR:`` section.
- :mod:`decode_var.backend`: the one seam to DECODE (``decode`` when real DECODE 0.10 is importable,
  ``builtin`` otherwise).
- :mod:`decode_var.registry`: models and losses by name; :func:`register_with_decode`.
"""
from decode_var.core.channels import CHANNELS
from decode_var.core.version import __version__

__all__ = ["CHANNELS", "register_with_decode", "__version__"]


def register_with_decode():
    """Add decode-var's models and losses to DECODE's namespaces (see :func:`decode_var.backend.register_with_decode`)."""
    from decode_var.backend import register_with_decode as _register  # lazy: else importing core loads the backend

    return _register()
