"""Seeds derived from integers: every random draw of a run is a function of (VAR.seed, epoch, step, ...)."""
from __future__ import annotations


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers (FNV-1a over 64-bit words; stable across runs and platforms)."""
    h = 1469598103934665603
    for p in parts:
        h = ((h ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) * 1099511628211) & 0xFFFFFFFFFFFFFFFF
    return h & 0x7FFFFFFFFFFFFFFF
