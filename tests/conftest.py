"""Shared test helpers.

Tests marked ``decode`` compare decode-var's built-in backend with real DECODE 0.10 and are skipped
(with the reason) when DECODE is not usable here.
"""
import pytest
import torch
from hypothesis import settings

# Seed every random source, Hypothesis included: CI runs the same examples every time.
settings.register_profile("decode_var", derandomize=True, database=None, deadline=None)
settings.load_profile("decode_var")

from decode_var.backend import decode_status


def pytest_collection_modifyitems(config, items):
    ok, found = decode_status()
    if ok:
        return
    skip = pytest.mark.skip(reason=f"real DECODE 0.10 not usable: {found}")
    for item in items:
        if "decode" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    torch.set_num_threads(2)
    yield
