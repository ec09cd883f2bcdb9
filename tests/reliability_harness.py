"""Reliability harness: tiny training runs killed and signalled from outside, param fuzz, hostile and
corrupt files.

Shared by ``tests/test_reliability.py``, ``tests/test_param_fuzz.py`` (few cases) and
``benchmarks/bench_reliability.py`` (more cases, a table of counts); that benchmark's docstring
describes each check. Training runs are real ``python -m decode_var.train`` processes with this
repository first on ``PYTHONPATH``.
"""
from __future__ import annotations

import copy
import json
import os
import pickle
import random
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Optional

import yaml

REPO = Path(__file__).resolve().parents[1]

# ----------------------------------------------------------------------------------------- tiny runs
#: Tiny training runs (16x16 frames, features 8): seconds on a laptop CPU, bit-reproducible.
TINY_BASE = {
    "HyperParameter": {"epochs": 40, "pseudo_ds_size": 32, "batch_size": 8},
    "TestSet": {"test_size": 8},
    "Hardware": {"torch_threads": 1},
    "Simulation": {"img_size": [16, 16], "psf_extent": [[-0.5, 15.5], [-0.5, 15.5], None],
                   "emitter_extent": [[-0.5, 15.5], [-0.5, 15.5], [-750, 750]], "emitter_av": 2.0},
    "VAR": {"backend": "builtin", "scales": [0.25, 0.5, 1.0],
            "model": {"features": 8, "token_dim": 16, "depth": 1, "heads": 2},
            "teacher_forcing": {"start": 1.0, "end": 0.0, "epochs": 2},
            "loss": {"adaptive_interval": 2, "adaptive_window": 1, "warmup_epochs": 2},
            "train": {"plot": False}},
}
#: Kill test: many short epochs, so that checkpoints are written every ~0.1 s.
KILL_RUN = {"HyperParameter": {"epochs": 40, "pseudo_ds_size": 32, "batch_size": 8}}
#: Signal test: fewer, longer epochs (64 steps), so that a signal lands inside an epoch.
SIGNAL_RUN = {"HyperParameter": {"epochs": 3, "pseudo_ds_size": 512, "batch_size": 8}}


def write_param(folder: Path, run: dict, name: str = "param.yaml") -> Path:
    data = copy.deepcopy(TINY_BASE)
    for section, values in run.items():
        data.setdefault(section, {}).update(values)
    data["InOut"] = {"experiment_out": str(folder / "out")}
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(yaml.safe_dump(data))
    return path


def untrained_model(folder: Path) -> Path:
    """``folder`` with an untrained tiny model (seed 0) and its ``param_run.yaml``: enough for the input
    and output guards of the fitting tools, which do not depend on the weights."""
    import torch

    from decode_var.config.param import load_param, save_param
    from decode_var.registry import build_model
    from decode_var.training.checkpoint import save_model

    param = load_param(write_param(folder, KILL_RUN))
    torch.manual_seed(0)
    save_model(folder / "model.pt", build_model(param))
    save_param(folder / "param_run.yaml", param)
    return folder


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def train_cmd(param: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "decode_var.train", "-p", str(param), "-n", *extra]


def _experiments(param: Path) -> list[Path]:
    out = param.parent / "out"
    return sorted(p for p in out.iterdir() if p.is_dir()) if out.exists() else []


def _tmp_files(exp: Path) -> set[str]:
    try:
        return {e.name for e in os.scandir(exp) if e.name.startswith(".") and ".tmp" in e.name}
    except FileNotFoundError:
        return set()


def _weights(exp: Path) -> dict:
    import torch

    return torch.load(exp / "model.pt", map_location="cpu", weights_only=True)


def same_weights(a: dict, b: dict) -> bool:
    import torch

    return a.keys() == b.keys() and all(
        torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k] for k in a)


def _history(exp: Path) -> list:
    """history.json without the wall-clock seconds (the only entry that may differ between runs)."""
    hist = json.loads((exp / "history.json").read_text())
    return [{k: v for k, v in h.items() if k != "seconds"} for h in hist]


def same_history(a: list, b: list) -> bool:
    # NaN metrics (no emitters matched in a tiny run) compare equal via their JSON text
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def reference_run(param: Path, timeout: float = 600) -> dict:
    """An uninterrupted run: its folder, final weights and history, and its timing."""
    t0 = time.perf_counter()
    log_file = param.parent / "reference.log"
    with open(log_file, "w") as log:  # a file, not a pipe: a chatty child never blocks on a full pipe
        proc = subprocess.Popen(train_cmd(param, "-c", "reference", "--no-progress"), env=_env(),
                                stdout=subprocess.DEVNULL, stderr=log)
    t_first = None
    while proc.poll() is None:
        if t_first is None and any((e / "ckpt.pt").exists() for e in _experiments(param)):
            t_first = time.perf_counter() - t0
        time.sleep(0.002)
        if time.perf_counter() - t0 > timeout:
            proc.kill()
            raise RuntimeError("reference run timed out")
    if proc.returncode != 0:
        raise RuntimeError(f"reference run failed ({proc.returncode}):\n{log_file.read_text()[-3000:]}")
    exp = [e for e in _experiments(param) if e.name.endswith("_reference")][0]
    total = time.perf_counter() - t0
    epochs = yaml.safe_load(param.read_text())["HyperParameter"]["epochs"]
    t_first = t_first if t_first is not None else total
    return {"exp": exp, "weights": _weights(exp), "history": _history(exp), "t_start": t_first,
            "t_epoch": max((total - t_first) / max(epochs - 1, 1), 1e-3), "t_total": total}


# ----------------------------------------------------------------------------------------- kill test
def check_folder(exp: Path) -> dict:
    """Everything a kill may have interrupted must load; returns the checkpoint's progress.

    Raises AssertionError naming what is broken.
    """
    from decode_var.training.checkpoint import model_state, safe_load
    from decode_var.config.param import load_param

    state = safe_load(exp / "ckpt.pt", what="checkpoint")  # weights_only: never runs code
    assert isinstance(state, dict) and {"model", "optimizer", "lr_scheduler", "epoch"} <= set(state), \
        f"{exp / 'ckpt.pt'} lacks entries"
    if (exp / "model.pt").exists():
        model_state(exp / "model.pt")
    for name in ("param_run.yaml", "param_resume.yaml", "param_run_in.yaml", "param_resume_in.yaml"):
        if (exp / name).exists():
            yaml.safe_load((exp / name).read_text())
    load_param(exp / "param_run.yaml")
    if (exp / "history.json").exists():
        json.loads((exp / "history.json").read_text())
    partial = state.get("partial_epoch")
    return {"epoch": int(state["epoch"]), "step": partial["step"] if partial else 0}


def resume_cmd(exp: Path) -> list[str]:
    return train_cmd(exp / "param_run.yaml", "--resume", str(exp / "ckpt.pt"), "--no-progress")


def kill_test(param: Path, n_kills: int, ref: dict, seed: int = 0, timeout: float = 900,
              log=None) -> dict:
    """Kill a training run ``n_kills`` times with SIGKILL; check the folder after each; finish the run.

    Kill instants (drawn with ``random.Random(seed)``): 20 % during a process's start-up, 40 % at a random
    time within three epochs of its training, 40 % at the k-th (1..8) atomic write it makes (param copies,
    then per epoch ckpt.pt, model.pt, history.json): observed as the write's temporary file appearing.
    """
    rng = random.Random(seed)
    t_begin = time.perf_counter()
    stats = {"kills": 0, "kills_startup": 0, "kills_training": 0, "kills_at_write": 0, "tmp_left_by_kill": 0,
             "folders_checked": 0, "processes": 0, "runs_finished": 0, "runs_identical": 0}
    exp: Optional[Path] = None
    cmd = train_cmd(param, "-c", "kill", "--no-progress")

    log_file = param.parent / "kill.log"

    def launch(c):
        stats["processes"] += 1
        with open(log_file, "w") as log:
            return subprocess.Popen(c, env=_env(), stdout=subprocess.DEVNULL, stderr=log)

    def failed(what):
        return AssertionError(f"{what} ({proc.returncode}):\n{log_file.read_text()[-3000:]}")

    while True:
        if time.perf_counter() - t_begin > timeout:
            raise RuntimeError(f"kill test timed out after {stats}")
        known = set(_experiments(param))
        proc = launch(cmd)
        t_launch = time.time()
        if stats["kills"] >= n_kills:  # the last process: let it finish
            proc.wait(timeout=timeout)
            if proc.returncode != 0:
                raise failed("the final resume failed")
            exp = exp or [e for e in _experiments(param) if e not in known][0]
            _finish(exp, ref, stats)
            break
        if exp is None:  # a fresh run: wait for its first checkpoint, from then on it can be killed
            while proc.poll() is None and not any((e / "ckpt.pt").exists() for e in _experiments(param)
                                                  if e not in known):
                time.sleep(0.001)
            if proc.poll() is not None and proc.returncode != 0:
                raise failed("the training run failed")
            exp = [e for e in _experiments(param) if e not in known][0]
        before = _tmp_files(exp)
        mode = rng.choices(["startup", "training", "write"], weights=[0.2, 0.4, 0.4])[0]
        if exp is not None and stats["processes"] == 1 and mode == "startup":
            mode = "training"  # the first process is past its start-up already
        if mode == "startup":
            _wait(proc, rng.uniform(0.0, ref["t_start"]))
        elif mode == "training":
            # training starts once the process has written its param copy (fresh runs: already running)
            marker = exp / "param_resume.yaml"
            while (proc.poll() is None and stats["processes"] > 1
                   and not (marker.exists() and marker.stat().st_mtime >= t_launch - 0.01)):
                time.sleep(0.001)
            _wait(proc, rng.uniform(0.0, 3 * ref["t_epoch"]))
        else:
            k, seen = rng.randint(1, 8), set()
            deadline = time.perf_counter() + ref["t_start"] + 6 * ref["t_epoch"] + 5
            while proc.poll() is None and time.perf_counter() < deadline:
                seen |= _tmp_files(exp) - before
                if len(seen) >= k:
                    break
                time.sleep(0.0003)
        if proc.poll() is not None:  # finished (or failed) before the kill
            if proc.returncode != 0:
                raise failed("a resumed run failed")
            _finish(exp, ref, stats)
            # the run is complete before all kills were made: the next chain starts a fresh run (the
            # experiment name has one-second resolution: wait for a new name)
            exp, cmd = None, train_cmd(param, "-c", "kill", "--no-progress")
            time.sleep(1.0)
            continue
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        stats["kills"] += 1
        stats["kills_" + {"startup": "startup", "training": "training", "write": "at_write"}[mode]] += 1
        left = _tmp_files(exp) - before
        stats["tmp_left_by_kill"] += bool(left)
        progress = check_folder(exp)
        stats["folders_checked"] += 1
        if log:
            log(f"kill {stats['kills']:2d} ({mode:8s}): checkpoint at epoch {progress['epoch']} step "
                f"{progress['step']}" + (f", left {sorted(left)}" if left else ""))
        cmd = resume_cmd(exp)
    stats["seconds"] = time.perf_counter() - t_begin
    return stats


def _wait(proc, seconds: float) -> None:
    end = time.perf_counter() + seconds
    while proc.poll() is None and time.perf_counter() < end:
        time.sleep(0.001)


def _finish(exp: Path, ref: dict, stats: dict) -> None:
    check_folder(exp)
    stats["runs_finished"] += 1
    if not same_weights(_weights(exp), ref["weights"]):
        raise AssertionError(f"{exp}: final weights differ from the uninterrupted run")
    if not same_history(_history(exp), ref["history"]):
        raise AssertionError(f"{exp}: history differs from the uninterrupted run")
    stats["runs_identical"] += 1


# ----------------------------------------------------------------------------------------- signal test
_BAR = re.compile(r"epoch (\d+):\s+\d+%\|[^|]*\|\s*(\d+)/(\d+)")


def signal_test(param: Path, ref: dict, sig: int = signal.SIGINT, second: bool = False, epoch: int = 1,
                at_step: int = 20, timeout: float = 600) -> dict:
    """Send ``sig`` when the progress bar shows epoch ``epoch`` past ``at_step``; check and resume.

    ``second``: send it again as soon as the mid-epoch checkpoint's temporary file appears (a second
    signal during the checkpoint write), or right away if the write is not seen.
    """
    t0 = time.perf_counter()
    existing = set(_experiments(param))
    proc = subprocess.Popen(train_cmd(param, "-c", f"sig{int(sig)}{'x2' if second else ''}"), env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    chunks: list[str] = []
    fired = threading.Event()

    def reader():
        buf = ""
        while True:
            b = proc.stderr.read1(4096) if hasattr(proc.stderr, "read1") else proc.stderr.read(1)
            if not b:
                return
            text = b.decode(errors="replace")
            chunks.append(text)
            buf = (buf + text)[-400:]
            if not fired.is_set():
                for m in _BAR.finditer(buf):
                    e, n, total = map(int, m.groups())
                    if e == epoch and at_step <= n < total - 4:
                        fired.set()
                        break

    th = threading.Thread(target=reader, daemon=True)
    th.start()
    while not fired.is_set() and proc.poll() is None:
        time.sleep(0.001)
    if proc.poll() is not None:
        th.join(5)
        raise AssertionError("the run ended before the signal could be sent:\n" + "".join(chunks)[-2000:])
    exp = [e for e in _experiments(param) if e not in existing][0]
    before = _tmp_files(exp)
    proc.send_signal(sig)
    second_in_write = False
    if second:
        end = time.perf_counter() + 10
        while proc.poll() is None and time.perf_counter() < end:
            if any(n.startswith(".ckpt.") for n in _tmp_files(exp) - before):
                second_in_write = True
                break
            time.sleep(0.0002)
        if proc.poll() is None:
            proc.send_signal(sig)
    proc.wait(timeout)
    th.join(10)
    err = "".join(chunks)
    # a second signal can miss: the run may finish its checkpoint and exit before it is sent
    second_landed = second and f"second {signal.Signals(sig).name}: stopped at once" in err
    result = {"rc": proc.returncode, "stderr": err, "exp": exp, "second_in_write": second_in_write,
              "second_landed": second_landed}
    assert proc.returncode == 130, f"exit status {proc.returncode}, expected 130:\n{err[-2000:]}"
    assert not _tmp_files(exp) - before, "a temporary file was left behind"
    state = check_folder(exp)
    result["stopped_at"] = state
    m = re.search(r"Resume with:\n\s+(.+)\n", err)
    assert m, f"no resume command printed:\n{err[-2000:]}"
    result["resume_command"] = m.group(1)
    done = subprocess.run(shlex.split(m.group(1)), env=_env(), capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"the printed resume command failed:\n{done.stderr[-3000:]}"
    result["identical"] = same_weights(_weights(exp), ref["weights"]) and same_history(_history(exp),
                                                                                        ref["history"])
    result["seconds"] = time.perf_counter() - t0
    return result


# ----------------------------------------------------------------------------------------- param fuzz
def reference_paths(ref: dict, prefix: tuple = ()) -> list[tuple]:
    """Every section and key of the reference, as paths."""
    out = []
    for k, v in ref.items():
        out.append(prefix + (k,))
        if isinstance(v, dict):
            out += reference_paths(v, prefix + (k,))
    return out


def param_mutations():
    """Hypothesis strategy: (description, mutated param dict) from the reference param."""
    from hypothesis import strategies as st

    from decode_var.config.param import load_reference

    ref = load_reference()
    paths = reference_paths(ref)
    sections = [()] + [p for p in paths if isinstance(_get(ref, p), dict)]
    scalar = st.one_of(
        st.none(), st.booleans(), st.integers(-10**12, 10**12), st.sampled_from([0, -1, 1, 2, 3, 10**9]),
        st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.0, -0.5, 0.5, 1e-300, 1e300]),
        st.text(max_size=8), st.sampled_from(["", "auto", "Adam", "cosine", "px", "gaussian", "1.0", "null"]))
    value = st.recursive(scalar, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                         st.dictionaries(st.text(max_size=6), inner, max_size=3)),
                         max_leaves=8)

    def near(v):
        """Values close to the reference's: the same kind, out of range, or a list of the wrong length."""
        if isinstance(v, bool):
            return st.sampled_from([not v, 0, 1, "yes"])
        if isinstance(v, (int, float)):
            return st.sampled_from([-v, 0 * v, v * 1e9, v + 0.5, -1, float("nan"), float("inf"), str(v)])
        if isinstance(v, list):
            return st.one_of(st.just(v[:-1]), st.just(v + v[-1:]), st.just(list(reversed(v))),
                             st.lists(st.one_of(scalar, st.just(v[0])), min_size=len(v), max_size=len(v)))
        if isinstance(v, str):
            return st.sampled_from([v.upper(), v[:-1], v + "x", ""])
        return value

    def typo(name: str):
        return st.sampled_from([name[:-1], name + "s", name.upper(), name[1:] + name[0], "_" + name])

    @st.composite
    def mutation(draw):
        kind = draw(st.sampled_from(["delete", "replace", "near", "unknown", "typo", "section"]))
        if kind in ("delete", "replace", "near", "typo"):
            path = draw(st.sampled_from(paths))
            if kind == "delete":
                return ("delete", path, None)
            if kind == "typo":
                return ("rename", path, draw(typo(path[-1])))
            v = draw(near(_get(ref, path))) if kind == "near" else draw(value)
            return ("set", path, v)
        if kind == "unknown":
            sec = draw(st.sampled_from(sections))
            name = draw(st.one_of(st.text(min_size=1, max_size=10), st.sampled_from(["foo", "VAR", "seed", "1"])))
            return ("set", sec + (name,), draw(value))
        sec = draw(st.sampled_from(sections[1:]))
        return ("set", sec, draw(st.one_of(scalar, st.lists(scalar, max_size=3))))

    @st.composite
    def mutated(draw):
        data = copy.deepcopy(ref)
        ops = draw(st.lists(mutation(), min_size=1, max_size=4))
        for op in ops:
            _apply(data, op)
        return ops, data

    return mutated()


def _get(d, path):
    for k in path:
        d = d[k]
    return d


def _apply(data: dict, op) -> None:
    kind, path, value = op
    d = data
    for k in path[:-1]:
        if not isinstance(d, dict) or not isinstance(d.get(k), dict):
            return  # an earlier mutation removed or replaced the section
        d = d[k]
    if not isinstance(d, dict) or not path:
        return
    key = path[-1]
    if kind == "delete":
        d.pop(key, None)
    elif kind == "rename":
        if key in d:
            d[value] = d.pop(key)
    else:
        d[key] = value


def _dump(data) -> str:
    # libyaml when present: the same YAML as yaml.safe_dump / safe_load, 20x faster for thousands of cases
    return yaml.dump(data, Dumper=getattr(yaml, "CSafeDumper", yaml.SafeDumper), sort_keys=False)


def _load(text: str):
    return yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


def build_components(param) -> None:
    """Parse every component training builds from an accepted param (the model only when small)."""
    from decode_var.backend import get_backend
    from decode_var.registry import build_loss, build_model
    from decode_var.core.scales import ScaleSchedule
    from decode_var.data.simulation import Camera, FrameScale
    from decode_var.data.targets import MultiScaleTargets, TargetRescale
    from decode_var.evaluation.postprocessing import PostSettings

    backend = get_backend("builtin" if param.VAR.backend == "auto" else param.VAR.backend)
    schedule = ScaleSchedule.parse(param)
    build_loss(param)
    FrameScale.parse(param)
    Camera.parse(param)
    TargetRescale.parse(param)
    MultiScaleTargets.parse(param, backend)
    backend.simulator(param)
    backend.post_processing(PostSettings.parse(param), schedule.finest)
    backend.matcher(param)
    vm, img = param.VAR.model, param.Simulation.img_size
    # sizes are not capped (as in PyTorch, an absurd width fails when it is allocated): build small models only
    sizes = [vm.get(k) for k in ("features", "token_dim", "depth", "heads", "window", "mlp_ratio")]
    sizes.append(param.HyperParameter.arch_param.get("initial_features"))
    if max(img) <= 128 and all(not isinstance(v, (int, float)) or v <= 256 for v in sizes):
        # what VARMultiScale.parse reads; cases that mutate other sections reuse the result
        d = param.to_dict()
        key = json.dumps([d["HyperParameter"], d["Simulation"], d["VAR"]["model"], d["VAR"]["scales"],
                          d["VAR"]["teacher_forcing"]], sort_keys=True, default=repr)
        if key not in _BUILT_MODELS:
            build_model(param)
            _BUILT_MODELS.add(key)


_BUILT_MODELS: set = set()


def check_param_case(data: dict) -> str:
    """Load a (mutated) param through YAML text; returns 'accepted', 'refused' or 'refused_by_component'.

    Raises AssertionError when the loader fails with anything but a decode-var error with a readable message,
    or when an accepted param makes a component fail with a bare error.
    """
    from decode_var.core.errors import DecodeVarError
    from decode_var.config.param import param_from_dict

    try:
        text = _dump(data)
    except yaml.YAMLError:
        return "unwritable"
    loaded = _load(text)
    try:
        param = param_from_dict(loaded, source="fuzzed param")
    except DecodeVarError as err:
        msg = str(err)
        assert len(msg) >= 20 and "Traceback" not in msg, f"unreadable message: {msg!r}"
        return "refused"
    except Exception as err:  # a bare error from inside the loader: the bug this fuzz looks for
        raise AssertionError(f"{type(err).__name__}: {err}") from err
    try:
        build_components(param)
    except DecodeVarError as err:
        assert len(str(err)) >= 20, f"unreadable message: {err!r}"
        return "refused_by_component"
    except Exception as err:
        raise AssertionError(f"accepted, then building failed with {type(err).__name__}: {err}") from err
    # an accepted param must load back the same from its saved copy (param_run.yaml: save_param's YAML)
    again = param_from_dict(_load(_dump(param.to_dict())))
    assert json.dumps(again.to_dict(), sort_keys=True, default=str) == \
        json.dumps(param.to_dict(), sort_keys=True, default=str), "saved param does not load back the same"
    return "accepted"


#: Values every key and section of the reference is set to in the sweep ("delete" removes it).
SWEEP_VALUES = ("delete", None, True, "x", "", [], [1, "a"], {}, {"a": 1}, float("nan"), float("inf"),
                -1, 0, 0.5, 10 ** 15)


def sweep_cases():
    """(operation, param dict): every key and section of the reference x :data:`SWEEP_VALUES`, plus a
    misspelt copy of every name (an unknown key)."""
    from decode_var.config.param import load_reference

    ref = load_reference()
    for path in reference_paths(ref):
        ops = [("delete", path, None) if v == "delete" else ("set", path, v) for v in SWEEP_VALUES]
        ops.append(("rename", path, path[-1] + "_"))
        for op in ops:
            data = copy.deepcopy(ref)
            _apply(data, op)
            yield op, data


def sweep_params() -> dict:
    """The deterministic sweep over the whole reference; returns the counts (failures listed)."""
    counts = {"cases": 0, "accepted": 0, "refused": 0, "refused_by_component": 0, "unwritable": 0, "failures": []}
    t0 = time.perf_counter()
    for op, data in sweep_cases():
        counts["cases"] += 1
        try:
            counts[check_param_case(data)] += 1
        except AssertionError as err:
            counts["failures"].append((op, str(err)))
    counts["bare_errors"] = len(counts["failures"])
    counts["seconds"] = time.perf_counter() - t0
    return counts


def fuzz_params(n_cases: int = 500, seed: int = 0) -> dict:
    """Run the param fuzz for ``n_cases`` Hypothesis examples; returns the counts."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import seed as hseed

    counts = {"cases": 0, "accepted": 0, "refused": 0, "refused_by_component": 0, "unwritable": 0}
    failures = []

    @hseed(seed)
    @settings(max_examples=n_cases, deadline=None, database=None, derandomize=False,
              suppress_health_check=list(HealthCheck))
    @given(param_mutations())
    def prop(case):
        ops, data = case
        counts["cases"] += 1
        try:
            counts[check_param_case(data)] += 1
        except AssertionError as err:
            failures.append((ops, str(err)))
            raise

    t0 = time.perf_counter()
    try:
        prop()
    except Exception:
        counts["failure"] = failures[-1] if failures else "unknown"
    counts["bare_errors"] = len(failures)
    counts["seconds"] = time.perf_counter() - t0
    return counts


# ----------------------------------------------------------------------------------------- hostile files
class _RunsCode:
    """Unpickling this object calls ``exec``: writes ``marker`` (a harmless stand-in for an attack)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        import builtins

        return builtins.exec, (f"open({self.marker!r}, 'w').write('code ran')",)


def hostile_files(folder: Path) -> dict[str, Path]:
    """Files that run code when unpickled, each with its own marker file (written if the code runs)."""
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    weights = {"layer.weight": torch.zeros(2, 2)}
    files = {}

    def make(name, writer):
        path, marker = folder / name, folder / (name + ".ran")
        writer(path, _RunsCode(marker))
        files[name] = path

    make("model_with_payload.pt", lambda p, e: torch.save({**weights, "x": e}, p))
    make("ckpt_with_payload.pt", lambda p, e: torch.save({"model": weights, "epoch": 1, "optimizer": {},
                                                          "lr_scheduler": {}, "history": [e]}, p))
    make("payload_only.pt", lambda p, e: torch.save(e, p))
    make("legacy_format.pt", lambda p, e: torch.save({**weights, "x": e}, p, _use_new_zipfile_serialization=False))
    make("plain_pickle_p2.pkl", lambda p, e: p.write_bytes(pickle.dumps(e, protocol=2)))
    make("plain_pickle_p5.pt", lambda p, e: p.write_bytes(pickle.dumps({"model": e}, protocol=5)))
    return files


def hostile_check(folder: Path) -> dict:
    """Each hostile file through each loader: refused with a CheckpointError, and its code never runs."""
    from decode_var.training.checkpoint import load_checkpoint, model_state, safe_load
    from decode_var.core.errors import CheckpointError

    files = hostile_files(folder)
    counts = {"hostile_files": len(files), "loads_tried": 0, "refused": 0, "code_ran": 0}
    for name, path in files.items():
        for loader in (safe_load, load_checkpoint, model_state):
            counts["loads_tried"] += 1
            try:
                loader(path)
            except CheckpointError as err:
                counts["refused"] += "Refused to load" in str(err) and str(path) in str(err)
            marker = path.with_name(path.name + ".ran")
            if marker.exists():
                counts["code_ran"] += 1
                marker.unlink()
    return counts


def corrupt_check(folder: Path, exp: Path, seed: int = 0) -> dict:
    """Truncated / damaged checkpoints, models and TIFFs: a decode-var error naming the file, every time."""
    import numpy as np
    import tifffile

    from decode_var.training.checkpoint import load_checkpoint, model_state
    from decode_var.core.errors import DecodeVarError
    from decode_var.data.tiff import TiffStack

    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    counts = {"corrupt_files": 0, "clear_errors": 0}

    def expect_error(path, fn):
        counts["corrupt_files"] += 1
        try:
            fn(path)
        except DecodeVarError as err:
            counts["clear_errors"] += str(path) in str(err)
        except Exception as err:  # noqa: BLE001 - any other type is a failure of this check
            raise AssertionError(f"{path}: bare {type(err).__name__}: {err}") from err

    for name, loader in (("ckpt.pt", load_checkpoint), ("model.pt", model_state)):
        data = (exp / name).read_bytes()
        cuts = [0, 1, 100, len(data) // 2, len(data) - 100, len(data) - 1] + \
            [rng.randrange(1, len(data)) for _ in range(4)]
        for cut in cuts:
            p = folder / f"trunc{cut}_{name}"
            p.write_bytes(data[:cut])
            expect_error(p, loader)
        junk = folder / f"junk_{name}"
        junk.write_bytes(bytes(rng.randrange(256) for _ in range(4096)))
        expect_error(junk, loader)
    stack = np.random.default_rng(seed).integers(0, 1000, size=(6, 16, 16)).astype("uint16")
    for kind, kw in (("plain", {}), ("imagej", {"imagej": True}), ("compressed", {"compression": "zlib"})):
        full = folder / f"{kind}.tif"
        tifffile.imwrite(full, stack, **kw)
        data = full.read_bytes()
        # cuts inside the header and the pixel data (a file cut in its trailing IFDs still holds every frame)
        for cut in (0, 8, len(data) // 3, 2 * len(data) // 3):
            p = folder / f"trunc{cut}_{kind}.tif"
            p.write_bytes(data[:cut])
            expect_error(p, lambda q: TiffStack(q).read(0, None))
    return counts
