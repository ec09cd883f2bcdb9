"""Distributed training (torchrun + DDP, gloo on the CPU): equivalence with one process, identical
channel weights on every rank, resume, and no hang when a rank dies or stops answering.

Every run binds to 127.0.0.1 only, on a port free at the time.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from decode_var.training import distributed
from decode_var.training.checkpoint import load_checkpoint, load_model_weights
from decode_var.training.distributed import DistContext
from decode_var.training.trainer import Trainer
from decode_var.config.param import load_param
from decode_var.registry import build_model

REPO = Path(__file__).resolve().parents[1]
STEPS_PER_EPOCH = 3
TINY = {
    "HyperParameter": {"epochs": 2, "pseudo_ds_size": 16 * STEPS_PER_EPOCH, "batch_size": 8},
    "Hardware": {"torch_threads": 1},
    "TestSet": {"test_size": 8},
    "Simulation": {"img_size": [16, 16], "psf_extent": [[-0.5, 15.5], [-0.5, 15.5], None],
                   "emitter_extent": [[-0.5, 15.5], [-0.5, 15.5], [-750, 750]], "emitter_av": 2.0},
    "VAR": {"backend": "builtin", "scales": [0.25, 0.5, 1.0],
            "model": {"features": 8, "token_dim": 16, "depth": 1, "heads": 2},
            # coins per sample come from per-rank streams; with probability 1 they do not matter
            "teacher_forcing": {"start": 1.0, "end": 1.0, "epochs": 0},
            # the rule runs after every epoch from the 2nd on: the weights move in a 2-epoch run
            "loss": {"adaptive_interval": 1, "adaptive_window": 1},
            "train": {"plot": False}},
}

# runs train() on one rank and leaves what the test compares: the loss state and the epoch
WORKER = """
import json, os, sys
from decode_var.train import train
t = train(sys.argv[1], progress=False, log_comment="ddp", overrides=json.loads(sys.argv[3]) or None)
Path = __import__("pathlib").Path
Path(sys.argv[2], f"rank{os.environ['RANK']}.json").write_text(json.dumps(
    {"loss": t.loss.state_dict(), "epoch": t.epoch, "exp": str(t.exp_dir), "history": t.history}, default=float))
"""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _param(folder: Path, batch_size: int, **sections) -> Path:
    data = json.loads(json.dumps(TINY))
    data["HyperParameter"]["batch_size"] = batch_size
    for section, values in sections.items():
        data.setdefault(section, {}).update(values)
    data["InOut"] = {"experiment_out": str(folder / "out")}
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "param.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""), MASTER_ADDR="127.0.0.1",
               OMP_NUM_THREADS="1", **extra)
    return env


def _torchrun(args, nproc=2, timeout=90) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
           f"--master_port={_free_port()}", *args]
    return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout, cwd=REPO)


def _run_ranks(tmp_path: Path, param: Path, overrides=None):
    """torchrun with 2 ranks x WORKER; returns the two ranks' reports."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    out = tmp_path / "reports"
    out.mkdir(exist_ok=True)
    res = _torchrun([str(script), str(param), str(out), json.dumps(overrides or {})])
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


def _max_diff(a: dict, b: dict) -> float:
    keys = [k for k in a if isinstance(a[k], torch.Tensor)]
    assert keys == [k for k in b if isinstance(b[k], torch.Tensor)]
    return max((a[k].double() - b[k].double()).abs().max().item() for k in keys if a[k].is_floating_point())


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One process, batch 16, on the samples of the distributed path (per-sample seeds)."""
    folder = tmp_path_factory.mktemp("ref")
    param = load_param(_param(folder, 16))
    torch.manual_seed(param.VAR.seed)  # as the Trainer seeds its model
    initial = {k: v.clone() for k, v in build_model(param).state_dict().items() if isinstance(v, torch.Tensor)}
    trainer = Trainer(param, folder / "exp", dist=DistContext(), progress=False)
    trainer.fit()
    return {"model": torch.load(folder / "exp" / "model.pt", weights_only=True), "initial": initial,
            "loss": trainer.loss.state_dict(), "history": trainer.history}


def test_two_ranks_of_8_give_the_weights_of_one_process_of_16(tmp_path, reference):
    ranks = _run_ranks(tmp_path, _param(tmp_path, 8))
    exp = Path(ranks[0]["exp"])
    ddp = torch.load(exp / "model.pt", weights_only=True)
    assert _max_diff(reference["initial"], reference["model"]) > 1e-3  # training moved the weights
    assert _max_diff(ddp, reference["model"]) < 1e-5
    # an epoch sees pseudo_ds_size samples: half the steps of the single process
    assert [h["train_loss"] for h in ranks[0]["history"]] == pytest.approx(
        [h["train_loss"] for h in reference["history"]], rel=1e-5)
    # adaptive channel weights: the rule changed them, identically on both ranks and as in one process
    chw = [r["loss"]["adaptive"]["weights"] for r in ranks]
    assert ranks[0]["loss"]["adaptive"]["n_updates"] >= 1
    assert chw[0] != ranks[0]["loss"]["adaptive"]["initial"]
    assert chw[0] == chw[1]
    assert ranks[0]["loss"]["adaptive"]["history"] == ranks[1]["loss"]["adaptive"]["history"]
    assert chw[0] == pytest.approx(reference["loss"]["adaptive"]["weights"], rel=1e-9)
    # rank 0 alone wrote the experiment: a single folder, loadable by the single-process path
    assert len(list((tmp_path / "out").iterdir())) == 1
    load_model_weights(build_model(load_param(exp / "param_run.yaml")), exp / "model.pt")


def test_ranks_resume_from_the_same_checkpoint(tmp_path, reference):
    # warm-up covers epochs 0 and 1, so stopping after 1 of 2 epochs leaves the LR schedule unchanged
    param = _param(tmp_path, 8)
    first = _run_ranks(tmp_path / "a", param, {"HyperParameter": {"epochs": 1}})
    exp = Path(first[0]["exp"])
    resumed = _run_ranks(tmp_path / "b", param, {"InOut": {"checkpoint_init": str(exp / "ckpt.pt")}})
    assert [r["epoch"] for r in resumed] == [2, 2] and Path(resumed[0]["exp"]) == exp
    assert resumed[0]["loss"] == resumed[1]["loss"]
    assert _max_diff(torch.load(exp / "model.pt", weights_only=True), reference["model"]) < 1e-5


def test_a_bad_checkpoint_stops_every_rank_with_rank_0s_error(tmp_path):
    bad = tmp_path / "ckpt.pt"
    bad.write_bytes(b"")
    t0 = time.monotonic()
    res = _torchrun(["-m", "decode_var.train", "-p", str(_param(tmp_path, 8)), "--resume", str(bad),
                     "--no-progress"], timeout=60)
    assert res.returncode != 0 and time.monotonic() - t0 < 60
    assert (res.stdout + res.stderr).count("is empty (0 bytes)") >= 2  # both ranks name the cause


@pytest.mark.parametrize("victim", [1, 0])
def test_killing_one_rank_stops_the_other_with_a_clear_error(tmp_path, victim):
    """Ranks started without torchrun's agent (which would kill the survivors itself), as on another machine."""
    param = _param(tmp_path, 8, HyperParameter={"epochs": 1000}, VAR={**TINY["VAR"], "train": {
        "plot": False, "eval_every": 1000}})
    port = str(_free_port())
    procs = [subprocess.Popen([sys.executable, "-m", "decode_var.train", "-p", str(param), "--no-progress",
                               "-c", "kill"], env=_env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2",
                                                       MASTER_PORT=port),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
             for r in (0, 1)]
    try:
        deadline = time.monotonic() + 60
        while not list((tmp_path / "out").glob("*/ckpt.pt")):
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), \
                [p.communicate()[1][-2000:] for p in procs if p.poll() is not None]
            time.sleep(0.2)
        procs[victim].send_signal(signal.SIGKILL)
        survivor = procs[1 - victim]
        t0 = time.monotonic()
        _, err = survivor.communicate(timeout=60)
        assert time.monotonic() - t0 < 45
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    assert survivor.returncode not in (0, None)
    assert "lost contact with the other ranks" in err, err[-3000:]
    exp = next((tmp_path / "out").iterdir())
    state = load_checkpoint(exp / "ckpt.pt")
    assert state["epoch"] >= 1
    load_model_weights(build_model(load_param(exp / "param_run.yaml")), exp / "model.pt")


HUNG = """
import sys, time
from decode_var.training import distributed
ctx, _ = distributed.init_from_env("cpu", timeout_s=3)
if ctx.rank == 1:
    time.sleep(40)  # alive, but never joins the collective
    sys.exit(0)
t0 = time.monotonic()
try:
    ctx.all_reduce([1.0])
except Exception as err:
    print("COMM", distributed.is_comm_error(err), round(time.monotonic() - t0, 1), flush=True)
    print(ctx.lost_contact(err), flush=True)
    import os
    os._exit(1)
"""


def test_a_hung_rank_makes_the_others_fail_after_the_timeout(tmp_path):
    port = str(_free_port())
    procs = [subprocess.Popen([sys.executable, "-c", HUNG], env=_env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2",
                                                                      MASTER_PORT=port),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
             for r in (0, 1)]
    try:
        out, err = procs[0].communicate(timeout=40)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    line = next((ln for ln in out.splitlines() if ln.startswith("COMM")), None)
    assert line is not None, out + err[-2000:]
    _, is_comm, seconds = line.split()
    assert is_comm == "True" and 2.0 <= float(seconds) < 20
    assert "VAR.train.ddp_timeout = 3 s" in out


# ---------------------------------------------------------------------- unit level
def test_not_launched_by_torchrun_is_the_single_process_path(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert not distributed.launched_distributed()
    monkeypatch.setenv("WORLD_SIZE", "1")  # torchrun --nproc_per_node=1
    assert not distributed.launched_distributed()
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert distributed.launched_distributed()


def test_backend_is_gloo_without_gpus():
    assert distributed.choose_backend("cpu") == "gloo"
    expected = "nccl" if torch.cuda.is_available() and torch.distributed.is_nccl_available() else "gloo"
    assert distributed.choose_backend("cuda") == expected


def test_ranks_simulate_disjoint_slices_of_the_global_batch():
    assert list(distributed.sample_indices(0, 8)) == list(range(8))
    assert list(distributed.sample_indices(1, 8)) == list(range(8, 16))


def test_without_a_process_group_collectives_are_the_identity():
    ctx = DistContext()
    assert ctx.all_reduce([1.5, 2.0]) == [1.5, 2.0] and ctx.any(True, False) == [True, False]
    assert ctx.broadcast({"a": 1}) == {"a": 1}
    with pytest.raises(ValueError):
        ctx.run_on_main(lambda: int("x"))
