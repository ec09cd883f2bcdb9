"""The quickstart's first epoch, bit for bit: a check that a refactor changed no behaviour.

    python benchmarks/first_epoch.py --out out/first_epoch_before.json
    # ... move code around ...
    python benchmarks/first_epoch.py --out out/first_epoch_after.json --compare out/first_epoch_before.json

Runs ``python -m decode_var.train`` on the embedded quickstart param (the public entry point,
which a refactor keeps), waits until ``history.json`` holds the first epoch (train loss, test loss,
its components, the localization metrics of the seeded test set, channel and scale weights, LR),
stops the run, and writes that entry with every float as its exact hex form. ``seconds`` (wall
clock) is dropped. ``--compare`` exits 1 naming each field that differs.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "param" / "var_quickstart.yaml"


def exact(value):
    """Floats as ``float.hex`` (exact), recursively; wall-clock seconds dropped."""
    if isinstance(value, float):
        return value.hex()
    if isinstance(value, dict):
        return {k: exact(v) for k, v in value.items() if k != "seconds"}
    if isinstance(value, list):
        return [exact(v) for v in value]
    return value


def first_epoch(param_file: Path, timeout_s: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        param = tmp / "param.yaml"
        text = param_file.read_text().replace("experiment_out: out/quickstart", f"experiment_out: {tmp / 'exp'}")
        param.write_text(text)
        cmd = [sys.executable, "-m", "decode_var.train", "-p", str(param), "-n", "--no-progress", "-c", "first"]
        proc = subprocess.Popen(cmd, cwd=tmp, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        t0 = time.time()
        try:
            while time.time() - t0 < timeout_s:
                hist = list((tmp / "exp").glob("*/history.json"))
                if hist:
                    entries = json.loads(hist[0].read_text())
                    if entries:
                        return entries[0]
                if proc.poll() is not None:
                    raise SystemExit(f"training ended without a history: {proc.stderr.read()[-2000:]}")
                time.sleep(0.5)
            raise SystemExit(f"no first epoch within {timeout_s} s")
        finally:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--param", type=Path, default=QUICKSTART)
    ap.add_argument("--out", type=Path, required=True, help="JSON file for the first epoch's exact numbers")
    ap.add_argument("--compare", type=Path, default=None, help="a JSON file written earlier by this script")
    ap.add_argument("--timeout", type=float, default=1800.0)
    args = ap.parse_args(argv)
    entry = exact(first_epoch(args.param, args.timeout))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(entry, indent=1, sort_keys=True))
    print(f"first epoch: train loss {float.fromhex(entry['train_loss']):.6f}, "
          f"jac {float.fromhex(entry['metrics']['jac']):.4f} -> {args.out}")
    if args.compare is None:
        return 0
    before = json.loads(args.compare.read_text())
    diff = sorted(k for k in set(before) | set(entry) if before.get(k) != entry.get(k))
    if diff:
        print(f"differs from {args.compare}: {', '.join(diff)}")
        return 1
    print(f"identical, bit for bit, to {args.compare}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
