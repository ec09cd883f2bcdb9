"""Networks and losses: tensors in, tensors out (no files, CLIs or DECODE).

Importing this package registers its models and losses with :mod:`decode_var.registry`:
``VARMultiScale`` (:mod:`decode_var.nn.model`, built from :mod:`decode_var.nn.blocks`);
``PPXYZB`` and ``AdaptivePPXYZB`` (:mod:`decode_var.nn.loss`, with :mod:`decode_var.nn.channel_weights`
and the scale schedules of :mod:`decode_var.nn.progressive`). Their names are written once, in
those decorators; the registry's tables are the lists (``registry.models("decode_var")``).
"""
from decode_var.nn import loss, model

__all__ = ["loss", "model"]
