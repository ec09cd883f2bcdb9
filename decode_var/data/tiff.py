"""Lazy TIFF frame stacks and the frame windows DECODE's ``Infer`` feeds to a model.

:class:`TiffStack` opens a (multi-page, possibly larger than memory) TIFF without reading its pixels:
contiguous uncompressed data (what tifffile and ImageJ write by default) is memory-mapped; other files
are read page by page. A movie saved frame by frame (one TIFF series per frame or per appended block)
is read whole: every page is a frame; a file whose series are not all 2D frames of one size and pixel
type is refused, naming its layout. ``read(start, stop)`` returns float32 frames ``(T, H, W)`` indexed
like DECODE's frames (``[frame, x, y]`` = ``[page, row, column]``, no transposition, as DECODE's
``load_tif``).

:func:`window_batches` yields batches of ``frame_window`` consecutive frames around each frame. At the
stack ends the window is padded by repeating the first / last frame: DECODE's ``InferenceDataset`` uses
``pad='same'`` and clamps the window's frame indices to ``[0, T - 1]`` (``SMLMDataset._get_frames``).
"""
from __future__ import annotations

import logging
import os
import pathlib
import re
from typing import Iterator, Optional, Tuple, Union

import numpy as np
import tifffile
import torch

from decode_var.core.errors import InputDataError

__all__ = ["TiffStack", "FolderStack", "open_stack", "window_batches", "window_indices", "read_blocks"]


class _LogCapture(logging.Handler):
    """Collects tifffile's logged errors (not warnings, which good files from some software trigger):
    a truncated file often only shows up there, as a stack with fewer pages."""

    def __init__(self):
        super().__init__(level=logging.ERROR)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


class _Frames:
    """What a lazily read movie offers: ``shape`` (T, H, W), ``len``, ``read(start, stop)`` -> float32
    (T, H, W), indexing by frame or contiguous slice, ``close`` and use as a context manager."""

    _shape: Tuple[int, int, int]

    @property
    def shape(self) -> Tuple[int, int, int]:
        """(T, H, W) = (frames, size along x, size along y)."""
        return self._shape

    def __len__(self) -> int:
        return self._shape[0]

    def read(self, start: int = 0, stop: Optional[int] = None) -> np.ndarray:
        raise NotImplementedError

    def close(self) -> None:
        """Release open files."""

    def __getitem__(self, item) -> np.ndarray:
        if isinstance(item, slice):
            if item.step not in (None, 1):
                raise ValueError(f"{type(self).__name__} supports contiguous slices only.")
            return self.read(item.start or 0, item.stop)
        i = int(item)
        i = i + len(self) if i < 0 else i
        if not 0 <= i < len(self):
            raise IndexError(f"frame {item} out of range for {len(self)} frames")
        return self.read(i, i + 1)[0]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class TiffStack(_Frames):
    """A TIFF stack of 2D grayscale frames, read lazily.

    Args:
        path: .tif / .tiff file.

    Raises:
        InputDataError: missing or unreadable file, truncated or corrupt data, frames that are not 2D
            grayscale (e.g. RGB or several channels), series of different frame sizes or pixel types, or
            a stack without frames.
    """

    def __init__(self, path: Union[str, os.PathLike]):
        self.path = pathlib.Path(path)
        if not self.path.exists():
            raise InputDataError(f"Frame file {self.path} does not exist.")
        if not self.path.is_file():
            raise InputDataError(f"Frame file {self.path} is not a file (give one TIFF stack, or a folder of TIFF "
                                 "files to decode_var.data.tiff.open_stack).")
        if self.path.stat().st_size == 0:
            raise InputDataError(f"Frame file {self.path} is empty (0 bytes).")

        self._tif, series = self._open()
        self._offset, self._pages = None, None
        if len(series) > 1:
            self._init_pages(series)
        else:
            self._init_series(series[0])

    def _open(self):
        """(TiffFile, its series), with tifffile's logged errors turned into :class:`InputDataError`."""
        capture = _LogCapture()
        logger = logging.getLogger("tifffile")
        logger.addHandler(capture)
        tif = None
        try:
            try:
                tif = tifffile.TiffFile(str(self.path))
                series = list(tif.series)
                n_pages = len(tif.pages)
            except Exception as err:  # tifffile raises TiffFileError, ValueError, struct.error, ...
                if tif is not None:
                    tif.close()
                raise InputDataError(f"Frame file {self.path} is not a readable TIFF ({type(err).__name__}: "
                                     f"{err}). Is it corrupt or truncated?") from err
        finally:
            logger.removeHandler(capture)
        if capture.messages:
            tif.close()
            raise InputDataError(f"Frame file {self.path} is corrupt or truncated: tifffile reports "
                                 f"'{capture.messages[0]}'.")
        if not series or n_pages == 0:
            tif.close()
            raise InputDataError(f"Frame file {self.path} contains no images.")
        return tif, series

    def _init_series(self, series) -> None:
        """One series: memory-mapped when contiguous and uncompressed, else read page by page."""
        shape, axes = tuple(series.shape), str(series.axes)
        self._shape = self._frame_shape(shape, axes)
        self.dtype = np.dtype(series.dtype)
        offset = series.dataoffset
        if offset is not None:  # tifffile sets it only for contiguous, uncompressed data
            need = offset + int(np.prod(shape)) * self.dtype.itemsize
            size = self.path.stat().st_size
            if size < need:
                full = max(0, (size - offset) // (self.dtype.itemsize * self._shape[1] * self._shape[2]))
                self.close()
                raise InputDataError(f"Frame file {self.path} is truncated: {self._shape[0]} frames need "
                                     f"{need} bytes, the file has {size} ({full} complete frames).")
            self._offset = offset
        elif len(series.pages) != self._shape[0]:
            self.close()
            raise InputDataError(f"Frame file {self.path} is inconsistent: metadata says {self._shape[0]} "
                                 f"frames, found {len(series.pages)} pages. Is it truncated?")

    def _init_pages(self, series) -> None:
        """Several series, as a movie saved frame by frame gives (``tifffile.imwrite(..., append=True)``, or
        ``TiffWriter.write(..., contiguous=False)`` per frame: one series each): their pages, in file
        order, are the stack when every series is a stack of 2D grayscale frames of one size and pixel
        type; anything else (an OME file of several images, a thumbnail, mixed sizes) is refused naming
        the layout. Read page by page."""
        kinds = {str(getattr(s, "kind", "")) for s in series}
        shapes = set()
        for s in series:
            try:
                t, h, w = self._frame_shape(tuple(s.shape), str(s.axes))
            except InputDataError:
                t, h, w = -1, tuple(s.shape), str(s.axes)
            shapes.add((h, w, np.dtype(s.dtype).str, t == len(s.pages)))
        if "ome" in kinds or len(shapes) != 1 or not next(iter(shapes))[3]:
            self.close()
            raise InputDataError(f"Frame file {self.path} holds {_layout(series)}: not one stack of 2D frames of "
                                 "one size and pixel type. Save one movie of grayscale frames per file (e.g. "
                                 "one field of view / channel), or export the frames as a single stack.")
        self._pages = [page for s in series for page in s.pages]
        h, w, _, _ = shapes.pop()
        self._shape = (len(self._pages), int(h), int(w))
        self.dtype = np.dtype(series[0].dtype)
        size = self.path.stat().st_size
        for i, page in enumerate(self._pages):
            end = max((o + n for o, n in zip(page.dataoffsets, page.databytecounts)), default=size + 1)
            if end > size or not page.databytecounts or min(page.databytecounts) == 0:
                n = len(self._pages)
                self.close()
                raise InputDataError(f"Frame file {self.path} is truncated: the data of frame {i} (of {n}) "
                                     f"ends at byte {end}, the file has {size}.")

    @staticmethod
    def _frame_shape(shape, axes) -> Tuple[int, int, int]:
        if "S" in axes and shape[axes.index("S")] > 1:
            raise InputDataError(f"Frames must be 2D grayscale; this TIFF has {shape[axes.index('S')]} samples "
                                 f"per pixel (RGB?), shape {shape} axes {axes}.")
        if len(shape) == 2:
            return (1, shape[0], shape[1])
        lead = [s for s in shape[:-2]]
        if sum(s > 1 for s in lead) > 1:
            raise InputDataError(f"Frames must be a (T, H, W) stack of 2D frames; this TIFF has shape {shape} "
                                 f"(axes {axes}). Save one channel / z-plane per file.")
        t = int(np.prod(lead)) if lead else 1
        if t == 0 or shape[-1] == 0 or shape[-2] == 0:
            raise InputDataError(f"Frame file stack is empty (shape {shape}).")
        return (t, int(shape[-2]), int(shape[-1]))

    def __repr__(self) -> str:
        return f"TiffStack({str(self.path)!r}, shape={self._shape}, dtype={self.dtype})"

    def _read_contiguous(self, start: int, stop: int) -> np.ndarray:
        """Frames of contiguous, uncompressed data by a plain read at their offset. Not a memory map: pages a
        map has read stay resident and count in the process's memory (+125 MiB per 1,000 frames of 256 x 256 px
        uint16, measured with ``benchmarks/bench_long_fit.py``), so a 10,000-frame fit grew past its budget."""
        frame_bytes = int(np.prod(self._shape[1:])) * self.dtype.itemsize
        want = (stop - start) * frame_bytes
        with open(self.path, "rb") as f:
            f.seek(self._offset + start * frame_bytes)
            data = f.read(want)
        if len(data) != want:
            raise InputDataError(f"Frame file {self.path}: frames {start}..{stop - 1} end early ({len(data)} of "
                                 f"{want} bytes). Is the file truncated?")
        frames = np.frombuffer(data, dtype=self.dtype.newbyteorder(self._tif.byteorder))
        return frames.astype(np.float32).reshape((stop - start,) + self._shape[1:])

    def read(self, start: int = 0, stop: Optional[int] = None) -> np.ndarray:
        """Frames ``start .. stop - 1`` as float32 ``(stop - start, H, W)`` (python slice semantics)."""
        start, stop, _ = slice(start, stop).indices(len(self))
        if stop <= start:
            return np.zeros((0,) + self._shape[1:], dtype=np.float32)
        if self._offset is not None:
            return self._read_contiguous(start, stop)
        try:
            if self._pages is not None:
                frames = np.stack([self._pages[i].asarray() for i in range(start, stop)])
            else:
                frames = self._tif.asarray(key=range(start, stop), series=0)
        except Exception as err:
            raise InputDataError(f"Frame file {self.path}: frames {start}..{stop - 1} cannot be read "
                                 f"({type(err).__name__}: {err}). Is the file corrupt or truncated?") from err
        return np.asarray(frames, dtype=np.float32).reshape((stop - start,) + self._shape[1:])

    def close(self) -> None:
        self._pages = None
        tif = getattr(self, "_tif", None)
        if tif is not None:
            tif.close()
            self._tif = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


def _layout(series) -> str:
    """'N series (series 0-3: shape (6, 7) YX uint16; series 4: ...)': runs of alike series, the first six."""
    runs = []
    for i, s in enumerate(series):
        key = f"shape {tuple(s.shape)} {s.axes} {np.dtype(s.dtype).name}"
        if runs and runs[-1][2] == key:
            runs[-1][1] = i
        else:
            runs.append([i, i, key])
    parts = [f"series {a}{f'-{b}' if b > a else ''}: {key}" for a, b, key in runs[:6]]
    kind = str(getattr(series[0], "kind", "")) or "tiff"
    return f"{len(series)} {kind} series ({'; '.join(parts)}{'; ...' if len(runs) > 6 else ''})"


def window_indices(frame_ix: torch.Tensor, n_frames: int, frame_window: int = 3,
                   skip_T: Optional[torch.Tensor] = None, first: int = 0) -> torch.Tensor:
    """(B, frame_window) frame indices of the windows centred on ``frame_ix`` (B,), clamped to the stack.

    ``skip_T``: (T,) bool over the stack's frames ``first .. first + T - 1`` (all frames the windows
    reach): frames to leave out of their neighbours' windows (constant, saturated, ...). A skipped frame
    acts as an end of the stack: a channel that would show it, or a frame beyond it, repeats the channel
    next to it towards the centre, so the window of a frame next to a skipped one is the window that
    frame has at the end of a stack (DECODE's padding).
    """
    if frame_window < 1 or frame_window % 2 != 1:
        raise ValueError(f"frame_window must be an odd number >= 1, got {frame_window}.")
    half = (frame_window - 1) // 2
    offsets = torch.arange(-half, half + 1)
    ix = (frame_ix[:, None] + offsets[None, :]).clamp(0, n_frames - 1)
    if skip_T is None:
        return ix
    for step in (1, -1):  # outwards from the centre, after then before it
        blocked = torch.zeros(ix.size(0), dtype=torch.bool)
        for c in range(half + step, half + step * (half + 1), step):
            blocked |= skip_T[ix[:, c] - first]
            ix[:, c] = torch.where(blocked, ix[:, c - step], ix[:, c])
    return ix


def window_batches(stack, batch_size: int, frame_window: int = 3, start: int = 0,
                   stop: Optional[int] = None) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    """Batches of frame windows for inference, in order.

    Args:
        stack: :class:`TiffStack`, or a (T, H, W) array / tensor.
        batch_size: windows per batch (the last batch may be smaller).
        frame_window: odd number of consecutive frames per window (the model's input channels).
        start, stop: range of centre frames (default: all).

    Yields:
        (frame_ix (B,) long, frames_NCHW (B, frame_window, H, W) float32); channel ``c`` of window ``b`` is
        frame ``clamp(frame_ix[b] + c - frame_window // 2, 0, T - 1)``: the ends repeat the first / last
        frame, as DECODE's InferenceDataset.
    """
    n = len(stack)
    for b0, b1, lo, frames_THW in read_blocks(stack, batch_size, frame_window, start, stop):
        centre = torch.arange(b0, b1)
        yield centre, frames_THW[window_indices(centre, n, frame_window) - lo].contiguous()


def read_blocks(stack, batch_size: int, frame_window: int = 3, start: int = 0,
                stop: Optional[int] = None) -> Iterator[Tuple[int, int, int, torch.Tensor]]:
    """Blocks of consecutive frames for batches of ``batch_size`` centre frames, each frame read once.

    Yields:
        (b0, b1, lo, frames_THW): centre frames ``b0 .. b1 - 1``; ``frames_THW`` (float32) holds stack
        frames ``lo .. lo + T - 1``, the centre frames plus the window's halo (``frame_window // 2``
        frames on each side, clipped to the stack). Expand into windows with
        ``frames_THW[window_indices(arange(b0, b1), n, frame_window) - lo]``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    if frame_window < 1 or frame_window % 2 != 1:
        raise ValueError(f"frame_window must be an odd number >= 1, got {frame_window}.")
    n = len(stack)
    start, stop, _ = slice(start, stop).indices(n)
    half = (frame_window - 1) // 2
    for b0 in range(start, stop, batch_size):
        b1 = min(b0 + batch_size, stop)
        lo, hi = max(0, b0 - half), min(n, b1 + half)
        yield b0, b1, lo, _read(stack, lo, hi)


def _read(stack, lo: int, hi: int) -> torch.Tensor:
    if isinstance(stack, _Frames):
        return torch.from_numpy(stack.read(lo, hi))
    if isinstance(stack, torch.Tensor):
        return stack[lo:hi].float()
    return torch.as_tensor(np.asarray(stack[lo:hi]), dtype=torch.float32)


#: file name endings read from a frame folder
TIFF_SUFFIXES = (".tif", ".tiff")


class FolderStack(_Frames):
    """A folder of TIFF files read as one movie, in natural name order (``frame_2.tif`` before
    ``frame_10.tif``): what acquisition software that saves one file per frame (or per block) writes.
    Each file holds one or more 2D frames; all frames must have one size and pixel type. Files are opened
    once to count their frames, then only when their frames are read; other files in the folder (metadata,
    notes) are ignored.

    Raises:
        InputDataError: a folder without TIFF files, files of different frame sizes or pixel types (named),
            or an unreadable file (as :class:`TiffStack`).
    """

    def __init__(self, path: Union[str, os.PathLike]):
        self.path = pathlib.Path(path)
        self.files = sorted((p for p in self.path.iterdir() if p.is_file() and p.suffix.lower() in TIFF_SUFFIXES),
                            key=lambda p: _natural_key(p.name))
        if not self.files:
            raise InputDataError(f"Frame folder {self.path} holds no .tif / .tiff files. Give a TIFF stack, or a "
                                 "folder of TIFF files (one per frame or per block).")
        counts, first = [], None
        for f in self.files:
            with TiffStack(f) as stack:
                kind = (stack.shape[1:], stack.dtype)
                if first is None:
                    first = (f, kind)
                elif kind != first[1]:
                    raise InputDataError(
                        f"Frame folder {self.path}: {f.name} holds {kind[0][0]} x {kind[0][1]} px {kind[1]} frames, "
                        f"{first[0].name} {first[1][0][0]} x {first[1][0][1]} px {first[1][1]}. A movie's files "
                        "must share the frame size and pixel type: move other acquisitions out of the folder.")
                counts.append(len(stack))
        self.dtype = first[1][1]
        self._starts = np.concatenate([[0], np.cumsum(counts)])
        self._shape = (int(self._starts[-1]),) + tuple(first[1][0])

    def __repr__(self) -> str:
        return f"FolderStack({str(self.path)!r}, {len(self.files)} files, shape={self._shape}, dtype={self.dtype})"

    def read(self, start: int = 0, stop: Optional[int] = None) -> np.ndarray:
        """Frames ``start .. stop - 1`` of the movie as float32 ``(stop - start, H, W)``."""
        start, stop, _ = slice(start, stop).indices(len(self))
        parts = [np.zeros((0,) + self._shape[1:], dtype=np.float32)]
        first = int(np.searchsorted(self._starts, start, side="right")) - 1
        for k in range(first, len(self.files)):
            lo, hi = int(self._starts[k]), int(self._starts[k + 1])
            if lo >= stop:
                break
            with TiffStack(self.files[k]) as stack:
                parts.append(stack.read(max(start, lo) - lo, min(stop, hi) - lo))
        return np.concatenate(parts)


def open_stack(path: Union[str, os.PathLike]) -> _Frames:
    """A movie from ``path``: a TIFF file (:class:`TiffStack`) or a folder of TIFF files (:class:`FolderStack`)."""
    return FolderStack(path) if pathlib.Path(path).is_dir() else TiffStack(path)


def _natural_key(name: str) -> list:
    return [(0, int(t), "") if t.isdigit() else (1, 0, t.lower()) for t in re.split(r"(\d+)", name)]
