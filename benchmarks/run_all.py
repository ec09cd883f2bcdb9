"""Run every benchmark and write its table into the docs, so the tables are regenerated, not hand-edited.

    python benchmarks/run_all.py [--quick] [--only data model stability quality quality_density reliability ddp gpu]
    python benchmarks/run_all.py --check     # every table's markers are in place; runs nothing

``gpu`` needs a CUDA device and runs only when named.

Each table sits between ``<!-- BEGIN bench:NAME -->`` and ``<!-- END bench:NAME -->`` in the file that
``TARGETS`` names (docs/benchmarks.md, or docs/training.md for reliability and DDP), with the exact
command that produced it; the text around the markers is left alone. ``--quick`` uses short settings
(smoke run, a few minutes in all); the docs' figures come from the default settings unless the table's
command says otherwise.
"""
from __future__ import annotations

import argparse
import datetime
import re
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

BENCHES = {
    "data": (["benchmarks/bench_data.py"], ["--repeats", "2"]),
    "model": (["benchmarks/bench_model.py", "--sizes", "40", "128"], ["--sizes", "40", "--repeats", "2"]),
    "stability": (["benchmarks/bench_stability.py"], ["--steps", "200"]),
    "quality": (["benchmarks/bench_quality.py", "--minutes", "10", "--evals", "4", "--densities", "6",
                 "--models", "VARMultiScale 1x", "SigmaMUNet (DECODE)", "single scale 1x",
                 "independent heads 2x", "ablation 1x: no progressive schedule",
                 "ablation 1x: static channel weights", "ablation 1x: teacher forcing off",
                 "--out", "benchmarks/results/quality"],
                ["--minutes", "0.5", "--evals", "1", "--densities", "6", "--models", "VARMultiScale 1x",
                 "--out", "out/bench_quick/quality"]),
    # the density / grid tables of docs/next_scale.md: equal samples seen, two seeds
    "quality_density": (["benchmarks/bench_quality.py", "--samples", "20480", "--evals", "4",
                         "--densities", "2", "6", "15", "30", "--seeds", "0", "1",
                         "--out", "benchmarks/results/quality_density"],
                        ["--samples", "256", "--evals", "1", "--densities", "2", "30", "--test-size", "64",
                         "--models", "VARMultiScale 2x", "single scale 1x",
                         "--out", "out/bench_quick/quality_density"]),
    "reliability": (["benchmarks/bench_reliability.py"], ["--kills", "3", "--fuzz", "50"]),
    "ddp": (["benchmarks/bench_ddp.py"], []),
    "gpu": (["benchmarks/bench_gpu.py", "--epochs", "6"], ["--epochs", "1"]),  # needs CUDA: only with --only gpu
}
DEFAULT = [name for name in BENCHES if name != "gpu"]

# where each table lives, relative to the repository root
TARGETS = {
    "data": "docs/benchmarks.md",
    "model": "docs/benchmarks.md",
    "stability": "docs/benchmarks.md",
    "gpu": "docs/benchmarks.md",
    "quality": "docs/benchmarks.md",
    "quality_density": "docs/benchmarks.md",
    "reliability": "docs/training.md",
    "ddp": "docs/training.md",
}


def table_of(stdout: str) -> str:
    lines = stdout.splitlines()
    rows = [i for i, line in enumerate(lines) if line.startswith("|")]
    if not rows:
        raise RuntimeError("the benchmark printed no Markdown table:\n" + stdout[-2000:])
    return "\n".join(lines[rows[0]:rows[-1] + 1])


def replace_block(text: str, name: str, body: str) -> str:
    begin, end = f"<!-- BEGIN bench:{name} -->", f"<!-- END bench:{name} -->"
    pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.S)
    block = f"{begin}\n{body}\n{end}"
    found = len(pattern.findall(text))
    if found != 1:
        raise RuntimeError(f"expected one {begin} ... {end} block, found {found}")
    return pattern.sub(lambda _: block, text)


def check_targets(names, root: Path = ROOT) -> list[str]:
    """Problems with the marker blocks of ``names`` (an empty list when every block is in place)."""
    problems = []
    for name in names:
        path = root / TARGETS[name]
        try:
            replace_block(path.read_text(), name, "")
        except (OSError, RuntimeError) as err:
            problems.append(f"{TARGETS[name]}: {err}")
    return problems


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="short smoke settings")
    ap.add_argument("--only", nargs="+", choices=list(BENCHES), default=DEFAULT)
    ap.add_argument("--root", type=Path, default=ROOT,
                    help="folder that holds the docs named in TARGETS (default: the repository)")
    ap.add_argument("--check", action="store_true",
                    help="only check that the marker blocks of the chosen tables exist; run nothing")
    args = ap.parse_args(argv)
    problems = check_targets(args.only, args.root)  # before hours of benchmarks, not after
    for problem in problems:
        print(f"[run_all] {problem}", file=sys.stderr)
    if problems or args.check:
        if not problems:
            print("[run_all] marker blocks in place: " + ", ".join(f"{n} -> {TARGETS[n]}" for n in args.only))
        return 1 if problems else 0
    for name in args.only:
        cmd, quick = BENCHES[name]
        cmd = cmd[:1] + (quick if args.quick else cmd[1:])
        shown = "python " + shlex.join(cmd)
        print(f"[run_all] {shown}", flush=True)
        proc = subprocess.Popen([sys.executable, *cmd], cwd=ROOT, stdout=subprocess.PIPE, text=True)
        lines = []
        for line in proc.stdout:  # echoed as it comes: the long benchmarks report progress
            print(line, end="", flush=True)
            lines.append(line)
        if proc.wait() != 0:
            print(f"[run_all] {name} failed (exit {proc.returncode}); {TARGETS[name]} left as it was",
                  file=sys.stderr)
            return proc.returncode
        stamp = datetime.date.today().isoformat()
        body = f"`{shown}` ({stamp}, this machine's 2 CPU cores)\n\n{table_of(''.join(lines))}"
        path = args.root / TARGETS[name]
        path.write_text(replace_block(path.read_text(), name, body))
        print(f"[run_all] {name}: table written to {TARGETS[name]}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
