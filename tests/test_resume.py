"""Long acquisitions, safely (issue 24 item 3): a fit saves its finished blocks to ``<out>.partial/``; a fit
stopped by Ctrl-C, SIGTERM, SIGKILL or a full disk continues with ``--resume`` without fitting a finished
block again, and ends with the very file an uninterrupted fit writes; a failed fit never replaces a good
output; blocks of another stack, param, model or batch size are refused, and never discarded silently.

The model is an untrained tiny VARMultiScale (its maps depend on all three frames of each window) with
the post-processing threshold set between its p values, so that it finds about 14 emitters per frame.
The stack has 24 frames of 16 x 16 px; frames 4-7 are constant (impossible: a whole block with nothing
to fit, and the windows of frames 3 and 8 end at it); fits use 2 windows per batch and 4 frames per block.
"""
import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
import yaml

import reliability_harness as bench
from decode_var.data.emitter_io import load_emitters, load_source_meta
from decode_var.fit import main as fit_main
from decode_var.inference import blocks, stack as stack_mod
from decode_var.inference.blocks import PartialFit, PartialFitError, partial_folder
from decode_var.inference.predictor import Predictor
from decode_var.inference.stack import fit

N, BATCH, BLOCK = 24, 2, 4
CONSTANT = [4, 5, 6, 7]
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = bench.untrained_model(tmp_path_factory.mktemp("resume"))
    data = yaml.safe_load((folder / "param_run.yaml").read_text())
    data["PostProcessingParam"]["raw_th"] = 0.0082  # the untrained model's p are 0.0074 - 0.0087
    (folder / "param_run.yaml").write_text(yaml.safe_dump(data))
    return folder


def _frames(seed=0, n=N):
    frames = np.random.default_rng(seed).normal(200, 10, size=(n, 16, 16)).clip(0).astype(np.float32)
    frames[CONSTANT] = 200.0
    return frames


def _stack(path: Path, frames=None) -> Path:
    tifffile.imwrite(path, _frames() if frames is None else frames, photometric="minisblack")
    return path


def _argv(model_dir, frames, out, *extra):
    return ["-p", str(model_dir / "param_run.yaml"), "--model", str(model_dir / "model.pt"), "--frames", str(frames),
            "--out", str(out), "--batch-size", str(BATCH), "--block-frames", str(BLOCK), "--no-render", *extra]


def _cli(model_dir, frames, out, capsys, *extra):
    rc = fit_main(_argv(model_dir, frames, out, *extra))
    return rc, capsys.readouterr()


def _one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("[decode-var]")
             and "frames/s" not in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture(scope="module")
def reference(model_dir, tmp_path_factory):
    """The uninterrupted fits (.csv and .h5) that every resumed fit must reproduce byte for byte."""
    tmp = tmp_path_factory.mktemp("reference")
    torch.set_num_threads(2)  # as conftest sets it for each test (the thread count changes the last digits)
    frames = _stack(tmp / "stack.tif")
    for suffix in ("csv", "h5", "pt"):
        fit(model_dir / "param_run.yaml", model_dir / "model.pt", frames, tmp / f"em.{suffix}", BATCH,
            progress=False, block_frames=BLOCK)
    return tmp


def _copy_stack(frames: Path, folder: Path) -> Path:
    """A copy of ``frames`` in ``folder`` with the same bytes and modification time (as ``mv`` or ``cp -p``)."""
    copy = folder / frames.name
    copy.write_bytes(frames.read_bytes())
    st = os.stat(frames)
    os.utime(copy, ns=(st.st_atime_ns, st.st_mtime_ns))
    return copy


def spy_maps(monkeypatch, seen: list) -> None:
    """Record in ``seen`` the centre frames the model sees, in order (where the predictor runs the network)."""
    real = Predictor.maps

    def spy(self, net_NCHW, first_frame=0):
        seen.extend(range(first_frame, first_frame + net_NCHW.shape[0]))
        return real(self, net_NCHW, first_frame)

    monkeypatch.setattr(Predictor, "maps", spy)


@pytest.fixture
def fitted_frames(monkeypatch):
    seen = []
    spy_maps(monkeypatch, seen)
    return seen


def _interrupt_in_block(monkeypatch, block: int, error: BaseException):
    """Raise ``error`` after the first batch of block ``block`` (0-based): the blocks before it are finished.
    Returns the real ``localize_stack``, to put back."""
    real = stack_mod.localize_stack

    def stopping(*a, span=None, **k):
        gen = real(*a, span=span, **k)
        if span is not None and span[0] == block * BLOCK:
            yield next(gen)
            raise error
        yield from gen

    monkeypatch.setattr(stack_mod, "localize_stack", stopping)
    return real


# ------------------------------------------------------------------------------------ the reference
def test_block_boundaries_change_nothing_and_the_windows_reach_across_them(model_dir, reference, tmp_path):
    """4-frame blocks give the file of one 24-frame block; the windows at the block ends read their
    neighbours from the stack (frame 3's window ends at the constant frame 4 in the next block)."""
    frames = reference / "stack.tif"
    fit(model_dir / "param_run.yaml", model_dir / "model.pt", frames, tmp_path / "one.csv", BATCH, progress=False,
        block_frames=N)
    assert (tmp_path / "one.csv").read_bytes() == (reference / "em.csv").read_bytes()
    blocked = load_emitters(reference / "em.csv")
    assert set(blocked.frame_ix.tolist()) == set(range(N)) - set(CONSTANT)
    assert load_source_meta(reference / "em.csv")["excluded_constant"] == CONSTANT
    # the test can fail: frame 3's localizations change when frame 4 is an ordinary frame
    other = _frames()
    other[4] = np.random.default_rng(1).normal(200, 10, size=(16, 16))
    em = fit(model_dir / "param_run.yaml", model_dir / "model.pt", _stack(tmp_path / "other.tif", other),
             tmp_path / "other.csv", BATCH, progress=False, block_frames=BLOCK)
    assert not torch.equal(em.xyz[em.frame_ix == 3], blocked.xyz[blocked.frame_ix == 3])
    assert not partial_folder(tmp_path / "one.csv").exists()  # removed once the output is in place


# ------------------------------------------------------------------------------- stopped, then resumed
def test_an_interrupted_fit_keeps_the_old_output_and_resumes_without_refitting(model_dir, reference, tmp_path,
                                                                                 capsys, monkeypatch, fitted_frames):
    frames, out = reference / "stack.tif", tmp_path / "em.csv"
    out.write_bytes(b"yesterday's emitters")
    real = _interrupt_in_block(monkeypatch, 3, KeyboardInterrupt())
    rc, captured = _cli(model_dir, frames, out, capsys)
    line = _one_line(captured.err)
    assert rc == 130 and line.startswith(f"decode-var-fit: interrupted; {out} is as it was; 3 finished blocks "
                                         f"(12 of 24 frames) are kept in {partial_folder(out)}")
    assert "--resume" in line and out.read_bytes() == b"yesterday's emitters"
    assert sorted(PartialFit(out).done()) == [(0, 4), (4, 8), (8, 12)]

    monkeypatch.setattr(stack_mod, "localize_stack", real)
    fitted_frames.clear()
    rc, captured = _cli(model_dir, frames, out, capsys, "--resume")
    assert rc == 0 and fitted_frames == list(range(12, N))  # the finished blocks are not fitted again
    assert out.read_bytes() == (reference / "em.csv").read_bytes()
    assert not partial_folder(out).exists()
    # the progress bar starts at the resumed frames and shows the time left and the rate
    assert "fitting (12 frames resumed):  50%" in captured.err and "12/24 frames [" in captured.err
    assert "24/24 frames [" in captured.err and " frames/s]" in captured.err and "<00:00" in captured.err


def test_a_full_disk_while_saving_a_block_keeps_the_finished_ones_and_resume_ends_the_fit(model_dir, reference,
                                                                                          tmp_path, capsys,
                                                                                          monkeypatch):
    """The third block's write fails with ENOSPC (as torch.save reports it through a Python file): one line
    naming the block file and the kept blocks; the old output stays; no temporary file is left; after
    space is freed, --resume writes the reference file."""
    frames, out = reference / "stack.tif", tmp_path / "em.h5"
    out.write_bytes(b"the previous, complete file")
    real, calls = torch.save, []

    def full_disk(obj, f, *a, **k):
        calls.append(1)
        if len(calls) == 3:
            f.write(b"PK partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", full_disk)
    rc, captured = _cli(model_dir, frames, out, capsys)
    line = _one_line(captured.err)
    folder = partial_folder(out)
    assert rc == 2 and f"could not write {folder / 'frames_000008-000012.pt'}: No space left on device" in line
    assert f"2 finished blocks (8 of 24 frames) are kept in {folder}: run the same command with --resume" in line
    assert out.read_bytes() == b"the previous, complete file"
    assert sorted(p.name for p in folder.iterdir()) == ["frames_000000-000004.pt", "frames_000004-000008.pt",
                                                        "lock", "manifest.json"]
    monkeypatch.undo()
    rc, _ = _cli(model_dir, frames, out, capsys, "--resume")
    assert rc == 0 and out.read_bytes() == (reference / "em.h5").read_bytes() and not folder.exists()


@pytest.mark.parametrize("suffix", ["csv", "pt"])
def test_a_failed_final_write_keeps_every_block_and_resume_fits_nothing(model_dir, reference, tmp_path,
                                                                        monkeypatch, fitted_frames, suffix):
    """Stopped after the last block, before the output was in place: --resume only writes the file."""
    frames, out = reference / "stack.tif", tmp_path / f"em.{suffix}"
    real = stack_mod.save_emitters

    def fails(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(stack_mod, "save_emitters", fails)
    with pytest.raises(KeyboardInterrupt):
        fit(model_dir / "param_run.yaml", model_dir / "model.pt", frames, out, BATCH, progress=False,
            block_frames=BLOCK)
    assert not out.exists() and len(PartialFit(out).done()) == N // BLOCK
    monkeypatch.setattr(stack_mod, "save_emitters", real)
    fitted_frames.clear()
    em = fit(model_dir / "param_run.yaml", model_dir / "model.pt", frames, out, progress=False, resume=True)
    assert fitted_frames == [] and out.read_bytes() == (reference / f"em.{suffix}").read_bytes()
    assert em.fit_report.summary(len(em), out) == f"fitted 20 of 24 frames (16 x 16 px); 4 excluded: constant " \
                                                  f"[4, 5, 6, 7]; wrote {len(em)} emitters to {out}"


def _die_after(block: int, sig: str, argv: list) -> str:
    """A decode-var-fit process that sends itself ``sig`` right after saving block ``block`` (1-based)."""
    return f"""
import os, signal, sys
import torch
torch.set_num_threads({torch.get_num_threads()})  # the in-process fits' threads: the same arithmetic
from decode_var.inference import blocks
real = blocks.PartialFit.save_block
saved = []

def save_then_stop(self, *a, **k):
    path = real(self, *a, **k)
    saved.append(path)
    if len(saved) == {block}:
        os.kill(os.getpid(), signal.{sig})
    return path

blocks.PartialFit.save_block = save_then_stop
from decode_var.fit import main
sys.exit(main({argv!r}))
"""


@pytest.mark.parametrize("sig,suffix", [("SIGKILL", "h5"), ("SIGTERM", "csv")])
def test_a_fit_killed_by_a_signal_resumes_to_the_file_of_an_uninterrupted_fit(model_dir, reference, tmp_path,
                                                                              capsys, monkeypatch, fitted_frames,
                                                                              sig, suffix):
    """A real process, stopped after its third block: SIGKILL leaves no word (and its temporary files, if
    any); SIGTERM ends with one line and status 130. --resume fits frames 12-23 only."""
    frames, out = reference / "stack.tif", tmp_path / f"em.{suffix}"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(torch.get_num_threads())}
    code = _die_after(3, sig, _argv(model_dir, frames, out, "--no-progress"))
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    if sig == "SIGKILL":
        assert proc.returncode == -signal.SIGKILL
    else:
        assert proc.returncode == 130, proc.stderr
        line = _one_line(proc.stderr)
        assert line.startswith(f"decode-var-fit: interrupted; stopped by SIGTERM; {out} is as it was; 3 finished "
                               "blocks (12 of 24 frames)") and line.endswith("run the same command with --resume "
                                                                            "to continue from there")
    assert not out.exists() and sorted(PartialFit(out).done()) == [(0, 4), (4, 8), (8, 12)]
    rc, _ = _cli(model_dir, frames, out, capsys, "--resume")
    assert rc == 0 and fitted_frames == list(range(12, N))
    assert out.read_bytes() == (reference / f"em.{suffix}").read_bytes() and not partial_folder(out).exists()


# ---------------------------------------------------------------------------------------------- refused
@pytest.fixture
def stopped(model_dir, reference, tmp_path, monkeypatch):
    """A fit stopped in its fourth block (3 blocks kept), an older good output next to it."""
    frames, out = reference / "stack.tif", tmp_path / "em.csv"
    out.write_bytes(b"a good older output")
    real = _interrupt_in_block(monkeypatch, 3, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        fit(model_dir / "param_run.yaml", model_dir / "model.pt", frames, out, BATCH, progress=False,
            block_frames=BLOCK)
    monkeypatch.setattr(stack_mod, "localize_stack", real)
    return frames, out


def _changed(case, model_dir, frames, tmp_path):
    """(param, model, frames, extra fit kwargs) of a resume with one thing changed."""
    param, model = model_dir / "param_run.yaml", model_dir / "model.pt"
    if case == "pixels":  # same size, same frame count: another acquisition of the same length
        frames = _stack(tmp_path / "other.tif", _frames(seed=5))
    elif case == "frame count":
        frames = _stack(tmp_path / "other.tif", _frames(n=N + 2))
    elif case == "param":
        data = yaml.safe_load(param.read_text())
        data["PostProcessingParam"]["raw_th"] = 0.0081
        param = tmp_path / "param_other.yaml"
        param.write_text(yaml.safe_dump(data))
    elif case == "model":  # the same architecture, one weight nudged: a model trained further
        state = torch.load(model, weights_only=True)
        key = next(k for k, v in state.items() if isinstance(v, torch.Tensor) and v.is_floating_point())
        state[key] = state[key] + 1e-6
        model = tmp_path / "model_other.pt"
        torch.save(state, model)
    return param, model, frames, ({"batch_size": 4} if case == "batch size" else {"batch_size": "auto"})


@pytest.mark.parametrize("case,expected", [
    ("pixels", "is not the stack they come from"),
    ("frame count", "24 frames, now 26"),
    ("param", "-p holds other param values"),
    ("model", "--model is another model file"),
    ("batch size", "they were fitted with --batch-size 2, not 4 (pass --batch-size 2 or auto)"),
])
def test_a_resume_with_other_inputs_is_refused_naming_them_and_keeps_everything(model_dir, stopped, tmp_path,
                                                                                case, expected):
    frames, out = stopped
    param, model, frames, kw = _changed(case, model_dir, frames, tmp_path)
    before = {p.name: p.read_bytes() for p in partial_folder(out).iterdir()}
    with pytest.raises(PartialFitError) as err:
        fit(param, model, frames, out, progress=False, resume=True, **kw)
    text = str(err.value)
    assert text.startswith(f"cannot resume the fit of {out} from {partial_folder(out)}: ") and expected in text
    assert f"delete {partial_folder(out)} and run without --resume to start over" in text
    assert {p.name: p.read_bytes() for p in partial_folder(out).iterdir()} == before
    assert out.read_bytes() == b"a good older output"


def test_the_stack_moved_elsewhere_resumes(model_dir, stopped, tmp_path):
    """The path is not the stack's identity: a copy with the same modification time resumes (the output
    names the copy, as a fit of the copy would)."""
    frames, out = stopped
    moved = tmp_path / "moved"
    moved.mkdir()
    frames = _copy_stack(frames, moved)
    fit(model_dir / "param_run.yaml", model_dir / "model.pt", frames, out, progress=False, resume=True)
    meta = load_source_meta(out)
    assert meta["frames_file"] == str(frames) and meta["n_frames_fitted"] == 20


def test_blocks_left_without_resume_are_refused_before_the_model_loads(model_dir, stopped, capsys, monkeypatch):
    frames, out = stopped

    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the blocks were checked")

    monkeypatch.setattr(Predictor, "__init__", refuse)
    rc, captured = _cli(model_dir, frames, out, capsys)
    folder = partial_folder(out)
    assert rc == 2 and _one_line(captured.err) == (
        f"decode-var-fit: error: a stopped fit of {out} left its blocks: 3 finished blocks (12 of 24 frames) are "
        f"kept in {folder}. Pass --resume to continue it, or delete {folder} to start over.")
    assert len(PartialFit(out).done()) == 3 and out.read_bytes() == b"a good older output"


def test_two_fits_of_one_output_cannot_share_the_blocks(model_dir, stopped):
    frames, out = stopped
    first = PartialFit(out)
    manifest = json.loads((first.folder / "manifest.json").read_text())
    record = {k: v for k, v in manifest.items() if k not in ("format", "batch_size", "block_frames")}
    first.resume(record)
    try:
        with pytest.raises(PartialFitError, match=f"another fit is writing {out}"):
            fit(model_dir / "param_run.yaml", model_dir / "model.pt", frames, out, progress=False, resume=True)
    finally:
        first.release()
    assert len(PartialFit(out).done()) == 3


def test_a_resume_without_blocks_is_a_fresh_fit(model_dir, reference, tmp_path):
    """decode-var-run passes resume=True always: with no folder it fits the whole stack."""
    frames = reference / "stack.tif"
    fit(model_dir / "param_run.yaml", model_dir / "model.pt", frames, tmp_path / "em.csv", BATCH, progress=False,
        resume=True, block_frames=BLOCK)
    assert (tmp_path / "em.csv").read_bytes() == (reference / "em.csv").read_bytes()


def test_a_block_fitted_without_mask_nonfinite_resumes_with_it_but_not_the_reverse(model_dir, stopped, tmp_path):
    frames, out = stopped
    manifest = partial_folder(out) / "manifest.json"
    assert json.loads(manifest.read_text())["mask_nonfinite"] is False
    data = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**data, "mask_nonfinite": True}))
    with pytest.raises(PartialFitError, match=r"fitted with --mask-nonfinite \(pass it again\)"):
        fit(model_dir / "param_run.yaml", model_dir / "model.pt", frames, out, progress=False, resume=True)
    manifest.write_text(json.dumps(data))
    fit(model_dir / "param_run.yaml", model_dir / "model.pt", frames, out, progress=False, resume=True,
        mask_nonfinite=True)
    assert not partial_folder(out).exists()


def test_the_manifest_records_what_the_blocks_come_from(stopped):
    frames, out = stopped
    m = json.loads((partial_folder(out) / "manifest.json").read_text())
    st = os.stat(frames)
    assert m["frames"]["n_frames"] == N and m["frames"]["frame_shape"] == [16, 16]
    assert m["frames"]["dtype"] == "float32" and m["frames"]["bytes"] == st.st_size
    assert m["frames"]["mtime_ns"] == st.st_mtime_ns and len(m["frames"]["sample_sha256"]) == 64
    assert (m["batch_size"], m["block_frames"], m["device"], m["compile"]) == (BATCH, BLOCK, "cpu", False)
    assert blocks.block_length(3, 10) == 12 and blocks.block_bounds(10, 4) == [(0, 4), (4, 8), (8, 10)]


def test_a_resume_on_another_thread_count_warns_that_the_last_digits_may_differ(model_dir, stopped, capsys):
    frames, out = stopped
    torch.set_num_threads(1)  # the blocks were fitted with 2 (conftest); the fixture puts 2 back afterwards
    fit(model_dir / "param_run.yaml", model_dir / "model.pt", frames, out, progress=False, resume=True)
    err = capsys.readouterr().err
    assert "were fitted with 2 CPU threads, this fit runs 1" in err and "OMP_NUM_THREADS=2" in err


def test_a_bad_block_length_is_refused_before_the_model_loads(model_dir, reference, tmp_path, capsys, monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("the model was loaded before --block-frames was checked")

    monkeypatch.setattr(Predictor, "__init__", refuse)
    rc, captured = _cli(model_dir, reference / "stack.tif", tmp_path / "em.csv", capsys, "--block-frames", "0")
    assert rc == 2 and _one_line(captured.err) == ("decode-var-fit: error: --block-frames must be an integer >= 1, "
                                                   "got 0.")


def test_a_damaged_block_is_named_and_refitted_once_deleted(model_dir, reference, stopped, tmp_path, capsys,
                                                            fitted_frames):
    frames, out = stopped
    damaged = partial_folder(out) / "frames_000008-000012.pt"
    damaged.write_bytes(b"not a block")
    rc, captured = _cli(model_dir, frames, out, capsys, "--resume")
    line = _one_line(captured.err)
    assert rc == 2 and line == (f"decode-var-fit: error: the finished block {damaged} is damaged (reading it raised "
                                "UnpicklingError). Delete that file and resume again: its frames are then fitted anew.")
    assert out.read_bytes() == b"a good older output"
    damaged.unlink()
    fitted_frames.clear()
    rc, _ = _cli(model_dir, frames, out, capsys, "--resume")
    assert rc == 0 and fitted_frames == list(range(8, N))
    assert out.read_bytes() == (reference / "em.csv").read_bytes()
