"""Networks and losses: tensors in, tensors out (no files, CLIs or DECODE).

Importing this package registers its models and losses with :mod:`decode_var.registry`:
``VARMultiScale`` (:mod:`decode_var.nn.model`, built from :mod:`decode_var.nn.blocks`);
``PPXYZB`` and ``AdaptivePPXYZB`` (:mod:`decode_var.nn.loss`, with :mod:`decode_var.nn.channel_weights`
and the scale schedules of :mod:`decode_var.nn.progressive`).
"""
from decode_var.nn.loss import LOSSES
from decode_var.nn.model import MODELS

__all__ = ["LOSSES", "MODELS"]
