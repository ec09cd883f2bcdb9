"""Make the next training batch in a background thread while the current step runs.

A training step spends part of its time on data (simulation, targets and weights) and part on the
network. When the data stays on the CPU (the ``decode`` backend, or ``Hardware.device_simulation:
cpu``) while the network runs on a GPU, or when both share a CPU whose cores the network does not
fill, the two can overlap: torch releases the GIL inside its operators, so a plain thread runs the
simulation while the main thread runs the step.

Usage (the trainer's loop; ``make`` is a pure function of the step, e.g. seeded with
``derive_seed(VAR.seed, epoch, step, 2)``)::

    def make(step):
        batch = simulator.sample(batch_size, data_seed(step))
        return frame_scale(batch.frames_NCHW), targets(batch.em, batch.bg_NHW, batch_size)

    for step, (frames, tgt) in Prefetcher(make, range(start, steps)):
        train_step(frames, tgt)        # make(step + 1) runs meanwhile

    # or, to stop the thread at the end of the block whatever happens inside it:
    with Prefetcher(make, range(start, steps)) as batches:
        for step, (frames, tgt) in batches:
            train_step(frames, tgt)

The batches, and their order, are exactly those of ``for step in steps: make(step)``: one thread
calls ``make`` in the order of ``steps``; nothing is reordered or dropped. For that, ``make`` must
depend on its step only and must not draw from torch's global RNG, which the training step uses
concurrently (dropout, teacher-forcing coins): the built-in simulator draws from its own
``torch.Generator`` seeded with the batch seed (``decode_var.data.simulation``). DECODE's camera
(the ``decode`` backend) draws from the global RNG: there, prepare batches in worker processes
(a DataLoader with ``num_worker_train`` workers) instead of a thread.

An exception in ``make`` reaches the consumer at the step it belongs to, as the same exception
object with its traceback through ``make``. Leaving the loop early (``break``, an exception in the
step, ``close()``, or the ``with`` block ending) stops the thread after the batch it is making and
joins it; no thread is left behind.
"""
from __future__ import annotations

import queue
import threading
from typing import Any, Callable, Iterable, Iterator, Optional

import torch

_DONE = object()


class Prefetcher:
    """Iterate over ``(step, make(step))`` for ``step in steps``, making up to ``depth`` batches ahead.

    Args:
        make: ``make(step) -> batch``; called in the order of ``steps``, from one background thread.
        steps: the steps, e.g. ``range(start, n_steps)``.
        depth: finished batches held ahead of the consumer (1 or 2); one more may be in the making.
            Memory: up to ``depth + 1`` batches besides the one in use.
        name: the thread's name (seen in debuggers and ``threading.enumerate()``).
        threads: torch intra-op threads of the background thread (``torch.set_num_threads`` called in it,
            which with torch's OpenMP and MKL builds holds for that thread only); None = torch's default for
            a new thread. On a CPU that the training step already fills, 1 keeps the two from fighting
            over the cores.
    """

    def __init__(self, make: Callable[[int], Any], steps: Iterable[int], depth: int = 1,
                 name: str = "decode-var-prefetch", threads: Optional[int] = None):
        if depth not in (1, 2):
            raise ValueError(f"Prefetcher depth must be 1 or 2 (batches made ahead), got {depth!r}.")
        self.make, self.steps, self.depth, self.name, self.threads = make, steps, depth, name, threads
        self._queue: Optional[queue.Queue] = None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    # producer ------------------------------------------------------------------------------------
    def _put(self, item) -> bool:
        """Hand ``item`` to the consumer; False when the consumer has gone (stop requested)."""
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self) -> None:
        try:
            if self.threads is not None:
                torch.set_num_threads(int(self.threads))
            for step in self.steps:
                if self._stop.is_set():
                    return
                try:
                    item = (step, self.make(step), None)
                except BaseException as err:  # noqa: BLE001 -- handed to the consumer, re-raised there
                    self._put((step, None, err))
                    return
                if not self._put(item):
                    return
            self._put(_DONE)
        except BaseException as err:  # noqa: BLE001 -- e.g. iterating ``steps`` failed
            self._put((None, None, err))

    # consumer ------------------------------------------------------------------------------------
    def start(self) -> "Prefetcher":
        """Start the thread (``__iter__`` does it); a Prefetcher runs once."""
        if self._thread is not None:
            raise RuntimeError("This Prefetcher has already run; make a new one for another pass.")
        self._queue = queue.Queue(maxsize=self.depth)
        self._thread = threading.Thread(target=self._produce, name=self.name, daemon=True)
        self._thread.start()
        return self

    def __iter__(self) -> Iterator[tuple[int, Any]]:
        self.start()
        try:
            while True:
                item = self._queue.get()
                if item is _DONE:
                    return
                step, batch, err = item
                if err is not None:
                    raise err  # the producer's exception object, its traceback through make() kept
                yield step, batch
        finally:
            self.close()

    def close(self) -> None:
        """Stop making batches and join the thread (it first finishes the ``make`` call it is in)."""
        self._stop.set()
        thread = self._thread
        if thread is None or thread is threading.current_thread():
            return
        thread.join()  # a producer waiting to put sees the stop within 50 ms
        try:  # drop batches made ahead (memory)
            while True:
                self._queue.get_nowait()
        except queue.Empty:
            pass

    @property
    def alive(self) -> bool:
        """True while the background thread runs."""
        return self._thread is not None and self._thread.is_alive()

    def __enter__(self) -> "Prefetcher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
