"""Deterministic scatter-add of emitter PSFs into frames, shared by the Gaussian and spline PSFs.

Below both :mod:`decode_var.data.simulation` and :mod:`decode_var.data.spline_psf`, so that neither
imports the other for it.
"""
from __future__ import annotations

import torch

__all__ = ["frame_slots", "accumulate", "accumulate_in_order", "IN_ORDER_ON_CPU"]


def frame_slots(frame_ix: torch.Tensor) -> torch.Tensor:
    """(E,) rank of each emitter among the emitters of its frame (0, 1, ... in the order given), long."""
    order = torch.argsort(frame_ix, stable=True)
    sorted_ix = frame_ix[order]
    rank_sorted = torch.arange(frame_ix.numel(), device=frame_ix.device) - torch.searchsorted(sorted_ix, sorted_ix)
    return torch.empty_like(rank_sorted).index_put_((order,), rank_sorted)


#: tests set this to run :func:`accumulate`'s GPU path on the CPU
IN_ORDER_ON_CPU = False


def accumulate(out: torch.Tensor, index: torch.Tensor, values: torch.Tensor, slot) -> torch.Tensor:
    """``out.index_add_(0, index, values)``, summed in the same order on every run on every device.

    On the CPU this is ``index_add_`` itself (sequential, and what earlier versions computed bit for bit).
    On a GPU ``index_add_`` adds with atomics in no fixed order, so float sums differ between runs; there
    the values are added group by group of equal ``slot`` (one ``index_add_`` each, slot 0 first), and
    ``index`` must not repeat within a group (e.g. ``slot``: the emitter's rank within its frame).
    ``slot``: a long tensor like ``index``, or a function returning one (only called on the GPU path).
    """
    if (out.device.type == "cpu" and not IN_ORDER_ON_CPU) or index.numel() == 0:
        return out.index_add_(0, index, values)
    return accumulate_in_order(out, index, values, slot() if callable(slot) else slot)


def accumulate_in_order(out: torch.Tensor, index: torch.Tensor, values: torch.Tensor,
                        slot: torch.Tensor) -> torch.Tensor:
    """:func:`accumulate`'s GPU path, on any device: one ``index_add_`` per value of ``slot``, in increasing order."""
    order = torch.argsort(slot, stable=True)
    counts = torch.bincount(slot).tolist()
    for idx, val in zip(index[order].split(counts), values[order].split(counts)):
        out.index_add_(0, idx, val)
    return out
