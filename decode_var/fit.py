"""``decode-var-fit``: localize emitters in a TIFF stack with a trained model.

    decode-var-fit -p param_run.yaml --model model.pt --frames stack.tif --out emitters.h5|csv|pt

Reads the stack lazily in batches (stacks larger than memory work; the batch size is chosen from a
memory budget, ``--max-memory``), pads the frame window at the stack ends as DECODE's ``Infer`` does
(repeating the first / last frame), converts ADU to photons when ``Camera.convert2photons`` is set, and
writes DECODE's emitter file formats. The progress bar shows the frames done, the time left and frames/s.

Long acquisitions: each finished block of frames (``--block-frames``, default 100, whole batches) is saved
to ``<out>.partial/`` as it finishes. A fit stopped by Ctrl-C, SIGTERM, SIGKILL, a full disk or a crash
goes on with the same command plus ``--resume``: the finished blocks are checked against the stack,
param, model and options (an error names what changed), not fitted again, and the output is the file an
uninterrupted fit writes. Without ``--resume`` a folder of finished blocks is an error (pass ``--resume``,
or delete the folder): it is never discarded silently. The output is written under a temporary name and
renamed when complete, and the block folder removed after that: a failed run never replaces a good file.

Input guards (each a clear error with exit status 2, before the model sees the frame):

- pixel type: integers or floats; bool, complex and other types are refused;
- NaN / Inf pixels: refused with the frame indices, or with ``--mask-nonfinite`` replaced by the median
  of the frame's finite pixels;
- negative pixels while ``Camera.convert2photons`` is true (raw camera counts are never negative):
  refused; set ``convert2photons: false`` for frames already in photons;
- any frame size works (taken from the stack, the param is never edited); a size the finest
  output grid cannot divide is padded at the high border and emitters outside the frame dropped;
- every page of the TIFF is read, whatever its series layout (a movie appended frame by frame is one
  series per frame); series of different frame sizes or pixel types are refused, naming the layout;
- impossible frames (saturated: a quarter of the pixels at the integer type's maximum; constant; a
  median below -1 photon after the camera conversion) get no localizations and are left out of their
  neighbours' windows as the stack ends are (the window repeats the frame towards its centre); one
  warning per kind names them, and a stack with no frame left is refused. Most pixels below
  ``Camera.baseline`` is a warning with the numbers;
- localizations outside the frame, or beyond the trained z range (``Simulation.emitter_extent``) by more than
  a fifth of its length (``Predictor.inside``), are dropped;
  the summary line counts frames read, fitted and excluded and localizations dropped, and the output
  file's metadata stores the same record (:func:`decode_var.data.emitter_io.load_source_meta`);
- non-finite model outputs: refused, naming the frames (``Predictor.output``).

Output guards, before the model is loaded (:func:`decode_var.core.outputs.check_outputs`): ``-i`` names a
device this machine has; every file the fit will write (``--out``, the ``--format`` exports, the render)
goes in a writable folder, is not a folder, is none of the inputs (``--out model.pt`` would destroy the
model), and the free space covers :func:`expected_output_bytes`; ``<out>.partial/`` holds no finished
block unless ``--resume`` is given. A write that fails later (the disk fills meanwhile) ends with one line
naming the file; the previous file of that name is kept, and so are the finished blocks (the line says
so). Ctrl-C and SIGTERM end with one line and exit status 130.
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Optional, Sequence

import tifffile

from decode_var.core.devices import check_device
from decode_var.core.errors import DecodeVarError, OutputError, exit_status, os_error_text
from decode_var.core.outputs import check_outputs
from decode_var.data.tiff import TIFF_SUFFIXES
from decode_var.inference.blocks import BLOCK_FRAMES, PartialFit, PartialFitError
from decode_var.inference.export import export_paths, write_fit_outputs
from decode_var.inference.predictor import add_model_arguments, resolve_model_path
# the stack logic lives in decode_var.inference.stack; its public names stay importable from here
from decode_var.inference.stack import (check_block_values, check_stack_dtype, fit, localize_stack,
                                        resolve_batch_size)

PROG = "decode-var-fit"


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="decode-var-fit", description="Fit emitters in a TIFF stack.")
    add_model_arguments(p, frames_help=None)
    p.add_argument("--out", required=True, help="emitter file: .h5, .csv or .pt (DECODE's formats)")
    p.add_argument("--mask-nonfinite", action="store_true",
                   help="replace NaN/Inf pixels by the median of the frame's finite pixels instead of stopping")
    p.add_argument("--no-progress", action="store_true")
    # issue 15: exports for other software and the super-resolution image, next to --out
    p.add_argument("--format", nargs="+", default=["decode"], choices=("decode", "picasso", "thunderstorm"),
                   help="also write <out>_locs.hdf5 + .yaml (picasso) and/or <out>_thunderstorm.csv; --out is "
                        "always DECODE's format (docs/formats.md)")
    p.add_argument("--no-render", action="store_true", help="do not write <out>_render.png / .tif")
    p.add_argument("--max-sigma", type=float, default=None, metavar="NM",
                   help="write only localizations whose predicted lateral sigma is at most NM nm (models trained "
                        "with VAR.model.uncertainty, or DECODE's SigmaMUNet)")
    p.add_argument("--resume", action="store_true",
                   help="continue a stopped fit from the finished blocks in <out>.partial/ (checked against the "
                        "stack, param, model and options); starts afresh where there is none")
    p.add_argument("--block-frames", type=int, default=None,
                   help=f"frames per block saved to <out>.partial/ while fitting (default {BLOCK_FRAMES}, "
                        "rounded up to whole batches): a stopped fit loses at most one block")
    return p.parse_args(argv)


__all__ = ["main", "parse_args", "fit", "localize_stack", "resolve_batch_size", "check_block_values",
           "check_stack_dtype", "output_paths", "expected_output_bytes"]

#: Bytes of each emitter file per byte of the frames file: a dense 16-bit stack (one emitter per 100 px,
#: about 200 bytes each in DECODE's CSV) gives 2 bytes per px, the size of its pixels; usual stacks far less.
EMITTER_BYTES_PER_FRAME_BYTE = 1.0
#: Bytes of the render per camera pixel of one frame: 10 x 10 render px (10 nm px, 100 nm camera px), each
#: 8 bytes in the float32 TIFF (density and z) and at most 3 in the PNG.
RENDER_BYTES_PER_CAMERA_PX = 100 * 11


def output_paths(out, formats: Sequence[str] = ("decode",), render: bool = True) -> list[Path]:
    """Every file a fit writes: ``out``, the exports next to it (Picasso's with its .yaml), the render."""
    out = Path(out)
    paths = [out]
    for fmt in dict.fromkeys(f for f in formats if f != "decode"):
        paths.append(export_paths(out, fmt))
        if fmt == "picasso":
            paths.append(paths[-1].with_suffix(".yaml"))
    if render:  # the names write_fit_outputs and save_render give
        png = out.with_name(out.stem + "_render.png")
        paths += [png, png.with_suffix(".tif")]
    return paths


def expected_output_bytes(frames, formats: Sequence[str] = ("decode",), render: bool = True) -> int:
    """About how much a fit of the TIFF ``frames`` writes, generously: the free space it asks for.

    Each emitter file (DECODE's, each export, and the finished blocks in ``<out>.partial/`` while fitting):
    :data:`EMITTER_BYTES_PER_FRAME_BYTE` x the frames file; the render: :data:`RENDER_BYTES_PER_CAMERA_PX`
    x the pixels of one frame (the first page's size; only the TIFF header is read).
    """
    files = _tiff_files(frames)
    try:
        size = sum(os.path.getsize(f) for f in files)
    except OSError:  # missing: the fit says so
        return 0
    n_files = 2 + len({f for f in formats if f != "decode"})  # --out and its blocks, the exports
    total = int(EMITTER_BYTES_PER_FRAME_BYTE * size * n_files)
    if render and files:
        try:
            with tifffile.TiffFile(files[0]) as tif:
                shape = tif.pages[0].shape
            total += RENDER_BYTES_PER_CAMERA_PX * int(shape[-1]) * int(shape[-2])
        except Exception:  # noqa: BLE001 - a damaged TIFF is the fit's to report, with its own message
            pass
    return total


def _tiff_files(frames) -> list:
    """The TIFF file, or the TIFF files of a frame folder (:class:`decode_var.data.tiff.FolderStack`)."""
    path = Path(frames)
    if path.is_dir():
        return [p for p in path.iterdir() if p.is_file() and p.suffix.lower() in TIFF_SUFFIXES]
    return [path]


def check_fit_outputs(args) -> None:
    """The pre-flight of ``decode-var-fit``: device and outputs, before the model is loaded or a frame read."""
    check_device(args.device)
    render = not args.no_render
    outputs = output_paths(args.out, args.format, render)
    folder = Path(args.frames)
    if folder.is_dir():  # a TIFF written into a frame folder would be read as part of the movie next time
        for out in outputs:
            if out.suffix.lower() in TIFF_SUFFIXES and out.resolve().parent == folder.resolve():
                raise OutputError(f"cannot write {out}: it would land in the frame folder {folder} and be read as "
                                  "frames of the movie by the next fit. Choose an --out outside that folder.")
    check_outputs(outputs,
                  {"--model": resolve_model_path(args.model), "-p": args.param_file, "--frames": args.frames},
                  expected_output_bytes(args.frames, args.format, render))
    PartialFit(args.out).check_start(args.resume)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    with _sigterm_stops_the_fit():
        try:
            check_fit_outputs(args)
            em = fit(args.param_file, args.model, args.frames, args.out, args.batch_size, args.device,
                     args.mask_nonfinite, args.trust_pickle, not args.no_progress, args.max_memory, args.compile,
                     resume=args.resume, block_frames=args.block_frames, sparse=args.sparse,
                     max_sigma=args.max_sigma)
        except (DecodeVarError, OSError, KeyboardInterrupt) as err:
            return _stopped(args.out, err)
        print(em.fit_report.summary(len(em), args.out))
        release_freed_memory()
        try:
            extra = write_fit_outputs(args.param_file, em, args.out, args.frames, args.format, not args.no_render,
                                      model=args.model)  # its card calibrates the exported precision
        except (DecodeVarError, OSError, KeyboardInterrupt) as err:
            return exit_status(PROG, err, kept=f"the emitters are saved in {args.out}, the other outputs are not "
                                               "all written", context=f"the emitters are saved in {args.out}, but ")
    if extra:
        print(f"wrote {', '.join(str(p) for p in extra)}")
    return 0


def release_freed_memory() -> None:
    """Hand the memory the fit has freed (the network's batches, up to ``--max-memory``) back to the system
    before the exports and the render allocate theirs: glibc keeps freed heap memory in the process
    otherwise, and the render's arrays come on top of it. Nothing where the C library is not glibc."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class FitTerminated(DecodeVarError, KeyboardInterrupt):
    """SIGTERM (``kill``, a batch system's time limit): the fit stops at once, as on Ctrl-C."""


@contextlib.contextmanager
def _sigterm_stops_the_fit():
    """SIGTERM raises :class:`FitTerminated` in the main thread (blocks already saved stay; the output is
    untouched), so that the fit ends with its one line instead of vanishing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise FitTerminated("stopped by SIGTERM")

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _stopped(out, err: BaseException) -> int:
    """The one line of a fit that did not finish: the output is as it was and, where blocks are kept in
    ``<out>.partial/``, that ``--resume`` continues from them."""
    kept = PartialFit(out).describe()
    if kept is None:
        return exit_status(PROG, err, kept=f"nothing was written ({out} is as it was)")
    hint = f"{out} is as it was; {kept}: run the same command with --resume to continue from there"
    if isinstance(err, KeyboardInterrupt):
        return exit_status(PROG, err, kept=hint)
    if isinstance(err, PartialFitError):  # its message already says what to do with the blocks
        return exit_status(PROG, err)
    text = str(err) if isinstance(err, DecodeVarError) else \
        f"{err.filename + ': ' if getattr(err, 'filename', None) else ''}{os_error_text(err)}"
    return exit_status(PROG, DecodeVarError(f"{text.rstrip('.')}; {hint}."))


if __name__ == "__main__":
    sys.exit(main())
