"""End-to-end training through the entrypoint (tiny sizes), resume, registry errors."""
import dataclasses
import json
from pathlib import Path

import pytest
import torch
import yaml

from decode_var.core.errors import ParamError
from decode_var.train import main as train_main, train

TINY = {
    "HyperParameter": {"epochs": 2, "pseudo_ds_size": 32, "batch_size": 8},
    "TestSet": {"test_size": 16},
    "Simulation": {"img_size": [16, 16], "psf_extent": [[-0.5, 15.5], [-0.5, 15.5], None],
                   "emitter_extent": [[-0.5, 15.5], [-0.5, 15.5], [-750, 750]], "emitter_av": 2.0},
    "TestSet_": None,
    "VAR": {"backend": "builtin", "scales": [0.25, 0.5, 1.0],
            "model": {"features": 8, "token_dim": 16, "depth": 1, "heads": 2},
            "teacher_forcing": {"start": 1.0, "end": 0.0, "epochs": 2},
            "loss": {"adaptive_interval": 2, "adaptive_window": 1, "warmup_epochs": 2},
            "train": {"plot": False}},
}


def write_param(tmp_path: Path, **over) -> Path:
    data = json.loads(json.dumps(TINY))
    data.pop("TestSet_")
    data["InOut"] = {"experiment_out": str(tmp_path / "out")}
    for section, values in over.items():
        data.setdefault(section, {})
        if isinstance(values, dict):
            data[section].update(values)
        else:
            data[section] = values
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "param.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_tiny_training_run_writes_decode_layout(tmp_path, capsys):
    # num_worker_train: 4 as in DECODE's reference param: accepted, and said to do nothing
    p = write_param(tmp_path, VAR={**TINY["VAR"], "train": {"plot": True}}, Hardware={"num_worker_train": 4})
    trainer = train(p, log_comment="tiny", progress=False)
    assert "Hardware.num_worker_train = 4 is ignored" in capsys.readouterr().err
    exp = trainer.exp_dir
    for name in ("param_run_in.yaml", "param_run.yaml", "model.pt", "ckpt.pt", "history.json",
                 "training_curves.png"):
        assert (exp / name).is_file(), name
    hist = json.loads((exp / "history.json").read_text())
    assert len(hist) == 2
    assert all(torch.isfinite(torch.tensor(h["train_loss"])) for h in hist)
    assert {"jac", "rmse_lat", "effcy_lat"} <= set(hist[-1]["metrics"])
    assert len(hist[-1]["channel_weights"]) == 6 and hist[-1]["active_scales"] >= 1
    assert hist[0]["teacher_forcing"] == 1.0 and hist[1]["teacher_forcing"] == 0.5
    # model.pt is a plain state dict that loads without unpickling code
    state = torch.load(exp / "model.pt", weights_only=True)
    assert all(isinstance(v, torch.Tensor) or k.endswith("_extra_state") for k, v in state.items())


def _final_weights(exp: Path):
    return torch.load(exp / "model.pt", weights_only=True)


def test_resume_2_plus_2_equals_4(tmp_path):
    var = {**TINY["VAR"], "teacher_forcing": {"start": 0.9, "end": 0.1, "epochs": 4}}  # coins matter every epoch
    straight = train(write_param(tmp_path / "a", HyperParameter={**TINY["HyperParameter"], "epochs": 4}, VAR=var),
                     log_comment="straight", progress=False)
    first = train(write_param(tmp_path / "b", HyperParameter={**TINY["HyperParameter"], "epochs": 4}, VAR=var),
                  log_comment="half", progress=False, overrides={"HyperParameter": {"epochs": 2}})
    resumed = train(first.exp_dir / "param_run.yaml", progress=False,
                    overrides={"InOut": {"checkpoint_init": str(first.exp_dir / "ckpt.pt")},
                               "HyperParameter": {"epochs": 4}})
    assert resumed.exp_dir == first.exp_dir and resumed.epoch == 4
    a, b = _final_weights(straight.exp_dir), _final_weights(resumed.exp_dir)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k] for k in a)
    assert straight.loss.state_dict() == resumed.loss.state_dict()
    # the first run's param copies are kept
    assert (first.exp_dir / "param_run_in.yaml").is_file() and (first.exp_dir / "param_resume_in.yaml").is_file()


def test_prefetched_batches_train_the_same_weights(tmp_path):
    """VAR.train.prefetch makes each batch in a thread during the previous step; the run is the same bit
    for bit (the simulator never draws from the global RNG that the step uses)."""
    var = {**TINY["VAR"], "teacher_forcing": {"start": 0.9, "end": 0.1, "epochs": 4}}
    runs = {}
    for prefetch in (False, True):
        v = {**var, "train": {"plot": False, "prefetch": prefetch}}
        runs[prefetch] = train(write_param(tmp_path / str(prefetch), VAR=v), log_comment=str(prefetch),
                               progress=False)
        assert runs[prefetch].prefetch is prefetch
    a, b = _final_weights(runs[False].exp_dir), _final_weights(runs[True].exp_dir)
    assert all(torch.equal(a[k], b[k]) for k in a if isinstance(a[k], torch.Tensor))
    strip = [[{k: v for k, v in e.items() if k != "seconds"} for e in r.history] for r in runs.values()]
    assert json.dumps(strip[0]) == json.dumps(strip[1])  # losses, metrics (NaN where nothing was found), weights
    import threading

    assert not [t for t in threading.enumerate() if t.name.startswith("decode-var-prefetch")]


def test_prefetch_auto_is_off_on_the_cpu_and_never_with_a_global_rng_camera(tmp_path):
    from decode_var.config.param import load_param
    from decode_var.training.trainer import Trainer

    param = load_param(write_param(tmp_path))
    assert param.VAR.train.prefetch == "auto"
    tr = Trainer(param, None, log=False, progress=False)
    assert tr.prefetch is False  # auto: on for a GPU only
    tr.settings = dataclasses.replace(tr.settings, prefetch=True)  # VAR.train.prefetch: true
    assert tr.prefetch is True
    tr.simulator.camera = object()  # a camera from outside (DECODE's draws from the global RNG)
    assert tr.simulator.thread_safe is False and tr.prefetch is False
    with pytest.raises(ParamError, match="VAR.train.prefetch must be auto, true or false"):
        load_param(write_param(tmp_path / "bad", VAR={**TINY["VAR"], "train": {"prefetch": "yes"}}))


def test_unknown_architecture_lists_names(tmp_path, capsys):
    p = write_param(tmp_path, HyperParameter={**TINY["HyperParameter"], "architecture": "VARMultiscale"})
    with pytest.raises(ParamError, match=r"Did you mean 'VARMultiScale'.*Known models: .*VARMultiScale"):
        train(p, progress=False)
    assert train_main(["-p", str(p), "--no-progress"]) == 2
    assert "Known models" in capsys.readouterr().err


def test_unknown_loss_lists_names(tmp_path):
    p = write_param(tmp_path, HyperParameter={**TINY["HyperParameter"], "loss_impl": "MixtureModel"})
    with pytest.raises(ParamError, match=r"Known losses: .*AdaptivePPXYZB.*PPXYZB"):
        train(p, progress=False)


def test_missing_calibration_points_to_gaussian(tmp_path, capsys):
    p = write_param(tmp_path, VAR={**TINY["VAR"], "psf": "spline"}, InOut={"calibration_file": None})
    assert train_main(["-p", str(p), "--no-progress"]) == 2
    assert "VAR.psf: gaussian" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_existing_experiment_is_never_overwritten(tmp_path, monkeypatch):
    import datetime as _dt

    from decode_var.core.errors import DecodeVarError
    import decode_var.train as tr

    class Frozen(_dt.datetime):
        @classmethod
        def now(cls, tz=None):
            return cls(2026, 1, 1, 12, 0, 0)

    monkeypatch.setattr(tr.datetime, "datetime", Frozen)
    p = write_param(tmp_path)
    t = train(p, log_comment="same", progress=False)
    before = (t.exp_dir / "model.pt").read_bytes()
    with pytest.raises(DecodeVarError, match="exists already"):
        train(p, log_comment="same", progress=False)
    assert (t.exp_dir / "model.pt").read_bytes() == before


@pytest.mark.decode
def test_register_with_decode():
    import decode.neuralfitter.loss
    import decode.neuralfitter.models

    import decode_var
    from decode_var.registry import get_loss, get_model

    decodes_own = decode.neuralfitter.loss.PPXYZBLoss
    assert decodes_own.__module__ == "decode.neuralfitter.loss"
    decode_var.register_with_decode()
    assert decode.neuralfitter.models.VARMultiScale is get_model("VARMultiScale")
    assert decode.neuralfitter.loss.AdaptivePPXYZB is get_loss("AdaptivePPXYZB")
    assert decode.neuralfitter.loss.PPXYZB is get_loss("PPXYZB")
    # a plugin never replaces its host's classes: DECODE's PPXYZBLoss stays DECODE's
    assert decode.neuralfitter.loss.PPXYZBLoss is decodes_own
    assert decode.neuralfitter.loss.PPXYZBLoss is not get_loss("PPXYZB")


@pytest.mark.decode
def test_tiny_training_through_decode_backend(tmp_path):
    p = write_param(tmp_path, VAR={**TINY["VAR"], "backend": "decode"})
    trainer = train(p, log_comment="dec", progress=False)
    assert trainer.backend.name == "decode"
    assert (trainer.exp_dir / "model.pt").is_file()


@pytest.mark.parametrize("grad_mod, grad_clip, expected", [(True, 1.0, 0.03), (False, 0.5, 0.5), (None, 0.5, 0.5),
                                                           (None, 0.0, float("inf"))])
def test_grad_mod_clips_like_decode(tmp_path, monkeypatch, grad_mod, grad_clip, expected):
    """HyperParameter.grad_mod: true is DECODE's clip_grad_norm_(max_norm=0.03); otherwise VAR.train.grad_clip."""
    seen = []
    real = torch.nn.utils.clip_grad_norm_

    def spy(params, max_norm, *a, **k):
        seen.append(max_norm)
        return real(params, max_norm, *a, **k)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy)
    hp = {**TINY["HyperParameter"], "epochs": 1, "grad_mod": grad_mod}
    p = write_param(tmp_path, HyperParameter=hp, VAR={**TINY["VAR"], "train": {"plot": False, "grad_clip": grad_clip}})
    train(p, progress=False, no_log=True)
    assert seen and all(m == expected for m in seen)


@pytest.mark.parametrize("hp, needle", [({"grad_mod": "yes"}, "HyperParameter.grad_mod"),
                                        ({"moeller_gradient_rescale": True}, "moeller_gradient_rescale")])
def test_unsupported_gradient_flags_are_refused(tmp_path, hp, needle):
    p = write_param(tmp_path, HyperParameter={**TINY["HyperParameter"], **hp})
    with pytest.raises(ParamError, match=needle):
        train(p, progress=False, no_log=True)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


@pytest.mark.parametrize("world, local, expect", [
    ("1", "1", None),
    ("4", "4", ["torchrun", "--nproc_per_node=4", "-m", "decode_var.train"]),
    ("8", "4", ["torchrun", "--nnodes=2", "--nproc_per_node=4", "-m", "decode_var.train"]),
])
def test_resume_hint_repeats_the_launcher(tmp_path, monkeypatch, world, local, expect):
    """A run stopped under torchrun is resumed under torchrun with the same process layout."""
    import shlex
    from types import SimpleNamespace

    from decode_var.train import _resume_hint, parse_args

    exp = tmp_path / "exp"
    exp.mkdir()
    (exp / "ckpt.pt").write_bytes(b"x")
    monkeypatch.setenv("WORLD_SIZE", world)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", local)
    monkeypatch.setattr("sys.argv", ["/usr/bin/decode-var-train"])
    hint = _resume_hint(parse_args(["-p", "p.yaml", "-i", "cpu"]), SimpleNamespace(exp_dir=exp))
    cmd = shlex.split(hint.splitlines()[1])
    tail = ["-p", str(exp / "param_run.yaml"), "--resume", str(exp / "ckpt.pt"), "-i", "cpu"]
    assert cmd == (expect or ["decode-var-train"]) + tail
    assert ("on every machine" in hint) == (expect is not None and "--nnodes=2" in expect)


def test_resume_rewrites_log_files_left_behind_by_a_kill(tmp_path):
    """A kill between ckpt.pt and history.json / the plot leaves them an epoch behind; resuming (even a
    complete run) rewrites them from the checkpoint's history."""
    p = write_param(tmp_path, VAR={**TINY["VAR"], "train": {"plot": True}})
    exp = train(p, log_comment="k", progress=False, no_log=True).exp_dir
    full = json.loads((exp / "history.json").read_text())
    (exp / "history.json").write_text(json.dumps(full[:1]))  # as if killed before the last log write
    (exp / "training_curves.png").unlink()
    train(exp / "param_run.yaml", progress=False, no_log=True,
          overrides={"InOut": {"checkpoint_init": str(exp / "ckpt.pt")}})
    assert json.loads((exp / "history.json").read_text()) == full
    assert (exp / "training_curves.png").is_file()


@pytest.mark.decode
def test_sigmamunet_step_matches_decode_training_loop():
    """One step of SigmaMUNet + GaussianMMLoss with HyperParameter.grad_mod through decode-var's engine gives
    the weights of DECODE's own train_val_impl.train on the same batch (same loss, clipping, optimiser)."""
    import copy
    from types import SimpleNamespace

    from decode.neuralfitter import train_val_impl

    from decode_var.training.trainer import Trainer
    from decode_var.config.param import param_from_dict

    data = json.loads(json.dumps(TINY))
    data.pop("TestSet_")
    data["HyperParameter"] = {"architecture": "SigmaMUNet", "loss_impl": "GaussianMMLoss", "channels_out": 10,
                              "epochs": 1, "pseudo_ds_size": 8, "batch_size": 8, "grad_mod": True,
                              "max_number_targets": 16, "optimizer": "AdamW",
                              "opt_param": {"lr": 2e-4, "weight_decay": 0.1},
                              "learning_rate_scheduler": "StepLR",
                              "learning_rate_scheduler_param": {"step_size": 100, "gamma": 1.0},
                              "arch_param": {"depth_shared": 1, "depth_union": 1, "initial_features": 8,
                                             "inter_features": 8, "activation": "ELU", "init_custom": True,
                                             "pool_mode": "StrideConv", "upsample_mode": "nearest",
                                             **dict.fromkeys(("norm", "norm_groups", "norm_head", "norm_head_groups",
                                                              "skip_gn_level", "use_last_nl"))}}
    data["VAR"] = {"backend": "decode", "scales": [1.0], "train": {"plot": False, "warmup_epochs": 0}}
    tr = Trainer(param_from_dict(data), None, log=False, progress=False)
    ref_model, init = copy.deepcopy(tr.model), copy.deepcopy(tr.model.state_dict())
    ref_opt = torch.optim.AdamW(ref_model.parameters(), lr=2e-4, weight_decay=0.1)
    _, frames, tgt = tr.batch(8, tr.step_data_seed(0))  # the batch the engine's step 0 draws

    tr.train_epoch()
    logger = SimpleNamespace(add_scalar=lambda *a, **k: None)
    train_val_impl.train(ref_model, ref_opt, tr.loss, [(frames, list(tgt), None)], grad_rescale=False,
                         grad_mod=True, epoch=0, device="cpu", logger=logger)
    after, ref = tr.model.state_dict(), ref_model.state_dict()
    assert any(not torch.equal(after[k], init[k]) for k in init)  # the step did move the weights
    for name in after:
        assert torch.equal(after[name], ref[name]), name


@pytest.mark.parametrize("workers", ["1", "2", "-1"])
def test_worker_flag_other_than_0_is_refused_naming_why(tmp_path, capsys, workers):
    p = write_param(tmp_path)
    assert train_main(["-p", str(p), "-w", workers, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"-w {workers} (Hardware.num_worker_train) is not implemented" in err
    assert "bit for bit" in err and "Leave out -w" in err
    assert not (tmp_path / "out").exists()  # refused before anything was written
