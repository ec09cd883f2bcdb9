"""decode-var-run: init, training for a wall-clock budget and the fit in one command, continued where it stopped."""
import json

import numpy as np
import tifffile
import torch
import yaml

from decode_var import run_cli
from decode_var.data.emitter_io import load_emitters
from test_init import SCMOS, known, simulate


def _movie(tmp_path, n=60, size=40):
    _, movie = simulate(SCMOS, {"sigma_0": 1.3, "mode_3d": False}, n=n, size=size, av=4.0, seed=3)
    tif = tmp_path / "movie.tif"
    tifffile.imwrite(tif, movie.adu_THW.clamp(0, 65535).round().numpy().astype(np.uint16))
    k = known(SCMOS, False, 130.0)
    # a small network and short epochs, so that a one-minute budget trains a few of them on two shared cores
    k.update(HyperParameter={"pseudo_ds_size": 64, "batch_size": 16}, TestSet={"test_size": 16},
             VAR={**k["VAR"], "model": {"features": 8, "token_dim": 16, "depth": 1, "heads": 2},
                  "train": {"plot": False}})
    (tmp_path / "known.yaml").write_text(yaml.safe_dump(k))
    return tif, tmp_path / "known.yaml"


def test_one_command_from_a_movie_to_localizations_and_again_without_redoing_anything(tmp_path, capsys):
    tif, known_yaml = _movie(tmp_path)
    out = tmp_path / "run"
    argv = ["--frames", str(tif), "--param", str(known_yaml), "--out", str(out), "--minutes", "1",
            "--format", "decode", "picasso", "--no-progress"]
    assert run_cli.main(argv) == 0
    err = capsys.readouterr().err
    for stage in ("[1/3] param: estimating", "[2/3] model: training for 1 min", "[3/3] localizations: fitting"):
        assert stage in err, err
    exp = json.loads((out / "train" / "done.json").read_text())["experiment"]
    assert (out / "param.yaml").exists() and (out / "param_report.png").exists()
    em = load_emitters(out / "emitters.h5")  # a one-minute model on a loaded machine may still find nothing
    assert len(em) == 0 or int(em.frame_ix.max()) < 60
    assert (out / "emitters_locs.hdf5").exists() and (out / "emitters_locs.yaml").exists()
    model_bytes = open(f"{exp}/model.pt", "rb").read()
    emitter_bytes = (out / "emitters.h5").read_bytes()

    assert run_cli.main(argv) == 0  # everything finished: reused, nothing trained or fitted again
    err = capsys.readouterr().err
    assert "[1/3] param: reusing" in err and "[2/3] model: reusing" in err and "[3/3] localizations: reusing" in err
    assert open(f"{exp}/model.pt", "rb").read() == model_bytes
    assert (out / "emitters.h5").read_bytes() == emitter_bytes


def test_a_stopped_training_is_resumed_and_bad_arguments_are_refused(tmp_path, capsys, monkeypatch):
    tif, known_yaml = _movie(tmp_path, n=30)
    out = tmp_path / "run"
    calls = []

    def fake_train(param, **kw):
        calls.append(kw["overrides"]["InOut"])
        raise KeyboardInterrupt

    monkeypatch.setattr(run_cli, "train", fake_train)
    (out / "train" / "2026_x").mkdir(parents=True)
    torch.save({}, out / "train" / "2026_x" / "ckpt.pt")  # a training stopped earlier left its checkpoint
    argv = ["--frames", str(tif), "--param", str(known_yaml), "--out", str(out), "--minutes", "2"]
    assert run_cli.main(argv) == 130
    assert calls == [{"experiment_out": str(out / "train"), "checkpoint_init": str(out / "train" / "2026_x" / "ckpt.pt")}]
    assert (out / "param.yaml").exists()  # the finished stage's file is kept
    assert run_cli.main(argv[:-1] + ["0"]) == 2
    assert "--minutes 0" in capsys.readouterr().err
    (tmp_path / "afile").write_text("x")
    assert run_cli.main(argv[:5] + [str(tmp_path / "afile")] + argv[6:]) == 2
