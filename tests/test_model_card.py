"""The model card (issue 27): the camera a model was trained for, named at fit time when the fit's differs, and
the precision calibration (RMSE / sqrt(CRLB) on the model's own test set) that the trainer and decode-var-eval
measure alike."""
import json
import math

import pytest
import torch

from decode_var.evaluation.model_card import CAMERA_KEYS
from test_train import write_param

CARD = "model_card.json"
TRAINED_CAMERA = {"em_gain": 300.0, "e_per_adu": 45.0, "baseline": 100.0, "qe": 1.0, "read_sigma": 74.4,
                  "spur_noise": 0.0015, "convert2photons": True, "px_size": [100.0, 100.0]}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """An untrained model with its param_run.yaml (as tests/test_reliability.py's), no card yet."""
    from decode_var.config.param import load_param, save_param
    from decode_var.registry import build_model
    from decode_var.training.checkpoint import save_model

    folder = tmp_path_factory.mktemp("cardmodel")
    param = load_param(write_param(folder))
    torch.manual_seed(0)
    save_model(folder / "model.pt", build_model(param))
    save_param(folder / "param_run.yaml", param)
    return folder


def _param(model_dir, **camera):
    from decode_var.config.param import load_param, param_from_dict

    data = load_param(model_dir / "param_run.yaml").to_dict()
    data["Camera"].update(camera)
    return param_from_dict(data)


def test_a_camera_other_than_the_training_one_is_named_at_fit_time(model_dir, tmp_path, capsys):
    """issue 27, found 4: `em_gain: null` with a model trained for an EMCCD fitted 22,978 emitters in 20 frames,
    without a word. The card (written here by hand, as the trainer writes it) makes it a warning naming the key
    and both values; keys that agree, and models without a card, are not mentioned."""
    from decode_var.inference.predictor import Predictor

    folder = tmp_path / "exp"
    folder.mkdir()
    (folder / "model.pt").write_bytes((model_dir / "model.pt").read_bytes())
    Predictor(_param(model_dir, em_gain=None), folder / "model.pt")
    assert "Camera." not in capsys.readouterr().err  # an old model: no card, nothing said about the camera
    (folder / CARD).write_text(json.dumps({"format": 1, "camera": TRAINED_CAMERA, "precision": None}))
    Predictor(_param(model_dir, em_gain=None, baseline=398.6), folder / "model.pt")
    err = capsys.readouterr().err
    assert "Camera.em_gain: the model was trained with 300.0, this param says None" in err
    assert "Camera.baseline: the model was trained with 100.0, this param says 398.6" in err
    assert err.count("Camera.") == 2  # e_per_adu, qe, read_sigma, ... agree
    Predictor(_param(model_dir, em_gain=300.0), folder / "model.pt")
    assert "Camera." not in capsys.readouterr().err


def test_a_damaged_card_is_reported_and_the_fit_goes_on(model_dir, tmp_path, capsys):
    from decode_var.evaluation.model_card import load_card
    from decode_var.inference.predictor import Predictor

    (tmp_path / "model.pt").write_bytes((model_dir / "model.pt").read_bytes())
    (tmp_path / CARD).write_text('{"camera": {"em_gain": 30')
    pred = Predictor(_param(model_dir), tmp_path / "model.pt")
    assert pred.card is None and load_card(tmp_path) is None
    assert f"{tmp_path / CARD} cannot be read" in capsys.readouterr().err


def test_precision_calibration_is_rmse_over_root_crlb_and_draws_nothing():
    """Known errors against the Gaussian CRLB: every matched emitter off by (0.3, -0.2) px and 40 nm in z."""
    from decode_var.config.param import param_from_dict
    from decode_var.core.emitters import EmitterSet
    from decode_var.data.crlb import gaussian_crlb
    from decode_var.evaluation.crlb_scoring import CrlbModel, precision_calibration

    param = param_from_dict({"Camera": {"px_size": [100.0, 120.0]}})
    g = param.VAR.gaussian_psf
    xyz = torch.tensor([[5.2, 7.7, -200.0], [12.4, 3.1, 150.0], [8.0, 9.5, 0.0]])
    phot, bg = torch.tensor([900.0, 3000.0, 1500.0]), torch.tensor([20.0, 60.0, 5.0])
    gt = EmitterSet(xyz, phot, torch.tensor([0, 1, 1]), bg=bg)
    pred = EmitterSet(xyz + torch.tensor([0.3, -0.2, 40.0]), phot, gt.frame_ix)
    rng = torch.get_rng_state()
    calib = precision_calibration({**CrlbModel.parse(param).metrics(pred, gt), "n_tp": 3})
    assert torch.equal(rng, torch.get_rng_state())  # the trainer's random streams are left alone
    var = gaussian_crlb(xyz, phot, bg, sigma_0=g.sigma_0, foc_shift=g.foc_shift, rl_range=g.rl_range,
                        em_gain=True, mode_3d=g.mode_3d).double()
    var[:, 0] *= 100.0 ** 2
    var[:, 1] *= 120.0 ** 2
    assert calib["ratio_x"] == pytest.approx(30.0 / math.sqrt(var[:, 0].mean()), rel=1e-5)
    assert calib["ratio_y"] == pytest.approx(24.0 / math.sqrt(var[:, 1].mean()), rel=1e-5)
    assert calib["ratio_z"] == pytest.approx(40.0 / math.sqrt(var[:, 2].mean()), rel=1e-5)
    lateral = math.sqrt(30.0 ** 2 + 24.0 ** 2) / math.sqrt((var[:, 0] + var[:, 1]).mean())
    assert calib["ratio_lat"] == pytest.approx(lateral, rel=1e-5)
    assert calib["n_matched"] == 3


def test_trainer_and_eval_write_the_same_card(tmp_path, capsys):
    """The trainer writes model_card.json with model.pt: the training camera and the calibration measured on its
    seeded test set; decode-var-eval on that test set measures the same numbers again (one scoring)."""
    from decode_var.config.param import load_param
    from decode_var.eval_cli import main as eval_main
    from decode_var.train import train

    # every cell a localization and a wide matching radius: an untrained model has matches to score
    trainer = train(write_param(tmp_path, HyperParameter={"epochs": 1}, PostProcessing="LookUp",
                                PostProcessingParam={"raw_th": 1e-6}, Camera={"em_gain": 300.0},
                                Evaluation={"dist_lat": 1000.0, "dist_ax": 2000.0}),
                    log_comment="card", progress=False)
    exp = trainer.exp_dir
    card = json.loads((exp / CARD).read_text())
    param = load_param(exp / "param_run.yaml")
    assert card["camera"] == {k: getattr(param.Camera, k) for k in CAMERA_KEYS} and card["camera"]["em_gain"] == 300
    assert set(TRAINED_CAMERA) < set(CAMERA_KEYS) and card["camera"]["gain_map"] is None
    trained = card["precision"]
    assert trained["epoch"] == 1 and trained["measured_by"] == "decode-var-train"
    assert trained["n_matched"] == trainer.history[-1]["metrics"]["n_tp"] > 0
    (exp / CARD).unlink()
    assert eval_main(["-p", str(exp / "param_run.yaml"), "--model", str(exp / "model.pt"),
                      "--out", str(tmp_path / "eval"), "--no-report"]) == 0
    again = json.loads((exp / CARD).read_text())["precision"]
    assert again["measured_by"] == "decode-var-eval" and again["n_matched"] == trained["n_matched"]
    for k in ("ratio_x", "ratio_y", "ratio_z", "ratio_lat"):  # the fit's channels-last convolutions round
        assert again[k] == pytest.approx(trained[k], rel=1e-6), k  # differently (1e-8 relative), no more
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["crlb_ratio_x"] == pytest.approx(trained["ratio_x"], rel=1e-4)  # float32 nm there
