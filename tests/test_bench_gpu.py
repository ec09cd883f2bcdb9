"""benchmarks/bench_gpu.py is ready for a GPU session: it imports, --help works, and without CUDA it says so.

The stages themselves are checked on the CPU by ``python benchmarks/bench_gpu.py --smoke`` (a few minutes,
not part of the suite).
"""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"


def test_help_lists_the_time_limit_and_the_stages():
    proc = subprocess.run([sys.executable, str(BENCH / "bench_gpu.py"), "--help"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "--time-limit" in proc.stdout and "throughput" in proc.stdout and "jaccard" in proc.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_without_cuda_it_exits_with_a_message():
    proc = subprocess.run([sys.executable, str(BENCH / "bench_gpu.py"), "--time-limit", "10"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2
    assert "no CUDA device here" in proc.stderr


def test_bench_fit_skips_sigmamunet_without_decode(monkeypatch, capsys, tmp_path):
    sys.path.insert(0, str(BENCH))
    try:
        import bench_fit
    finally:
        sys.path.remove(str(BENCH))
    import decode_var.backend as backend

    monkeypatch.setattr(backend, "decode_status", lambda: (False, "no package named 'decode' is importable"))
    assert bench_fit.decode_infer_speed(tmp_path / "stack.tif", "cpu", 1, "auto") is None
    assert "SigmaMUNet (DECODE Infer) columns are skipped" in capsys.readouterr().err
