"""DECODE's SigmaMUNet, trained with decode-var-train, is fitted and evaluated like any decode-var model
(issue 23 item 3): the Predictor runs the training task's output units and post-processing, so the
10-channel output ``[p, phot, x, y, z, phot_sig, x_sig, y_sig, z_sig, bg]`` becomes emitters with their
predicted sigmas, and the exports write those sigmas as the localization precision.

Needs real DECODE 0.10 (marked ``decode``; skipped without it).
"""
import csv
from pathlib import Path

import h5py
import numpy as np
import pytest
import tifffile
import torch
import yaml

pytestmark = pytest.mark.decode
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def sigmamunet_exp(tmp_path_factory):
    """A one-epoch SigmaMUNet run of param/sigmamunet_decode.yaml, made small (8 features, 16 samples)."""
    from decode_var.train import main as train_main

    folder = tmp_path_factory.mktemp("sigmamunet")
    data = yaml.safe_load((REPO / "param" / "sigmamunet_decode.yaml").read_text())
    data["HyperParameter"].update(epochs=1, pseudo_ds_size=16, batch_size=8)
    data["HyperParameter"]["arch_param"].update(initial_features=8, inter_features=8)
    data["TestSet"]["test_size"] = 8
    data["Hardware"]["torch_threads"] = 1
    data["InOut"]["experiment_out"] = str(folder / "out")
    param = folder / "param.yaml"
    param.write_text(yaml.safe_dump(data))
    assert train_main(["-p", str(param), "-n", "--no-progress"]) == 0
    return sorted(p for p in (folder / "out").iterdir() if p.is_dir())[-1]


def test_the_predictor_turns_sigmamunet_maps_into_emitters_with_their_sigmas(sigmamunet_exp):
    """One emitter painted into a physical 10-channel map of a 48 x 56 px frame (not the training
    size): the post-processing of the frame's grid finds it where it was painted, with its sigmas."""
    from decode_var.config.param import load_param
    from decode_var.inference.predictor import Predictor

    pred = Predictor(load_param(sigmamunet_exp / "param_run.yaml"), sigmamunet_exp / "model.pt")
    out = torch.zeros(1, 10, 48, 56)
    out[0, 0, 30, 41] = 1.0                     # p
    out[0, 1, 30, 41] = 3000.0                  # photons
    out[0, 2:5, 30, 41] = torch.tensor([0.2, -0.3, 150.0])   # x, y offsets (px), z (nm)
    out[0, 5:9, 30, 41] = torch.tensor([40.0, 0.05, 0.07, 30.0])  # phot_sig, x_sig, y_sig (px), z_sig (nm)
    out[0, 9] = 50.0                            # bg
    em = pred.emitters(out, first_frame=5, frame_hw=(48, 56))
    assert len(em) == 1 and int(em.frame_ix[0]) == 5
    assert torch.allclose(em.xyz_px[0], torch.tensor([30.2, 40.7, 150.0]), atol=1e-4)
    assert torch.allclose(em.xyz_sig[0], torch.tensor([0.05, 0.07, 30.0]), atol=1e-5)


def test_decode_var_fit_and_eval_run_a_trained_sigmamunet(sigmamunet_exp, tmp_path, capsys):
    from decode_var.eval_cli import main as eval_main
    from decode_var.fit import main as fit_main

    rng = np.random.default_rng(0)
    frames = (100 + rng.poisson(20 * 100 / 45, (6, 48, 56))).astype(np.uint16)
    tifffile.imwrite(tmp_path / "movie.tif", frames, photometric="minisblack")
    out = tmp_path / "em.h5"
    rc = fit_main(["-p", str(sigmamunet_exp / "param_run.yaml"), "--model", str(sigmamunet_exp / "model.pt"),
                   "--frames", str(tmp_path / "movie.tif"), "--out", str(out), "--no-progress",
                   "--format", "decode", "picasso", "thunderstorm"])
    captured = capsys.readouterr()
    assert rc == 0 and "Traceback" not in captured.err, captured.err
    assert "fitted 6 of 6 frames" in captured.out
    assert (tmp_path / "em_locs.hdf5").exists() and (tmp_path / "em_thunderstorm.csv").exists()
    rc = eval_main(["-p", str(sigmamunet_exp / "param_run.yaml"), "--model", str(sigmamunet_exp / "model.pt"),
                    "--out", str(tmp_path / "eval"), "--no-report"])
    captured = capsys.readouterr()
    assert rc == 0 and "Traceback" not in captured.err, captured.err
    assert (tmp_path / "eval" / "metrics.json").exists()


def test_the_exports_write_sigmamunets_sigmas_as_the_precision(sigmamunet_exp, tmp_path):
    from decode_var.config.param import load_param
    from decode_var.core.emitters import EmitterSet
    from decode_var.evaluation.crlb_scoring import CrlbModel
    from decode_var.inference.export import save_picasso, save_thunderstorm

    param = load_param(sigmamunet_exp / "param_run.yaml")
    em = EmitterSet(xyz=torch.tensor([[10.0, 20.0, 100.0]]), phot=torch.tensor([3000.0]), frame_ix=torch.tensor([0]),
                    bg=torch.tensor([50.0]), xyz_sig=torch.tensor([[0.05, 0.07, 30.0]]), px_size=[100.0, 100.0])
    save_picasso(tmp_path / "p_locs.hdf5", em, (40, 40), 1, psf=CrlbModel.parse(param))
    with h5py.File(tmp_path / "p_locs.hdf5", "r") as f:
        locs = f["locs"][()]
    # Picasso's x is DECODE's y: lpx = y_sig, lpy = x_sig (px); lpz in nm
    assert np.allclose([locs["lpx"][0], locs["lpy"][0], locs["lpz"][0]], [0.07, 0.05, 30.0], atol=1e-5)
    save_thunderstorm(tmp_path / "ts.csv", em, psf=CrlbModel.parse(param))
    with open(tmp_path / "ts.csv") as f:
        row = next(csv.DictReader(f))
    assert float(row["uncertainty_xy [nm]"]) == pytest.approx(np.sqrt((5.0 ** 2 + 7.0 ** 2) / 2), rel=1e-4)
