"""Nothing lost, nothing invented (issue 27): outputs are checked before the work, a failed write keeps the
old file and ends in one line, devices and Ctrl-C end in one line, a file of random bytes is called corrupt.

The command lines run in this process on an untrained tiny model (the checks do not depend on its weights).
"""
import errno
import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

import reliability_harness as bench


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return bench.untrained_model(tmp_path_factory.mktemp("outputs"))


def _stack(path: Path, n=6) -> Path:
    frames = np.random.default_rng(0).normal(200, 10, size=(n, 16, 16)).clip(0).astype(np.float32)
    tifffile.imwrite(path, frames, photometric="minisblack")
    return path


def _fit(model_dir, frames, out, capsys, *extra, model=None):
    from decode_var.fit import main as fit_main

    try:
        rc = fit_main(["-p", str(model_dir / "param_run.yaml"), "--model", str(model or model_dir / "model.pt"),
                       "--frames", str(frames), "--out", str(out), "--no-progress", *extra])
    except KeyboardInterrupt:  # must not escape: pytest would stop the whole session
        pytest.fail("Ctrl-C escaped decode-var-fit as an exception")
    captured = capsys.readouterr()
    return rc, captured.err


def _one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("[decode-var]")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if the model is loaded: the output checks come first."""
    import decode_var.inference.predictor as predictor

    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the outputs were checked")

    monkeypatch.setattr(predictor.Predictor, "__init__", refuse)


# --------------------------------------------------------------------------------- an output is an input
def test_out_equal_to_the_model_is_refused_and_the_model_is_kept(model_dir, tmp_path, capsys):
    from decode_var.training.checkpoint import model_state

    model = tmp_path / "exp" / "model.pt"
    model.parent.mkdir()
    shutil.copy(model_dir / "model.pt", model)
    before = model.read_bytes()
    frames = _stack(tmp_path / "s.tif")
    spelled_otherwise = tmp_path / "exp" / ".." / "exp" / "model.pt"
    rc, err = _fit(model_dir, frames, spelled_otherwise, capsys, model=model)
    line = _one_line(err)
    assert rc == 2 and "is the --model file" in line and "Choose another --out" in line
    assert model.read_bytes() == before and len(model_state(model)) > 0


def test_an_export_next_to_out_that_would_replace_the_frames_is_refused(model_dir, tmp_path, capsys):
    frames = _stack(tmp_path / "em_render.tif")  # what --out em.h5 renders to
    before = frames.read_bytes()
    rc, err = _fit(model_dir, frames, tmp_path / "em.h5", capsys)
    assert rc == 2 and "em_render.tif: it is the --frames file" in _one_line(err)
    assert frames.read_bytes() == before and not (tmp_path / "em.h5").exists()


def test_eval_refuses_to_write_its_localizations_over_the_ground_truth(model_dir, tmp_path, capsys):
    from decode_var.core.emitters import EmitterSet
    from decode_var.data.emitter_io import save_emitters
    from decode_var.eval_cli import main as eval_main

    frames = _stack(tmp_path / "s.tif")
    gt = tmp_path / "ev" / "emitters.csv"
    gt.parent.mkdir()
    save_emitters(gt, EmitterSet(torch.tensor([[3.0, 4.0, 0.0]]), torch.tensor([1000.0]), torch.tensor([0]),
                                 px_size=torch.tensor([100.0, 100.0])))
    before = gt.read_bytes()
    rc = eval_main(["-p", str(model_dir / "param_run.yaml"), "--model", str(model_dir / "model.pt"), "--frames",
                    str(frames), "--emitters", str(gt), "--out", str(gt.parent), "--no-report"])
    assert rc == 2 and "is the --emitters file" in _one_line(capsys.readouterr().err)
    assert gt.read_bytes() == before and not (gt.parent / "metrics.json").exists()


# ----------------------------------------------------------------------- found before the model is loaded
def _read_only_folder() -> Path:
    """A folder where a file cannot be created, even by root (whom a chmod does not stop): sysfs never allows it."""
    if not Path("/sys").is_dir():
        pytest.skip("no /sys here (not Linux)")
    return Path("/sys")


@pytest.mark.parametrize("case", ["parent_is_a_file", "out_is_a_folder", "read_only_folder", "disk_too_full"])
def test_fit_output_problems_are_found_before_the_model_is_loaded(model_dir, tmp_path, capsys, monkeypatch,
                                                                  no_model_load, case):
    frames = _stack(tmp_path / "s.tif")
    if case == "parent_is_a_file":
        out, expected = tmp_path / "s.tif" / "em.h5", "s.tif is a file, not a folder"
    elif case == "out_is_a_folder":
        out, expected = tmp_path / "em.h5", "em.h5: it is a folder"
        out.mkdir()
    elif case == "read_only_folder":
        out, expected = _read_only_folder() / "em.h5", "/sys is not writable"
    else:
        out, expected = tmp_path / "em.h5", "not enough free space"
        real = shutil.disk_usage
        monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    rc, err = _fit(model_dir, frames, out, capsys)
    line = _one_line(err)
    assert rc == 2 and line.startswith("decode-var-fit: error: ") and expected in line
    if case == "disk_too_full":
        assert "1.0 kB free" in line and not out.exists()


def test_train_into_a_folder_under_a_file_fails_before_the_model_is_built(tmp_path, capsys, monkeypatch):
    import yaml

    import decode_var.training.trainer as trainer
    from decode_var.train import main as train_main

    def refuse(*a, **k):
        raise AssertionError("the trainer was built before the experiment folder was checked")

    monkeypatch.setattr(trainer.Trainer, "__init__", refuse)
    param = bench.write_param(tmp_path, bench.KILL_RUN)
    (tmp_path / "blocker").write_text("a file")
    data = yaml.safe_load(param.read_text())
    data["InOut"]["experiment_out"] = str(tmp_path / "blocker" / "runs")
    param.write_text(yaml.safe_dump(data))
    assert train_main(["-p", str(param), "-n", "--no-progress"]) == 2
    line = _one_line(capsys.readouterr().err)
    assert "blocker is a file, not a folder" in line and "InOut.experiment_out" in line


# -------------------------------------------------------------------------------- a write that fails later
@pytest.mark.parametrize("failing", ["emitters", "render"])
def test_a_full_disk_during_the_write_keeps_the_old_file_and_ends_in_one_line(model_dir, tmp_path, capsys,
                                                                              monkeypatch, failing):
    import h5py

    frames = _stack(tmp_path / "s.tif")
    out = tmp_path / "em.h5"
    victim = out if failing == "emitters" else tmp_path / "em_render.tif"
    victim.write_bytes(b"the previous, complete file")

    def full_disk(path, *a, **k):  # a few bytes reach the disk, then it is full (as h5py / tifffile report it)
        Path(path).write_bytes(b"\x89HDF partial")
        raise OSError(errno.ENOSPC, "Unable to synchronously create file (file write failed: errno = 28, "
                                    "error message = 'No space left on device')")

    if failing == "emitters":
        monkeypatch.setattr(h5py, "File", full_disk)
    else:
        monkeypatch.setattr(tifffile, "imwrite", full_disk)
    rc, err = _fit(model_dir, frames, out, capsys)
    line = _one_line(err)
    assert rc == 2 and f"could not write {victim}: No space left on device" in line
    assert victim.read_bytes() == b"the previous, complete file"
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]  # no partial temporary left
    if failing == "render":
        assert f"the emitters are saved in {out}" in line and out.stat().st_size > 0


def test_a_full_disk_while_saving_a_checkpoint_is_an_os_error_naming_the_file(tmp_path, monkeypatch):
    """torch.save reports a full disk as RuntimeError('unexpected pos'); written through a Python file it is
    ENOSPC, which becomes an OutputError (still an OSError) and leaves the previous checkpoint."""
    import builtins

    from decode_var.core.errors import OutputError
    from decode_var.training.checkpoint import save_checkpoint

    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, {"epoch": 1})
    before = path.read_bytes()
    real_open = builtins.open

    def open_on_full_disk(file, mode="r", *a, **k):  # the temporary file's writes go to a full device
        return real_open("/dev/full" if "w" in mode and ".tmp" in str(file) else file, mode, *a, **k)

    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full here")
    monkeypatch.setattr(builtins, "open", open_on_full_disk)
    with pytest.raises(OutputError, match=r"could not write .*ckpt.pt: No space left on device"):
        save_checkpoint(path, {"epoch": 2, "w": torch.zeros(100_000)})
    monkeypatch.undo()
    assert path.read_bytes() == before and isinstance(OutputError("x"), OSError)


# --------------------------------------------------------------------------------------- devices, Ctrl-C
@pytest.mark.parametrize("device,expected", [
    ("cuda", "device 'cuda' is not available: this torch has no CUDA (available: cpu)"),
    ("tpu:7", "unknown device 'tpu:7' for -i/--device (use cpu, cuda, cuda:N, mps)"),
])
def test_a_device_this_machine_lacks_is_one_line_naming_what_is_available(model_dir, tmp_path, capsys,
                                                                          no_model_load, device, expected):
    from decode_var.eval_cli import main as eval_main

    if device == "cuda" and (torch.cuda.is_available() or torch.version.cuda is not None):
        pytest.skip("this torch has CUDA")
    rc, err = _fit(model_dir, _stack(tmp_path / "s.tif"), tmp_path / "em.h5", capsys, "-i", device)
    assert rc == 2 and _one_line(err) == f"decode-var-fit: error: {expected}."
    rc = eval_main(["-p", str(model_dir / "param_run.yaml"), "--model", str(model_dir / "model.pt"), "--out",
                    str(tmp_path / "ev"), "-i", device])
    assert rc == 2 and _one_line(capsys.readouterr().err) == f"decode-var-eval: error: {expected}."


def test_ctrl_c_during_a_fit_ends_in_one_line_and_keeps_the_old_output(model_dir, tmp_path, capsys, monkeypatch):
    import decode_var.inference.stack as stack

    real = stack.localize_stack

    def interrupted_after_one_batch(*a, **k):
        gen = real(*a, **k)
        yield next(gen)
        raise KeyboardInterrupt

    monkeypatch.setattr(stack, "localize_stack", interrupted_after_one_batch)
    out = tmp_path / "em.h5"
    out.write_bytes(b"yesterday's emitters")
    rc, err = _fit(model_dir, _stack(tmp_path / "s.tif"), out, capsys, "--batch-size", "2")
    assert rc == 130 and _one_line(err).startswith("decode-var-fit: interrupted; nothing was written")
    assert out.read_bytes() == b"yesterday's emitters"


def test_ctrl_c_during_a_conversion_ends_in_one_line(tmp_path, capsys, monkeypatch):
    import decode_var.render_cli as render_cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(render_cli, "_load", interrupted)
    try:
        rc = render_cli.convert_main([str(tmp_path / "em.h5"), "--format", "thunderstorm", "--out",
                                      str(tmp_path / "em.csv")])
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C escaped decode-var-convert as an exception")
    assert rc == 130 and _one_line(capsys.readouterr().err) == "decode-var-convert: interrupted; nothing was written"


# ------------------------------------------------------------------------------- corrupt is not untrusted
@pytest.mark.parametrize("head", [b"", b"\x80\x02", b"PK"])
def test_a_file_of_random_bytes_is_called_corrupt_not_a_trust_question(tmp_path, head):
    from decode_var.core.errors import CheckpointError
    from decode_var.training.checkpoint import model_state

    path = tmp_path / "model.pt"
    path.write_bytes(head + np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(CheckpointError) as info:
        model_state(path)
    assert "corrupt" in str(info.value) and str(path) in str(info.value)
    assert "Refused" not in str(info.value) and "--trust-pickle" not in str(info.value)
