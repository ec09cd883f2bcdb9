"""decode-var-eval and decode-var-fit on a tiny trained model, and their bad-input errors."""
import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
import yaml

from decode_var.eval_cli import main as eval_main
from decode_var.fit import main as fit_main
from decode_var.data.emitter_io import load_emitters, save_emitters
from decode_var.config.param import load_param
from decode_var.data.simulation import Simulator
from decode_var.train import train

from test_train import TINY, write_param


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    trainer = train(write_param(tmp), log_comment="cli", progress=False)
    return trainer.exp_dir


def _stack(exp: Path, tmp: Path, n=12):
    """A TIFF in ADU made by the simulator, and its ground truth."""
    param = load_param(exp / "param_run.yaml")
    batch = Simulator.parse(param).sample(n, seed=99)
    photons = batch.frames_NCHW[:, 1]  # the centre frames, one per sample
    c = param.Camera
    adu = (photons * c.qe + c.spur_noise) * c.em_gain / c.e_per_adu + c.baseline
    path = tmp / "stack.tif"
    tifffile.imwrite(path, adu.numpy().astype(np.float32), photometric="minisblack")
    gt = tmp / "gt.csv"
    save_emitters(gt, batch.em)
    return path, gt


def _spy_report_frames(monkeypatch) -> dict:
    """Record what decode-var-eval hands report.png: the frames drawn under the positions."""
    import decode_var.evaluation.plots as plots

    seen = {}
    real = plots.plot_eval_report

    def spy(*a, frame_image=None, image_unit="", **k):
        seen["unit"], seen["frame0"] = image_unit, frame_image(0) if frame_image is not None else None
        return real(*a, frame_image=frame_image, image_unit=image_unit, **k)

    monkeypatch.setattr(plots, "plot_eval_report", spy)
    return seen


def test_eval_on_simulated_test_set(trained, tmp_path, capsys, monkeypatch):
    seen = _spy_report_frames(monkeypatch)
    out = tmp_path / "eval"
    assert eval_main(["-p", str(trained / "param_run.yaml"), "--model", str(trained / "model.pt"),
                      "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("prec", "rec", "jac", "f1", "rmse_lat", "rmse_ax", "rmse_vol", "mad_lat", "effcy_lat", "effcy_ax",
                "effcy_vol", "rmse_phot", "n_gt"):
        assert key in metrics
    assert metrics["n_gt"] > 0 and 0.0 <= metrics["jac"] <= 1.0
    assert (out / "emitters.csv").is_file() and (out / "report.png").is_file()
    assert "jac" in capsys.readouterr().out
    # the report's frame panels show the simulated camera frame (the centre of sample 0's window)
    param = load_param(trained / "param_run.yaml")
    assert seen["unit"] == "photons" and seen["frame0"].shape == tuple(param.Simulation.img_size)
    assert np.isfinite(seen["frame0"]).all() and seen["frame0"].max() > seen["frame0"].min()


def test_fit_then_eval_on_a_tiff(trained, tmp_path, monkeypatch):
    seen = _spy_report_frames(monkeypatch)
    stack, gt = _stack(trained, tmp_path)
    d = yaml.safe_load((trained / "param_run.yaml").read_text())
    # a briefly trained model is unsure everywhere: with this threshold every local maximum of p is an
    # emitter, so every frame must yield some, at positions inside the 16 x 16 px frame
    d["PostProcessingParam"]["raw_th"] = 1e-6
    low_th = tmp_path / "param_low_th.yaml"
    low_th.write_text(yaml.safe_dump(d))
    out = tmp_path / "fit.h5"
    assert fit_main(["-p", str(low_th), "--model", str(trained), "--frames", str(stack),
                     "--out", str(out), "--no-progress"]) == 0
    em = load_emitters(out)
    assert set(em.frame_ix.tolist()) == set(range(12))
    assert em.xyz[:, :2].min() >= -1.0 and em.xyz[:, :2].max() <= 16.0
    ev = tmp_path / "ev"
    assert eval_main(["-p", str(trained / "param_run.yaml"), "--model", str(trained / "model.pt"), "--frames",
                      str(stack), "--emitters", str(gt), "--out", str(ev)]) == 0
    assert json.loads((ev / "metrics.json").read_text())["n_gt"] > 0
    assert seen["unit"] == "ADU" and np.array_equal(seen["frame0"], tifffile.imread(stack)[0])


def test_fit_output_loads_with_decode(trained, tmp_path):
    pytest.importorskip("decode.neuralfitter")
    from decode_var.backend import decode_available

    if not decode_available():
        pytest.skip("real DECODE not usable")
    import decode.utils.emitter_io as dio

    stack, _ = _stack(trained, tmp_path)
    out = tmp_path / "fit.h5"
    assert fit_main(["-p", str(trained / "param_run.yaml"), "--model", str(trained / "model.pt"), "--frames",
                     str(stack), "--out", str(out), "--no-progress"]) == 0
    data, meta, _ = dio.load_h5(out)
    assert "xyz" in data and meta["xy_unit"] == "px"


test_fit_output_loads_with_decode = pytest.mark.decode(test_fit_output_loads_with_decode)


@pytest.mark.parametrize("case", ["missing", "corrupt", "empty_out_suffix", "nan"])
def test_fit_bad_inputs_fail_cleanly(trained, tmp_path, case, capsys):
    stack, _ = _stack(trained, tmp_path, n=4)
    out = tmp_path / "out.h5"
    if case == "missing":
        stack = tmp_path / "nope.tif"
    elif case == "corrupt":
        data = stack.read_bytes()
        stack.write_bytes(data[: len(data) // 2])
    elif case == "empty_out_suffix":
        out = tmp_path / "out.txt"
    elif case == "nan":
        arr = tifffile.imread(stack)
        arr[2, 3, 3] = np.nan
        tifffile.imwrite(stack, arr, photometric="minisblack")
    rc = fit_main(["-p", str(trained / "param_run.yaml"), "--model", str(trained / "model.pt"), "--frames",
                   str(stack), "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert rc != 0 and "error" in err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no temporary left behind
    if case == "nan":
        assert "[2]" in err and "--mask-nonfinite" in err


def test_model_that_does_not_fit_the_param(trained, tmp_path, capsys):
    import yaml

    param = yaml.safe_load((trained / "param_run.yaml").read_text())
    param["HyperParameter"]["channels_in"] = 1
    other = tmp_path / "param_other.yaml"
    other.write_text(yaml.safe_dump(param))
    rc = eval_main(["-p", str(other), "--model", str(trained / "model.pt"), "--out", str(tmp_path / "e")])
    assert rc == 2 and "does not fit" in capsys.readouterr().err
    assert not (tmp_path / "e" / "metrics.json").exists()


def test_corrupt_model_file(trained, tmp_path, capsys):
    bad = tmp_path / "model.pt"
    bad.write_bytes((trained / "model.pt").read_bytes()[:100])
    rc = eval_main(["-p", str(trained / "param_run.yaml"), "--model", str(bad), "--out", str(tmp_path / "e")])
    assert rc == 2 and "truncated or corrupt" in capsys.readouterr().err


def test_ground_truth_background_is_read_where_the_emitter_is():
    from decode_var.core.emitters import EmitterSet
    from decode_var.evaluation.crlb_scoring import background_at

    bg = torch.arange(2 * 4 * 5, dtype=torch.float32).view(2, 4, 5)  # varies across frames, rows, columns
    em = EmitterSet(torch.tensor([[0.2, 3.4, 0.0], [2.6, -0.4, 10.0], [3.9, 4.7, 0.0]]), torch.ones(3),
                    torch.tensor([1, 0, 1]))
    assert background_at(bg, em).tolist() == [bg[1, 0, 3], bg[0, 3, 0], bg[1, 3, 4]]
