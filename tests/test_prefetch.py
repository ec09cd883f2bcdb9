"""decode_var.training.prefetch.Prefetcher: the same batches as a plain loop, made one step ahead."""
from __future__ import annotations

import threading
import time
import traceback
from pathlib import Path

import pytest
import torch

from decode_var.training.prefetch import Prefetcher


def _prefetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("decode-var-prefetch")]


@pytest.fixture()
def quickstart_make():
    """``make(step)``: a seeded quickstart batch with its targets and weights, as the trainer makes them."""
    from decode_var.backend import get_backend
    from decode_var.config.param import load_param
    from decode_var.data.simulation import Simulator
    from decode_var.data.targets import MultiScaleTargets
    param = load_param(Path(__file__).resolve().parents[1] / "decode_var" / "config" / "var_quickstart.yaml")
    sim = Simulator.parse(param)
    targets = MultiScaleTargets.parse(param, get_backend("builtin"))

    def make(step):
        b = sim.sample(4, 1000 + step)
        tg, wg = targets(b.em, b.bg_NHW, 4)
        return [b.frames_NCHW, b.em.xyz, b.em.phot, b.em.frame_ix, b.bg_NHW, *tg, *wg]

    return make


@pytest.mark.parametrize("depth", [1, 2])
def test_same_batches_as_the_plain_loop(quickstart_make, depth):
    """Bit for bit, in order, also while the consumer reseeds and draws from the global RNG (as a step does)."""
    plain = [(s, quickstart_make(s)) for s in range(6)]
    got = []
    for step, batch in Prefetcher(quickstart_make, range(6), depth=depth):
        torch.manual_seed(step)
        torch.rand(1000)  # dropout / teacher-forcing coins in the main thread
        got.append((step, batch))
    assert [s for s, _ in got] == list(range(6))
    for (_, a), (_, b) in zip(plain, got):
        assert len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))
    assert not _prefetch_threads()


def test_make_runs_while_the_step_runs():
    """10 steps of 50 ms data + 50 ms step: about 0.55 s overlapped, 1.0 s in a plain loop."""
    def make(step):
        time.sleep(0.05)
        return step

    t0 = time.perf_counter()
    for _ in Prefetcher(make, range(10)):
        time.sleep(0.05)
    assert time.perf_counter() - t0 < 0.85


def test_exception_reaches_the_consumer_with_its_traceback():
    def make_batch_that_fails(step):
        if step == 3:
            raise ValueError("simulation failed at step 3")
        return step

    seen = []
    with pytest.raises(ValueError, match="step 3") as info:
        for step, batch in Prefetcher(make_batch_that_fails, range(10)):
            seen.append(batch)
    assert seen == [0, 1, 2]
    names = [f.name for f in traceback.extract_tb(info.value.__traceback__)]
    assert "make_batch_that_fails" in names
    assert not _prefetch_threads()


def test_early_stop_joins_the_thread_and_stops_making():
    calls = []

    def make(step):
        calls.append(step)
        time.sleep(0.01)
        return step

    for step, _ in Prefetcher(make, range(1000), depth=2):
        if step == 2:
            break
    assert not _prefetch_threads()
    assert len(calls) <= 3 + 2 + 1  # consumed, held ahead, in the making


def test_with_block_stops_the_thread_when_the_step_fails():
    with pytest.raises(RuntimeError, match="step failed"):
        with Prefetcher(lambda s: s, range(1000)) as batches:
            for step, _ in batches:
                if step == 1:
                    raise RuntimeError("step failed")
    assert not batches.alive and not _prefetch_threads()


def test_close_before_iterating_and_single_use():
    pf = Prefetcher(lambda s: s, range(3))
    pf.close()  # never started: nothing to join
    pf = Prefetcher(lambda s: s, range(3))
    assert [s for s, _ in pf] == [0, 1, 2]
    with pytest.raises(RuntimeError, match="already run"):
        list(pf)


def test_depth_is_checked():
    with pytest.raises(ValueError, match="depth must be 1 or 2"):
        Prefetcher(lambda s: s, range(3), depth=0)


def test_threads_apply_to_the_background_thread():
    seen = []

    def make(step):
        seen.append(torch.get_num_threads())
        return step

    before = torch.get_num_threads()
    assert [s for s, _ in Prefetcher(make, range(2), threads=1)] == [0, 1]
    assert seen == [1, 1]
    if "OpenMP" in torch.__config__.parallel_info():  # per-thread setting with torch's OpenMP builds
        assert torch.get_num_threads() == before
