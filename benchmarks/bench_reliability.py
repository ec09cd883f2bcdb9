"""Reliability benchmark: kill test, signal test, param fuzz, hostile and corrupt files.

    python benchmarks/bench_reliability.py [--kills 20] [--fuzz 500] [--seed 0] [--workdir DIR]
    python benchmarks/bench_reliability.py --hostile [--workdir DIR]

Prints a Markdown table of the counts. ``run(...)`` returns them as a dict (for ``run_all.py``).
The harness lives in ``tests/reliability_harness.py``; ``tests/test_reliability.py`` and
``tests/test_param_fuzz.py`` use it with fewer cases.

- **Kill test**: a tiny training run (16x16 frames, 40 short epochs, checkpoints every ~0.1 s) is
  started as ``python -m decode_var.train`` and, once its first checkpoint exists, killed with SIGKILL
  at random instants; each kill is followed by a resume (``--resume <exp>/ckpt.pt``), which is itself
  killed, and so on: kills land in a process's start-up, in its training, and at the k-th atomic write
  seen in the experiment folder (checkpoint, model, history, param copy). After every kill the folder
  must hold a checkpoint, model, history and param copies that load (``weights_only``). The process
  after the last kill finishes the run; its ``model.pt`` and ``history.json`` must equal those of an
  uninterrupted run bit for bit. No test hook is needed in the package: writes are observed from outside.
- **Signal test**: SIGINT / SIGTERM in the middle of an epoch (seen on the progress bar); the run writes a
  checkpoint, prints the resume command and exits 130; the printed command finishes the run with the
  uninterrupted run's weights. A second signal while the checkpoint is being written stops at once.
- **Param fuzz**: Hypothesis mutates the reference param (wrong types, missing sections, out-of-range
  numbers, unknown names); the loader accepts or raises a decode-var error, never a bare Python error.
- **Hostile / corrupt files**: pickles that would run code on load are refused and nothing runs;
  truncated checkpoints, models and TIFFs get a clear error naming the file.
- **Hostile inputs through the command lines** (``--hostile`` runs only these; issue 27): the cases of
  ``tests/hostile_cli.py`` (frames lost, emitters invented, outputs that overwrite inputs, param
  mistakes, exports no reader can use, output problems, overconfident precision, devices, Ctrl-C),
  each *held* when the command gives a clear error or a correct result. Prints held / tried and a
  table of the cases; ``tests/test_hostile_cli.py`` runs the same cases as tests.
"""
from __future__ import annotations

import argparse
import json
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]
for _p in (REPO, REPO / "tests"):  # the package, and the harness the tests share
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

import hostile_cli  # noqa: E402
from reliability_harness import (KILL_RUN, SIGNAL_RUN, corrupt_check, fuzz_params, hostile_check,  # noqa: E402
                                 kill_test, reference_run, signal_test, sweep_params, write_param)


# ----------------------------------------------------------------------------------------- all
def run(kills: int = 20, fuzz: int = 500, seed: int = 0, workdir: Optional[Path] = None, signals: bool = True,
        log=print) -> dict:
    """Every check; returns the counts (and raises AssertionError when a check fails)."""
    import torch

    torch.set_num_threads(1)
    own = workdir is None
    tmp = tempfile.TemporaryDirectory(prefix="bench_reliability_") if own else None
    work = Path(tmp.name) if own else Path(workdir)
    results: dict = {}
    try:
        t0 = time.perf_counter()
        kill_param = write_param(work / "kill", KILL_RUN)
        ref = reference_run(kill_param)
        log(f"reference run: {ref['t_total']:.1f} s (start-up {ref['t_start']:.1f} s, epoch {ref['t_epoch']:.3f} s)")
        results["kill"] = kill_test(kill_param, kills, ref, seed=seed, log=log)
        log(f"kill test: {results['kill']}")
        if signals:
            sig_param = write_param(work / "signal", SIGNAL_RUN)
            sref = reference_run(sig_param)
            results["signal"] = []
            for sig, second in ((signal.SIGINT, False), (signal.SIGTERM, False), (signal.SIGINT, True)):
                r = signal_test(sig_param, sref, sig, second)
                results["signal"].append({"signal": signal.Signals(sig).name, "second": second,
                                          "stopped_at": r["stopped_at"], "identical": r["identical"],
                                          "second_in_write": r["second_in_write"],
                                          "second_landed": r["second_landed"]})
                log(f"signal test: {results['signal'][-1]}")
        results["sweep"] = sweep_params()
        log(f"param sweep: { {k: v for k, v in results['sweep'].items() if k != 'failures'} }")
        results["fuzz"] = fuzz_params(fuzz, seed)
        log(f"param fuzz: {results['fuzz']}")
        results["hostile"] = hostile_check(work / "hostile")
        results["corrupt"] = corrupt_check(work / "corrupt", ref["exp"], seed)
        results["seconds"] = time.perf_counter() - t0
    finally:
        if tmp is not None:
            tmp.cleanup()
    return results


def markdown(results: dict) -> str:
    k, f, h, c = results["kill"], results["fuzz"], results["hostile"], results["corrupt"]
    rows = [
        ("SIGKILL at random instants, folder loadable after each", f"{k['folders_checked']} / {k['kills']}"),
        ("... of which at an atomic write / during training / in start-up",
         f"{k['kills_at_write']} / {k['kills_training']} / {k['kills_startup']}"),
        ("... kills that left a half-written temporary file (ignored)", str(k["tmp_left_by_kill"])),
        ("runs finished after the kills, identical to an uninterrupted run",
         f"{k['runs_identical']} / {k['runs_finished']}"),
    ]
    for s in results.get("signal", []):
        second = " (2nd during the checkpoint write)" if s["second_in_write"] else " (2nd right after the 1st)"
        what = f"{s['signal']}" + (" twice" + second if s["second"] else " mid-epoch")
        at = s["stopped_at"]
        rows.append((f"{what}: exit 130, resumed with the printed command",
                     f"identical: {s['identical']} (checkpoint at epoch {at['epoch']} step {at['step']})"))
    w = results["sweep"]
    rows += [
        ("param sweep: every reference key x 15 hostile values + misspelt (accepted / refused)",
         f"{w['cases']} ({w['accepted']} / {w['refused'] + w['refused_by_component']})"),
        ("param fuzz: Hypothesis, 1-4 random mutations (accepted / refused)",
         f"{f['cases']} ({f['accepted']} / {f['refused'] + f['refused_by_component']})"),
        ("... bare KeyError / TypeError / AttributeError / other errors", str(f["bare_errors"] + w["bare_errors"])),
        ("hostile pickles x loaders refused, code executed",
         f"{h['refused']} / {h['loads_tried']} ({h['hostile_files']} files), code ran {h['code_ran']} times"),
        ("truncated / junk checkpoints, models, TIFFs: clear error naming the file",
         f"{c['clear_errors']} / {c['corrupt_files']}"),
    ]
    out = ["| check | result |", "|---|---|"] + [f"| {a} | {b} |" for a, b in rows]
    return "\n".join(out)


def hostile_markdown(results: dict) -> str:
    rows = ["| issue 27 item | hostile input | held | what the command did |", "|---|---|---|---|"]
    for r in results["cases"]:
        held = "skipped" if r["held"] is None else "yes" if r["held"] else "**no**"
        rows.append(f"| {r['item']} | {r['what']} | {held} | {' '.join(r['detail'].split())[-240:].replace('|', '/')} |")
    return "\n".join(rows + ["", f"held {results['held']} / tried {results['tried']} "
                                  f"({results['skipped']} skipped)"])


def run_hostile(workdir: Optional[Path], log=print) -> dict:
    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="bench_hostile_") as tmp:
        return hostile_cli.run_all(Path(workdir) if workdir else Path(tmp), log=log)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hostile", action="store_true", help="only the hostile command-line inputs (held / tried)")
    p.add_argument("--kills", type=int, default=20)
    p.add_argument("--fuzz", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default=None, help="keep the runs here (default: a temporary folder)")
    p.add_argument("--no-signals", action="store_true")
    p.add_argument("--json", default=None, help="also write the counts to this file")
    args = p.parse_args(argv)
    if args.hostile:
        t0 = time.perf_counter()
        hostile = run_hostile(Path(args.workdir) if args.workdir else None,
                              log=lambda m: print(m, file=sys.stderr, flush=True))
        print(hostile_markdown(hostile))
        print(f"\n{time.perf_counter() - t0:.0f} s; command: python benchmarks/bench_reliability.py --hostile")
        if args.json:
            Path(args.json).write_text(json.dumps(hostile, indent=1, default=str))
        return 0 if hostile["held"] == hostile["tried"] else 1
    results = run(args.kills, args.fuzz, args.seed, Path(args.workdir) if args.workdir else None,
                  not args.no_signals, log=lambda m: print(m, file=sys.stderr, flush=True))
    print(markdown(results))
    print(f"\n{results['seconds']:.0f} s; command: python benchmarks/bench_reliability.py --kills {args.kills} "
          f"--fuzz {args.fuzz} --seed {args.seed}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
