import copy

import pytest
import torch
import yaml

from decode_var.core.emitters import EmitterSet
from decode_var.core.errors import ParamError
from decode_var.config.param import ParamKeyError, load_param, load_reference, param_from_dict, save_param
from decode_var.data.emitter_io import save_emitters
from decode_var.render_cli import render_main


def test_defaults_filled_and_scaling_derived_like_decode():
    p = param_from_dict({"Simulation": {"intensity_mu_sig": [5000.0, 1000.0], "bg_uniform": [10.0, 30.0]}})
    assert p.Scaling.input_scale == 100.0  # mu / 50
    assert p.Scaling.phot_max == 13000.0  # mu + 8 sigma
    assert p.Scaling.input_offset == 20.0  # bg mean
    assert p.Scaling.bg_max == 36.0  # 1.2 * upper bg
    assert p.Scaling.z_max == 900.0  # 1.2 * upper z
    assert p.HyperParameter.architecture == "VARMultiScale"
    assert p.VAR.loss.pos_weight == 2.0


def test_unknown_decode_keys_are_kept_and_round_trip(tmp_path):
    p = param_from_dict({"HyperParameter": {"some_decode_key": 3}, "Extra": {"a": 1}})
    assert p.HyperParameter.some_decode_key == 3 and p.Extra.a == 1
    save_param(tmp_path / "p.yaml", p)
    assert load_param(tmp_path / "p.yaml") == p


def _leaves(data: dict, path=()):
    for k, v in data.items():
        if isinstance(v, dict):
            yield from _leaves(v, path + (k,))
        else:
            yield path + (k,), v


def test_reference_param_files_load():
    """Every shipped param file loads, and every value it sets is read back unchanged (nulls may be filled)."""
    from pathlib import Path

    files = sorted((Path(__file__).parents[1] / "param").glob("*.yaml"))
    names = {f.name for f in files}
    assert {"reference.yaml", "var_quickstart.yaml", "var_spline.yaml", "sigmamunet_decode.yaml"} <= names, names
    for f in files:
        loaded = load_param(f).to_dict()
        leaves = [(path, v) for path, v in _leaves(yaml.safe_load(f.read_text())) if v is not None]
        assert len(leaves) > 20, f
        for path, value in leaves:
            got = loaded
            for k in path:
                got = got[k]
            assert got == value, (f.name, ".".join(path), value, got)


@pytest.mark.parametrize("data,match", [
    ({"VAR": {"scale": [1.0]}}, r"Unknown key VAR.scale. Did you mean 'scales'"),
    ({"VAR": {"loss": {"pos_weigth": 1.0}}}, r"VAR.loss.pos_weigth. Did you mean 'pos_weight'"),
    ({"VAR": {"scales": [0.3, 1.0]}, "Simulation": {"img_size": [40, 64]}}, r"does not fit Simulation.img_size"),
    ({"HyperParameter": {"channels_out": 5}}, r"channels_out must be 6"),
    ({"Simulation": {"intensity_mu_sig": [-10.0, 1.0]}}, r"intensity_mu_sig.*Negative photons"),
    ({"Simulation": {"emitter_extent": [[-0.5, 39.5], [39.5, -0.5], [-750, 750]]}}, r"emitter_extent \(y\)"),
    ({"Simulation": {"bg_uniform": [-5.0, 10.0]}}, r"bg_uniform must be >= 0"),
    ({"Simulation": {"img_size": "big"}}, r"Simulation.img_size must be a list"),
    ({"HyperParameter": {"batch_size": 0}}, r"batch_size must be an integer >= 1"),
    ({"HyperParameter": {"channels_in": 2}}, r"channels_in must be 1 or 3"),
    ({"VAR": {"backend": "gpu"}}, r"VAR.backend must be auto, decode or builtin"),
    ({"VAR": {"psf": "spline"}}, r"calibration_file is empty.*VAR.psf: gaussian"),
    ({"HyperParameter": {"learning_rate_scheduler": "cosin"}}, r"Did you mean 'cosine'"),
    ({"Camera": "x"}, r"Camera must be a section"),
])
def test_bad_values_name_key_and_fix(data, match):
    with pytest.raises(ParamError, match=match):
        param_from_dict(data)


def test_unreadable_files(tmp_path):
    with pytest.raises(ParamError, match="does not exist"):
        load_param(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("Simulation:\n  img_size: [40, 40\n")
    with pytest.raises(ParamError, match="not valid YAML at line"):
        load_param(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    with pytest.raises(ParamError, match="must hold sections"):
        load_param(scalar)
    wrong_ext = tmp_path / "p.txt"
    wrong_ext.write_text("{}")
    with pytest.raises(ParamError, match=".yaml"):
        load_param(wrong_ext)


def test_missing_key_access_is_a_param_error_and_attribute_error():
    p = param_from_dict({})
    with pytest.raises(ParamKeyError, match="HyperParameter has no key 'nope'"):
        p.HyperParameter.nope
    assert getattr(p.HyperParameter, "nope", 7) == 7


def test_reference_is_complete_for_var():
    ref = load_reference()
    assert {"backend", "scales", "model", "loss", "train", "teacher_forcing"} <= set(ref["VAR"])
    # the reference itself must validate
    param_from_dict(copy.deepcopy(ref))
    yaml.safe_dump(ref)


@pytest.mark.parametrize("section, key", [(None, "__dict__"), (None, "_path"), ("Camera", "_path"),
                                          ("HyperParameter", "keys"), ("Simulation", "to_dict"), ("Camera", 3)])
def test_reserved_or_non_text_keys_are_refused(section, key):
    """Found by the param fuzzer: such keys used to raise a bare TypeError from the namespace."""
    data = {"Camera": {"px_size": [100.0, 100.0]}}
    (data if section is None else data.setdefault(section, {}))[key] = {"a": 1} if section is None else 1
    with pytest.raises(ParamError, match="Param key"):
        param_from_dict(data)


# ------------------------------------------------------------------ a param that means what the user wrote (issue 27)
def _warnings(err: str, key: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("[decode-var]") and f" {key} " in line]


def test_misspelt_key_of_a_decode_section_warns_once_with_did_you_mean(tmp_path, capsys):
    f = tmp_path / "p.yaml"
    f.write_text("Camera:\n  basline: 120.0\nHyperParameter:\n  bach_size: 8\n  auto_restart_param: {num_restarts: 1}\n"
                 "Hardware:\n  torch_multiprocessing_sharing_strategy: file_system\nCameraPreset:\nExtra:\n  a: 1\n")
    first = load_param(f)
    load_param(f)  # decode-var-fit loads its param twice (frames, then the exports): still one warning per key
    err = capsys.readouterr().err
    camera = _warnings(err, "Camera.basline")
    assert len(camera) == 1 and "Did you mean 'baseline'?" in camera[0]
    assert len(_warnings(err, "HyperParameter.bach_size")) == 1 and "Did you mean 'batch_size'?" in err
    # DECODE 0.10.2's own keys and unknown sections are tolerated silently, as DECODE does
    assert "auto_restart_param" not in err and "torch_multiprocessing" not in err and "Extra" not in err
    assert err.count("[decode-var]") == 2
    assert first.Camera.baseline == 100.0 and first.Camera.basline == 120.0  # kept, default in effect


def test_a_cli_warns_about_a_misspelt_key_and_refuses_an_empty_param(tmp_path, capsys):
    src = tmp_path / "fit.csv"
    save_emitters(src, EmitterSet(torch.tensor([[3.0, 4.0, 10.0]]), torch.full((1,), 1000.0),
                                  torch.zeros(1, dtype=torch.long), px_size=(100.0, 100.0)))
    p = tmp_path / "p.yaml"
    p.write_text("Camera:\n  px_sise: [80.0, 80.0]\n")
    assert render_main([str(src), "--frame-size", "8", "8", "-p", str(p)]) == 0
    assert len(_warnings(capsys.readouterr().err, "Camera.px_sise")) == 1
    p.write_text("# nothing here yet\n")
    assert render_main([str(src), "--frame-size", "8", "8", "-p", str(p)]) == 2
    assert f"param file {p} is empty" in capsys.readouterr().err.lower()


@pytest.mark.parametrize("text,key,lines", [
    ("Camera:\n  baseline: 100.0\n  qe: 0.9\n  baseline: 120.0\n", "Camera.baseline", (2, 4)),
    ("VAR:\n  model:\n    depth: 2\n    heads: 2\n    depth: 4\n", "VAR.model.depth", (3, 5)),
    ("Camera:\n  qe: 0.9\nSimulation:\n  emitter_av: 5.0\nCamera:\n  baseline: 1.0\n", "Camera", (1, 5)),
    ('{"Hardware": {"device": "cpu", "device": "cuda"}}', "Hardware.device", (1, 1)),
])
def test_a_key_given_twice_is_an_error_naming_key_and_lines(tmp_path, text, key, lines):
    f = tmp_path / ("p.json" if text.startswith("{") else "p.yaml")
    f.write_text(text)
    with pytest.raises(ParamError, match=rf"gives the key {key} twice \(line {lines[0]} and line {lines[1]}\)"):
        load_param(f)


def test_a_name_in_two_sections_or_a_yaml_merge_is_no_duplicate_but_a_repeat_after_it_is(tmp_path):
    f = tmp_path / "p.yaml"
    text = ("Simulation:\n  img_size: &size [32, 32]\n  psf_extent: &ext [[-0.5, 31.5], [-0.5, 31.5], null]\n"
            "  emitter_extent: [[-0.5, 31.5], [-0.5, 31.5], [-750, 750]]\n"
            "TestSet:\n  img_size: *size\n  frame_extent: *ext\n"
            "VAR:\n  model: {depth: 1, heads: 2}\n  teacher_forcing:\n    <<: {start: 0.5, end: 0.1}\n    end: 0.2\n")
    f.write_text(text)
    p = load_param(f)
    assert p.TestSet.img_size == [32, 32] and p.VAR.teacher_forcing.end == 0.2 and p.VAR.teacher_forcing.start == 0.5
    f.write_text(text + "    end: 0.3\n")
    with pytest.raises(ParamError, match=r"VAR.teacher_forcing.end twice \(line 12 and line 13\)"):
        load_param(f)


@pytest.mark.parametrize("text", ["", "\n\n", "# only comments\n# here\n", "null\n", "~\n", "{}\n"])
def test_an_empty_param_file_is_an_error(tmp_path, text):
    f = tmp_path / "p.yaml"
    f.write_text(text)
    with pytest.raises(ParamError, match=f"Param file {f} is empty"):
        load_param(f)
