"""VARMultiScale's own uncertainty (issue 26 item 3): the sigma head at the finest scale, its Gaussian NLL, its units
on the way out, the post-hoc calibration, and what reads it (emitters, exports, ``--max-sigma``, the render)."""
import csv
import json
import math

import h5py
import numpy as np
import pytest
import torch
import yaml
from hypothesis import given, strategies as st

from decode_var.config.param import load_param
from decode_var.core.emitters import EmitterSet
from decode_var.core.errors import CheckpointError, InputDataError, ParamError
from decode_var.core.scales import ScaleSchedule
from decode_var.core.seeds import derive_seed
from decode_var.evaluation.crlb_scoring import CrlbModel
from decode_var.evaluation.model_card import SigmaCalibration, camera_of, load_card, update_card
from decode_var.evaluation.uncertainty import ONE_SIGMA, calibrate_sigma, sigma_coverage, sigma_scale
from decode_var.inference.export import filter_max_sigma, lateral_sigma_nm, save_picasso, save_thunderstorm
from decode_var.inference.render import render
from decode_var.nn.loss import AdaptivePPXYZBLoss, PPXYZBLoss
from decode_var.nn.model import SIGMA_MIN, VARMultiScale
from decode_var.train import train
from decode_var.training.components import build

from test_train import TINY, write_param

ARCH = dict(features=4, token_dim=8, depth=1, heads=2, window=2)


def tiny(uncertainty: bool, factors=(0.25, 0.5, 1.0), size=16, **kw) -> VARMultiScale:
    torch.manual_seed(0)
    return VARMultiScale(3, ScaleSchedule((size, size), list(factors)), uncertainty=uncertainty, **{**ARCH, **kw})


def frames(n=2, size=16, seed=1):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def targets(shapes, n=2, seed=2, density=0.1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for hw in shapes:
        t = torch.randn(n, 6, *hw, generator=g) * 0.3
        t[:, 0] = (torch.rand(n, *hw, generator=g) < density).float()
        out.append(t)
    return out


# ------------------------------------------------------------------------------- the model
def test_without_uncertainty_the_model_is_the_six_channel_one_and_with_it_the_same_plus_sigma():
    off, on = tiny(False), tiny(True)
    assert off.sigma_head is None and "sigma_scale" not in off.state_dict()
    extra = set(on.state_dict()) - set(off.state_dict())
    assert extra == {"sigma_head.weight", "sigma_head.bias", "sigma_scale"}
    for name, value in off.state_dict().items():  # the same initial draws: the sigma head is built last
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, on.state_dict()[name]), name
    x = frames()
    with torch.no_grad():
        a, b = off.eval()(x), on.eval()(x)
    assert a.shape == (2, 6, 16, 16) and b.shape == (2, 10, 16, 16)
    assert torch.equal(a, b[:, :6])
    assert (b[:, 6:] >= SIGMA_MIN).all()


@pytest.mark.parametrize("conditioning", ["next_scale", "single"])
def test_only_the_finest_map_carries_sigma_in_training(conditioning):
    m = tiny(True, conditioning=conditioning).train()
    outs = m(frames())
    want = [(2, 6, 4, 4), (2, 6, 8, 8), (2, 10, 16, 16)] if conditioning == "next_scale" else [(2, 10, 16, 16)]
    assert [tuple(o.shape) for o in outs] == want
    assert [tuple(o.shape) for o in m(frames(), n_active=2)] == want[:2]  # an inactive finest scale: no sigma


def test_the_calibration_scales_sigma_in_eval_mode_only():
    m = tiny(True)
    m.sigma_scale.copy_(torch.tensor([2.0, 3.0, 4.0, 5.0]))
    with torch.no_grad():
        raw = m.train()(frames())[-1][:, 6:]
        calibrated = m.eval()(frames())[:, 6:]
    assert torch.allclose(calibrated, raw * torch.tensor([2.0, 3.0, 4.0, 5.0]).view(1, 4, 1, 1), rtol=1e-6)


@pytest.mark.parametrize("saved,loaded", [(True, False), (False, True)])
def test_a_checkpoint_loads_only_into_a_model_with_the_same_uncertainty(saved, loaded):
    with pytest.raises(CheckpointError, match="VAR.model.uncertainty"):
        tiny(loaded).load_state_dict(tiny(saved).state_dict())


# ------------------------------------------------------------------------------- the loss
@given(st.floats(-3, 3), st.floats(-3, 3), st.floats(0.01, 5))
def test_the_nll_is_gaussian_minimal_at_the_error_and_leaves_the_value_alone(mu, t, sigma):
    out = torch.zeros(1, 10, 1, 2)
    out[0, 1:5] = mu
    out[0, 6:10] = sigma
    out[0, 1:5, 0, 1] = 1e30  # a cell without an emitter: nothing from it, however far off
    out.requires_grad_(True)
    tar = torch.zeros(1, 6, 1, 2)
    tar[0, 0, 0, 0] = 1.0
    tar[0, 1:5, 0, 0] = t
    nll = PPXYZBLoss.sigma_elementwise(out, tar)
    want = math.log(sigma) + (mu - t) ** 2 / (2 * sigma ** 2)
    assert torch.allclose(nll[0, 1:5, 0, 0], torch.tensor(want), rtol=1e-5, atol=1e-5)
    assert torch.equal(nll[0, :, 0, 1], torch.zeros(6)) and torch.equal(nll[0, [0, 5]], torch.zeros(2, 1, 2))
    nll.sum().backward()
    grad = out.grad[0, :, 0]
    assert torch.equal(out.grad[0, :6], torch.zeros(6, 1, 2))  # the value is detached
    assert torch.equal(grad[6:, 1], torch.zeros(4)) and torch.isfinite(grad).all()
    # d/dsigma = 1/sigma - e^2/sigma^3: negative below |e|, positive above, 0 at sigma = |e|
    d = 1 / sigma - (mu - t) ** 2 / sigma ** 3
    assert torch.allclose(grad[6:, 0], torch.tensor(d, dtype=torch.float32).expand(4), rtol=1e-4, atol=1e-4)


def test_the_sigma_term_leaves_the_six_channel_loss_and_its_gradient_as_they_are():
    shapes = [(4, 4), (8, 8), (16, 16)]
    tars = targets(shapes)
    wgts = [torch.rand(2, 6, *hw, generator=torch.Generator().manual_seed(3)) for hw in shapes]
    g = torch.Generator().manual_seed(4)
    outs = [torch.randn(2, 6, *hw, generator=g) for hw in shapes[:2]]
    finest = torch.cat([torch.randn(2, 6, 16, 16, generator=g), torch.rand(2, 4, 16, 16, generator=g) + 0.05], 1)
    loss = AdaptivePPXYZBLoss(n_scales=3, scale_schedule="none", uncertainty_weight=0.7)
    plain_finest = finest[:, :6].clone().requires_grad_(True)
    sigma_finest = finest.clone().requires_grad_(True)
    plain, with_sigma = loss(outs + [plain_finest], tars, wgts), loss(outs + [sigma_finest], tars, wgts)
    assert [s.sigma for s in with_sigma.scale_slices] == [False, False, False, True]
    total_p, comp_p = loss.log(plain)
    total_s, comp_s = loss.log(with_sigma)
    for ch in ("p", "phot", "x", "y", "z", "bg", "s0", "s1", "s2"):  # the adaptive weights see these
        assert comp_s[ch] == pytest.approx(comp_p[ch], rel=1e-5), ch
    nll = PPXYZBLoss.sigma_elementwise(finest, tars[-1]).mean()
    assert comp_s["sigma"] == pytest.approx(0.7 * float(nll), rel=1e-4) and "sigma" not in comp_p
    assert total_s == pytest.approx(float(with_sigma.detach().mean()), rel=1e-5)
    assert total_s == pytest.approx(total_p + comp_s["sigma"], rel=1e-5)
    plain.mean().backward()
    with_sigma.mean().backward()
    assert torch.allclose(sigma_finest.grad[:, :6], plain_finest.grad, rtol=1e-4, atol=1e-9)
    assert sigma_finest.grad[:, 6:].abs().sum() > 0


# ------------------------------------------------------------------------------- param, task, emitters, exports
def _param(tmp_path, factors=(0.5, 1.0, 2.0), **model):
    p = write_param(tmp_path, VAR={**TINY["VAR"], "scales": list(factors),
                                   "model": {**TINY["VAR"]["model"], "uncertainty": True, **model}})
    return load_param(p)


def test_the_param_refuses_an_uncertainty_nothing_can_train(tmp_path):
    with pytest.raises(ParamError, match="VAR.model.uncertainty must be true or false"):
        _param(tmp_path, uncertainty="yes")
    bad = write_param(tmp_path, VAR={**TINY["VAR"], "model": {**TINY["VAR"]["model"], "uncertainty": True}},
                      HyperParameter={**TINY["HyperParameter"], "loss_impl": "GaussianMMLoss"})
    with pytest.raises(ParamError, match="loss_impl AdaptivePPXYZB or PPXYZB"):
        load_param(bad)
    assert load_param(write_param(tmp_path)).VAR.model.uncertainty is False


def test_the_task_turns_network_sigmas_into_photons_px_and_nm(tmp_path):
    param = _param(tmp_path)  # the finest grid is 2x: a cell is 0.5 px
    task = build(param).task
    assert task.sigma and task.schedule.finest.cell_size == (0.5, 0.5)
    net = torch.rand(1, 10, 32, 32, generator=torch.Generator().manual_seed(0)) + 0.1
    phys = task.to_physical(net)
    sc = param.Scaling
    assert torch.allclose(phys[:, :6], task.rescale.inverse(net[:, :6], (0.5, 0.5)))
    want = net[:, 6:] * torch.tensor([sc.phot_max, 0.5, 0.5, sc.z_max]).view(1, 4, 1, 1)
    assert torch.allclose(phys[:, 6:], want)


def test_fitted_emitters_carry_the_maps_sigmas_into_the_exports(tmp_path):
    """One emitter painted into a physical 10-channel map of a 20 x 24 px frame (not the training size): the
    Predictor finds it with its sigmas, and Picasso's lpx / lpy and ThunderSTORM's uncertainty are those."""
    from decode_var.inference.predictor import Predictor  # the inference layer, above what the rest tests

    param = _param(tmp_path, factors=(0.25, 0.5, 1.0))
    torch.save(build(param).model.state_dict(), tmp_path / "model.pt")
    pred = Predictor(param, tmp_path / "model.pt")
    out = torch.zeros(1, 10, 20, 24)
    out[0, 0, 12, 17] = 1.0
    out[0, 1, 12, 17] = 3000.0
    out[0, 2:5, 12, 17] = torch.tensor([0.2, -0.3, 150.0])
    out[0, 5] = 50.0
    out[0, 6:, 12, 17] = torch.tensor([40.0, 0.05, 0.07, 30.0])  # phot_sig, x_sig, y_sig (px), z_sig (nm)
    em = pred.emitters(out, first_frame=3, frame_hw=(20, 24))
    assert len(em) == 1 and torch.allclose(em.xyz_px[0], torch.tensor([12.2, 16.7, 150.0]), atol=1e-4)
    assert torch.allclose(em.xyz_sig[0], torch.tensor([0.05, 0.07, 30.0])) and float(em.phot_sig[0]) == 40.0
    em.px_size = torch.tensor([100.0, 100.0])
    save_picasso(tmp_path / "p_locs.hdf5", em, (20, 24), 4, psf=CrlbModel.parse(param))
    with h5py.File(tmp_path / "p_locs.hdf5", "r") as f:
        locs = f["locs"][()]
    assert np.allclose([locs["lpx"][0], locs["lpy"][0], locs["lpz"][0]], [0.07, 0.05, 30.0], atol=1e-6)
    save_thunderstorm(tmp_path / "ts.csv", em, psf=CrlbModel.parse(param))
    with open(tmp_path / "ts.csv") as f:
        row = next(csv.DictReader(f))
    assert float(row["uncertainty_xy [nm]"]) == pytest.approx(math.sqrt((5.0 ** 2 + 7.0 ** 2) / 2), rel=1e-5)


def _em(sig_px, xy_unit="px"):
    sig = torch.as_tensor(sig_px, dtype=torch.float32)
    n = len(sig)
    xyz = torch.arange(3 * n, dtype=torch.float32).view(n, 3)
    if xy_unit == "nm":
        xyz, sig = xyz * torch.tensor([100.0, 100.0, 1.0]), sig * torch.tensor([100.0, 100.0, 1.0])
    return EmitterSet(xyz, torch.full((n,), 1000.0), torch.zeros(n, dtype=torch.long), xyz_sig=sig, xy_unit=xy_unit,
                      px_size=(100.0, 100.0))


@pytest.mark.parametrize("xy_unit", ["px", "nm"])
def test_max_sigma_keeps_the_localizations_within_it(xy_unit):
    em = _em([[0.1, 0.1, 20.0], [0.3, 0.4, 20.0], [0.2, 0.2, 900.0], [float("nan")] * 3], xy_unit)
    assert np.allclose(lateral_sigma_nm(em)[:3], [10.0, math.sqrt((30 ** 2 + 40 ** 2) / 2), 20.0])
    kept = filter_max_sigma(em, 25.0)
    assert torch.equal(kept.xyz, em.xyz[[0, 2]])  # lateral only; a row without sigma is dropped
    assert len(filter_max_sigma(em, 40.0)) == 3
    with pytest.raises(InputDataError, match="> 0"):
        filter_max_sigma(em, 0.0)
    no_sigma = EmitterSet(em.xyz, em.phot, em.frame_ix, xy_unit=xy_unit, px_size=(100.0, 100.0))
    with pytest.raises(InputDataError, match="VAR.model.uncertainty: true"):
        filter_max_sigma(no_sigma, 25.0)


def test_the_precision_render_blurs_each_localization_by_its_own_sigma():
    # two localizations far apart, 20 nm and 60 nm precision, rendered at 10 nm px
    em = _em([[0.2, 0.2, 0.0], [0.6, 0.6, 0.0]])
    em.xyz = torch.tensor([[5.0, 5.0, 0.0], [25.0, 25.0, 0.0]])
    r = render(em, (31, 31), mode="precision")
    assert r.density_HW.sum() == pytest.approx(2.0, rel=1e-6)
    widths = []
    for centre in (55, 255):  # render px of DECODE px 5 and 25
        patch = r.density_HW[centre - 40:centre + 40, centre - 40:centre + 40]
        rows = np.arange(patch.shape[0]) - 40 + 0.5  # render pixel centres relative to the localization
        widths.append(math.sqrt((patch.sum(1) * rows ** 2).sum() / patch.sum()))
    assert widths == pytest.approx([2.0, 6.0], rel=0.06)  # in render px: 20 nm and 60 nm (binned 10 % apart)
    same = render(_em([[0.4, 0.4, 0.0]]), (31, 31), mode="precision")
    assert same.sigma_nm == pytest.approx(40.0, rel=0.05)
    with pytest.raises(InputDataError, match="own precision"):
        render(EmitterSet(em.xyz, em.phot, em.frame_ix, px_size=(100.0, 100.0)), (31, 31), mode="precision")


# ------------------------------------------------------------------------------- calibration
def _pairs(err_scale, n=20000, seed=0):
    """Matched pairs whose errors are Gaussian with err_scale x the predicted sigma."""
    rng = np.random.default_rng(seed)
    sig = rng.uniform(0.05, 0.5, (n, 4)) * np.array([100.0, 1.0, 1.0, 100.0])
    err = rng.normal(size=(n, 4)) * sig * np.asarray(err_scale)
    truth = EmitterSet(torch.zeros(n, 3), torch.full((n,), 1000.0), torch.zeros(n, dtype=torch.long))
    found = EmitterSet(torch.from_numpy(err[:, 1:]).float(), torch.from_numpy(1000.0 + err[:, 0]).float(),
                       torch.zeros(n, dtype=torch.long), xyz_sig=torch.from_numpy(sig[:, 1:]).float(),
                       phot_sig=torch.from_numpy(sig[:, 0]).float())
    return found, truth


def test_coverage_of_honest_sigmas_is_one_sigma_and_the_scale_fixes_dishonest_ones():
    found, truth = _pairs([1.0, 1.0, 1.0, 1.0])
    cover = sigma_coverage(found, truth)
    assert cover["n_matched"] == 20000
    for ax in ("phot", "x", "y", "z"):  # binomial sd at n = 20000: 0.0033
        assert cover[f"cover_{ax}"] == pytest.approx(ONE_SIGMA, abs=0.013)
    found, truth = _pairs([0.5, 1.3, 2.0, 0.8], seed=1)
    scale = sigma_scale(found, truth)
    assert scale == pytest.approx([0.5, 1.3, 2.0, 0.8], rel=0.04)
    found.xyz_sig = found.xyz_sig * torch.tensor(scale[1:])
    found.phot_sig = found.phot_sig * scale[0]
    after = sigma_coverage(found, truth)
    assert [after[f"cover_{a}"] for a in ("phot", "x", "y", "z")] == pytest.approx([ONE_SIGMA] * 4, abs=1e-3)


def test_the_card_keeps_its_sigma_calibration(tmp_path):
    camera = camera_of(_param(tmp_path))
    update_card(tmp_path / "model.pt", camera)
    assert set(json.loads((tmp_path / "model_card.json").read_text())) == {"format", "camera", "precision"}
    rec = SigmaCalibration(1.1, 1.2, 1.3, 1.4, 0.6, 0.61, 0.62, 0.683, 0.683, 0.683, 500, 7)
    update_card(tmp_path / "model.pt", camera, sigma=rec)
    update_card(tmp_path / "model.pt", camera, {"ratio_x": 1.5, "ratio_y": 1.6, "ratio_z": 2.0, "ratio_lat": 1.55,
                                               "n_matched": 400}, epoch=8)  # the trainer's next save
    card = load_card(tmp_path / "model.pt")
    assert card.sigma == rec and card.sigma.scales() == (1.1, 1.2, 1.3, 1.4) and card.precision.epoch == 8


def _coverage_at(parts, density: float, n: int, seed: int) -> dict:
    """Share within +-1 sigma of the matched localizations of ``n`` test samples at ``density`` emitters / frame."""
    batch = parts.simulator_at(density).sample(n, seed)
    frames_NCHW = parts.frame_scale(batch.frames_NCHW)
    parts.model.eval()
    with torch.no_grad():
        out = torch.cat([parts.task.physical_output(frames_NCHW[i:i + 128]) for i in range(0, n, 128)])
    _, (tp, _, _, tp_match) = parts.protocol.score(parts.backend, parts.matcher, parts.task.postprocess(out),
                                                   parts.protocol.ground_truth(batch))
    return sigma_coverage(tp, tp_match)


@pytest.mark.slow
def test_a_trained_model_is_calibrated_at_a_low_and_a_high_density(tmp_path):
    """The issue's claim on a small model (24 x 24 px frames, 24 features, 24 epochs of 1,024 samples: 5 to 6 min
    on 2 shared cores) trained for 1 to 6 emitters per frame (0.17 to 1 per um^2, the quickstart's range): after
    the post-hoc calibration on held-out sets, 0.68 +- 0.05 of the matched localizations of the test sets at 1.5 and
    6 emitters per frame lie within +-1 sigma along x, y and z (measured: 0.65 to 0.70; with 16 features the
    dense end fell to 0.61: a weaker model's sigma follows crowding less, docs/models.md)."""
    size, epochs = 24, 24
    data = {"HyperParameter": {"epochs": epochs, "pseudo_ds_size": 1024, "batch_size": 16,
                               "learning_rate_scheduler": "cosine", "opt_param": {"lr": 0.001, "weight_decay": 0.0001},
                               "emitter_label_photon_min": 100.0, "channels_in": 3},
            "Hardware": {"torch_threads": 1}, "TestSet": {"test_size": 256}, "PostProcessing": "SpatialIntegration",
            "InOut": {"experiment_out": str(tmp_path / "out")},
            "Simulation": {"img_size": [size, size], "psf_extent": [[-0.5, size - 0.5], [-0.5, size - 0.5], None],
                           "emitter_extent": [[-0.5, size - 0.5], [-0.5, size - 0.5], [-750, 750]],
                           "emitter_av": [1.0, 6.0], "intensity_mu_sig": [7000.0, 3000.0], "bg_uniform": [20.0, 200.0],
                           "lifetime_avg": 1.0},
            "VAR": {"backend": "builtin", "scales": [0.25, 0.5, 1.0], "psf": "gaussian",
                    "gaussian_psf": {"sigma_0": 1.0, "foc_shift": 250.0, "rl_range": 280.0, "mode_3d": True},
                    "model": {"features": 24, "token_dim": 48, "depth": 1, "heads": 2, "uncertainty": True},
                    "teacher_forcing": {"start": 1.0, "end": 0.0, "epochs": epochs // 2},
                    "loss": {"uncertainty_weight": 1.0, "adaptive_interval": 4, "adaptive_window": 2,
                             "warmup_epochs": epochs // 2},
                    "train": {"plot": False, "warmup_epochs": 1}}}
    (tmp_path / "param.yaml").write_text(yaml.safe_dump(data))
    trainer = train(tmp_path / "param.yaml", log_comment="sigma", progress=False)
    record = calibrate_sigma(trainer.parts)
    assert record.n_matched > 5000 and record.densities == [1.0, 6.0]
    assert torch.equal(trainer.model.sigma_scale, torch.tensor(record.scales()))
    test_seed = derive_seed(trainer.param.VAR.test_seed, 0)  # the protocol's test set seed, not the held-out ones
    for density in (1.5, 6.0):
        cover = _coverage_at(trainer.parts, density, 1024, test_seed)
        assert cover["n_matched"] > 1000, cover
        for ax in ("x", "y", "z"):
            assert abs(cover[f"cover_{ax}"] - 0.68) <= 0.05, (density, cover)


def test_training_ends_with_the_sigma_calibration_in_the_model_and_its_card(tmp_path):
    """decode-var-train calibrates a model with uncertainty once its epochs are done: ``sigma_scale`` of
    ``model.pt`` is the card's record; a second call of ``fit`` with nothing left to train leaves both alone."""
    p = write_param(tmp_path, VAR={**TINY["VAR"], "model": {**TINY["VAR"]["model"], "uncertainty": True}},
                    HyperParameter={**TINY["HyperParameter"], "epochs": 1})
    trainer = train(p, log_comment="calib", progress=False)
    card = load_card(trainer.exp_dir / "model.pt")
    assert card.sigma is not None and card.sigma.epoch == 1
    saved = torch.load(trainer.exp_dir / "model.pt", weights_only=True)
    assert torch.allclose(saved["sigma_scale"], torch.tensor(card.sigma.scales(), dtype=saved["sigma_scale"].dtype))
    before = (trainer.exp_dir / "model.pt").read_bytes()
    trainer.fit()
    assert (trainer.exp_dir / "model.pt").read_bytes() == before


def test_decode_var_fit_max_sigma_filters_and_a_model_without_sigma_is_refused_before_the_fit(tmp_path, capsys):
    """``decode-var-fit --max-sigma NM``: the written file holds only localizations whose lateral sigma is at most
    NM (an untrained uncertainty model whose finest p bias is raised detects many cells, all with a sigma); a
    6-channel model is refused before anything is fitted or written."""
    from decode_var.data.emitter_io import load_emitters
    from decode_var.fit import main as fit_main
    from decode_var.training.checkpoint import save_model

    frames_THW = (100 + 30 * torch.rand(4, 32, 32, generator=torch.Generator().manual_seed(0))).round()
    tifffile = pytest.importorskip("tifffile")
    tifffile.imwrite(tmp_path / "s.tif", frames_THW.numpy().astype(np.uint16), photometric="minisblack")
    for sigma in (True, False):
        p = write_param(tmp_path / f"p{sigma}", VAR={**TINY["VAR"], "model": {**TINY["VAR"]["model"], "uncertainty": sigma}})
        param = load_param(p)
        model = build(param).model
        model.heads[-1].bias.data[0] += 8.0
        save_model(tmp_path / f"m{sigma}.pt", model)
        common = ["-p", str(p), "--model", str(tmp_path / f"m{sigma}.pt"), "--frames", str(tmp_path / "s.tif"),
                  "--no-render", "--no-progress"]
        if not sigma:
            assert fit_main(common + ["--out", str(tmp_path / "no.csv"), "--max-sigma", "20"]) == 2
            assert "predicts none" in capsys.readouterr().err and not (tmp_path / "no.csv").exists()
            continue
        assert fit_main(common + ["--out", str(tmp_path / "all.csv")]) == 0
        every = load_emitters(tmp_path / "all.csv")
        lat = lateral_sigma_nm(every, param.Camera.px_size)
        cut = float(np.median(lat))
        assert fit_main(common + ["--out", str(tmp_path / "cut.csv"), "--max-sigma", str(cut)]) == 0
        kept = load_emitters(tmp_path / "cut.csv")
        assert 0 < len(kept) < len(every) and int((lat <= cut).sum()) == len(kept)
        assert (lateral_sigma_nm(kept, param.Camera.px_size) <= cut).all()
