"""``decode-var-eval``: score a trained model with DECODE's post-processing, matching and metrics.

    decode-var-eval -p param_run.yaml --model model.pt [--frames stack.tif --emitters gt.csv|gt.h5] --out DIR

Without ``--frames`` a seeded test set is simulated from the param (``TestSet.test_size`` samples,
``VAR.test_seed``: the set training reports on). Writes into DIR, each file atomically:
``metrics.json`` (DECODE's key names plus the CRLB ratios), ``emitters.csv`` (the localizations),
``report.png`` (error histograms, predicted vs true positions, Jaccard and RMSE by photon bin).

Before the model is loaded, the device and DIR are checked (:func:`check_eval_outputs`): DIR is a folder
(or can be made), writable, with the free space for the files, and none of them is an input (e.g. the
``--emitters`` ground truth as ``DIR/emitters.csv``). Errors end with one line (exit 2), Ctrl-C with one
line (exit 130).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch

from decode_var.config.param import load_param
from decode_var.core.atomic import atomic_write_text
from decode_var.core.devices import check_device
from decode_var.core.emitters import EmitterSet
from decode_var.core.errors import DecodeVarError, exit_status
from decode_var.core.log import note
from decode_var.core.outputs import check_outputs
from decode_var.data.emitter_io import save_emitters
from decode_var.data.tiff import open_stack
from decode_var.evaluation import plots
from decode_var.evaluation.model_card import refresh_card
from decode_var.inference import stack as fitting  # a module: tests patch fitting.localize_stack
from decode_var.inference.predictor import Predictor, add_model_arguments, resolve_model_path
from decode_var.inference.stack import check_stack_dtype, resolve_batch_size


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="decode-var-eval", description="Evaluate a trained model.")
    add_model_arguments(p, frames_help="TIFF stack to evaluate on (default: simulate the test set)")
    p.add_argument("--emitters", default=None, help="ground truth for --frames (.csv, .h5, .pt)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--n", type=int, default=None, help="simulated test-set size (default TestSet.test_size)")
    p.add_argument("--no-report", action="store_true", help="skip report.png")
    return p.parse_args(argv)


def simulated_test_set(protocol, simulator, n: Optional[int] = None):
    """(frames_NCHW in photons, ground truth) of the seeded test set of ``protocol`` (the run's
    :class:`~decode_var.evaluation.protocol.Protocol`: the set training reports on), made by ``simulator`` (the
    run's, :attr:`Components.simulator`)."""
    batch = protocol.simulate(simulator, n)
    return batch.frames_NCHW, protocol.ground_truth(batch)


def run(param_file, model, out, frames=None, emitters=None, n=None, device="cpu", trusted=False,
        report=True, batch_size="auto", max_memory=None, compile=False, sparse=False) -> dict:
    check_eval_outputs(param_file, model, out, frames, emitters, device, report)
    pred = Predictor(load_param(param_file), resolve_model_path(model), device, trusted, sparse=sparse)
    parts = pred.parts
    out = Path(out)
    if frames is None:
        frames_NCHW, gt = simulated_test_set(parts.protocol, parts.simulator, n)
        em_out = pred.predict(frames_NCHW)
        frame_hw = tuple(frames_NCHW.shape[-2:])
        centre = frames_NCHW.size(1) // 2  # each sample's own frame within its temporal window
        frame_image = lambda f: frames_NCHW[f, centre].cpu().numpy()  # noqa: E731
        image_unit = "photons"
    else:
        stack = open_stack(frames)  # the same guards as fitting; the frame size comes from the stack
        check_stack_dtype(stack.dtype, frames)
        bs = resolve_batch_size(pred, stack.shape[1:], len(stack), batch_size, max_memory)
        if compile:
            pred.compile(bs)
        em_out = EmitterSet.cat(fitting.localize_stack(pred, stack, bs))
        frame_hw = tuple(stack.shape[1:])
        # only the frames shown are read; ground truth may name frames the stack does not hold
        frame_image = lambda f: stack.read(f, f + 1)[0] if 0 <= f < len(stack) else None  # noqa: E731
        image_unit = "ADU"
        gt = pred.backend.load_emitters(emitters) if emitters is not None else None
    out.mkdir(parents=True, exist_ok=True)
    metrics = {}
    if gt is not None:
        if gt.px_size is None:
            gt.px_size = torch.tensor(parts.frames.px_size, dtype=torch.float32)
        metrics, matched = parts.protocol.score(pred.backend, parts.matcher, em_out, gt)
        if frames is None:  # the model's own seeded test set: its card's precision calibration (issue 27)
            refresh_card(resolve_model_path(model), parts.camera_record, metrics)
        if report:
            plots.plot_eval_report(out / "report.png", matched, gt, em_out, frame_hw=frame_hw,
                             frame_image=frame_image, image_unit=image_unit)
    elif frames is not None and emitters is None:
        note("no --emitters given: localizations written, no metrics.")
    save_emitters(out / "emitters.csv", em_out)
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2, sort_keys=True))
    return metrics


#: Free space asked for by an evaluation: the report and the metrics, plus the frames file's size for the
#: localizations (as decode-var-fit estimates, decode_var.fit.EMITTER_BYTES_PER_FRAME_BYTE).
EVAL_REPORT_BYTES = 20_000_000


def check_eval_outputs(param_file, model, out, frames=None, emitters=None, device="cpu", report=True) -> None:
    """The pre-flight of an evaluation into the folder ``out``; raises OutputError / DeviceError."""
    check_device(device)
    out = Path(out)
    files = [out / "metrics.json", out / "emitters.csv"] + ([out / "report.png"] if report else [])
    try:
        frames_bytes = Path(frames).stat().st_size if frames is not None else 0
    except OSError:  # missing: reported when the stack is opened
        frames_bytes = 0
    check_outputs(files, {"-p": param_file, "--model": resolve_model_path(model), "--frames": frames,
                          "--emitters": emitters}, EVAL_REPORT_BYTES + frames_bytes)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if args.frames is None and args.emitters is not None:
        print("decode-var-eval: error: --emitters needs --frames (without frames the test set is simulated).",
              file=sys.stderr)
        return 2
    try:
        metrics = run(args.param_file, args.model, args.out, args.frames, args.emitters, args.n, args.device,
                      args.trust_pickle, not args.no_report, args.batch_size, args.max_memory,
                      args.compile, args.sparse)
    except (DecodeVarError, OSError, KeyboardInterrupt) as err:
        return exit_status("decode-var-eval", err, kept=f"the files in {args.out} are each complete or as they were "
                                                        "(metrics.json is written last)")
    keys = ("jac", "rmse_lat", "rmse_ax", "effcy_lat", "effcy_ax", "crlb_ratio_lat", "prec", "rec")
    print("  ".join(f"{k} {metrics[k]:.4g}" for k in keys if k in metrics) or "no ground truth: no metrics")
    print(f"wrote {Path(args.out) / 'metrics.json'}, {Path(args.out) / 'emitters.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
