"""CPU batches stay bit for bit what they were, and the data path is reproducible on its device.

The digests below are SHA-256 (first 16 hex digits) of seeded CPU batches -- frames, emitters,
background -- and of the multi-scale targets and weights built from them, recorded on the commit
before the simulation and the targets learned to run on ``Hardware.device_simulation`` (issue 16).
Any change of the CPU data path, however small, changes a digest.

Bit-exact values depend on the torch build and the CPU's vector instructions, so the literals are
only checked under the torch version they were recorded with (``RECORDED_WITH``); elsewhere the
test is skipped with the command that prints the digests of the current code:
``python tests/test_device_data.py``.
"""
from __future__ import annotations

import hashlib
import platform
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "decode_var" / "config" / "var_quickstart.yaml"
RECORDED_WITH = {"torch": "2.13", "machine": "x86_64"}

SEEDS = (0, 1, 123456789)
N_SAMPLES = 8
SAMPLE_SEEDS = (11, 12, 13)


def digest(*tensors: torch.Tensor) -> str:
    """First 16 hex digits of the SHA-256 of the tensors' dtype, shape and bytes (moved to the CPU)."""
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()[:16]


def batch_digests(batch, targets) -> dict:
    """Digest of every field of a batch and of its targets and weights (all scales)."""
    n = batch.frames_NCHW.size(0)
    tg, wg = targets(batch.em, batch.bg_NHW, n)
    em, em_all = batch.em, batch.em_all
    return {"frames_NCHW": digest(batch.frames_NCHW), "xyz": digest(em.xyz), "phot": digest(em.phot),
            "frame_ix": digest(em.frame_ix), "id": digest(em.id), "bg_NHW": digest(batch.bg_NHW),
            "bg_NCHW": digest(batch.bg_NCHW),
            "em_all": digest(em_all.xyz, em_all.phot, em_all.frame_ix, em_all.id),
            "targets": digest(*tg), "weights": digest(*wg)}


#: the quickstart's simulation as the digests were recorded (before it trained on a density range and a
#: smooth background): what is pinned here is the data path, not the quickstart's choice of physics
RECORDED_SIMULATION = {"emitter_av": 6.0, "bg_perlin_amplitude": None, "bg_perlin_scale": 4,
                       "bg_perlin_draw_amps": False}


def quickstart_param(device: str = "cpu"):
    from decode_var.config.param import load_param

    param = load_param(QUICKSTART, overrides={"Simulation": RECORDED_SIMULATION})
    param.Hardware.device_simulation = device
    return param


def rich_param(tmp: Path, device: str = "cpu"):
    """40 x 40 px, Perlin background (two scales, drawn amplitudes, drift), a density range, a spline PSF."""
    from decode_var.config.param import param_from_dict
    from decode_var.data.spline_psf import gaussian_pixel_model, make_calibration, save_calibration

    calib = tmp / "calib_gauss.mat"
    if not calib.exists():
        save_calibration(calib, make_calibration(gaussian_pixel_model(), roi_size=13,
                                                 z_range_nm=(-800.0, 800.0), dz_nm=100.0))
    d = quickstart_param().to_dict()
    d["Simulation"].update(bg_perlin_amplitude=[30.0, 10.0], bg_perlin_scale=[4, 8], bg_perlin_draw_amps=True,
                           emitter_av=[2.0, 10.0], emitter_extent=[[-0.5, 39.5], [-0.5, 39.5], [-700.0, 700.0]])
    d["VAR"].update(psf="spline", bg_drift=0.3)
    d["InOut"]["calibration_file"] = str(calib)
    d["Hardware"]["device_simulation"] = device
    return param_from_dict(d)


def compute(param) -> dict:
    """Digests of ``sample(N_SAMPLES, seed)`` for SEEDS and of ``sample_seeded(SAMPLE_SEEDS)``."""
    from decode_var.backend import get_backend
    from decode_var.data.simulation import Simulator
    from decode_var.data.targets import MultiScaleTargets

    sim = Simulator.parse(param)
    targets = MultiScaleTargets.parse(param, get_backend("builtin"))
    out = {f"sample({N_SAMPLES}, {s})": batch_digests(sim.sample(N_SAMPLES, s), targets) for s in SEEDS}
    out[f"sample_seeded{SAMPLE_SEEDS}"] = batch_digests(sim.sample_seeded(list(SAMPLE_SEEDS)), targets)
    return out


# recorded on commit 890067d (before issue 16), torch 2.13.0 CPU, x86_64, 2 threads
EXPECTED = {'quickstart': {'sample(8, 0)': {'bg_NCHW': 'e9b732786a9bf9c0',
                                            'bg_NHW': 'f32498e78ac816ae',
                                            'em_all': '4ccc98db54c9b5f2',
                                            'frame_ix': 'eaa03358ecfb8c13',
                                            'frames_NCHW': '3bd6b8ca1e5e0f20',
                                            'id': '96fbd34ab24a48c7',
                                            'phot': '67963764a641607c',
                                            'targets': '79e245e8a0dfa9a9',
                                            'weights': '38463ec0059170cc',
                                            'xyz': '199491a752695f9f'},
                           'sample(8, 1)': {'bg_NCHW': '337573df7ba36edd',
                                            'bg_NHW': '004eed53dcc985ed',
                                            'em_all': '5494e31372b17d24',
                                            'frame_ix': 'e69c39f563ffcf4c',
                                            'frames_NCHW': '1994e664d647f52c',
                                            'id': 'ebd2caef36b938f4',
                                            'phot': 'b0878052e45cc28a',
                                            'targets': '85a8f5f1b3121098',
                                            'weights': '451f5c16266c0e36',
                                            'xyz': 'cd2beccf78c79540'},
                           'sample(8, 123456789)': {'bg_NCHW': '685c84470054f41a',
                                                    'bg_NHW': 'f7dadc82260d13e0',
                                                    'em_all': '4c723414b1aece4e',
                                                    'frame_ix': 'a2dfccf6283a64da',
                                                    'frames_NCHW': '1efa67eda4d7858d',
                                                    'id': 'a265dfae1794dd5e',
                                                    'phot': '1b311efe9472f433',
                                                    'targets': '1a6033e5df976e8f',
                                                    'weights': 'f7149973ff8a584a',
                                                    'xyz': 'ecfc5b44b7cacae7'},
                           'sample_seeded(11, 12, 13)': {'bg_NCHW': '85006149b46932d1',
                                                         'bg_NHW': '7f756e51064740ad',
                                                         'em_all': '06bddda77109ab51',
                                                         'frame_ix': 'b0e2c69e04f193cd',
                                                         'frames_NCHW': '85a15adaa123df33',
                                                         'id': '576aa83a3fe39942',
                                                         'phot': '22481466d364ebb0',
                                                         'targets': 'c03099e328dad0d6',
                                                         'weights': '3389afaeaa9fe3cc',
                                                         'xyz': '64495951a2b55909'}},
            'rich': {'sample(8, 0)': {'bg_NCHW': '9b7ae9d59d30225e',
                                      'bg_NHW': '1474300bcb84b114',
                                      'em_all': 'c8408f1dc7a20da1',
                                      'frame_ix': '71b75bdfb487109d',
                                      'frames_NCHW': 'a708c7de0b0ace50',
                                      'id': 'd12063fc85ba9786',
                                      'phot': 'b8af0c555fc5cda8',
                                      'targets': '0c866c1a91dbb806',
                                      'weights': 'c35b931f97f9375e',
                                      'xyz': '9c39d22553ccdeb6'},
                     'sample(8, 1)': {'bg_NCHW': '85cc2baf48576cc7',
                                      'bg_NHW': 'e583ba41ffc3bf91',
                                      'em_all': 'ebff7bf81c336b00',
                                      'frame_ix': '14db4c3ee0b5fd30',
                                      'frames_NCHW': '53aeff9bff96a380',
                                      'id': 'df3b3a9e13194ee6',
                                      'phot': 'f2c449fa865d79d6',
                                      'targets': 'c41546e3533457ef',
                                      'weights': 'e63e90e7750a54d3',
                                      'xyz': '8a049b159cebc8a3'},
                     'sample(8, 123456789)': {'bg_NCHW': '9624acbe2b140ce1',
                                              'bg_NHW': '4239af4f9bffcbb6',
                                              'em_all': '8ed567885e6ef678',
                                              'frame_ix': 'f1a4f6970a54897e',
                                              'frames_NCHW': '6ed4c9171af7f587',
                                              'id': 'b58d9377510cf991',
                                              'phot': '0909cd3a78acd1d3',
                                              'targets': '284aa16af0d67a68',
                                              'weights': '665a7e76b0785314',
                                              'xyz': '324401e5c8e741e0'},
                     'sample_seeded(11, 12, 13)': {'bg_NCHW': 'da11240dd5eba232',
                                                   'bg_NHW': '96284ae5bc8b6aea',
                                                   'em_all': '24e24822e025eca1',
                                                   'frame_ix': 'c8ab8cc6eef4c6a1',
                                                   'frames_NCHW': '95069dca29520c69',
                                                   'id': '8e69da433ea95649',
                                                   'phot': 'bf4dba3567fbc2f8',
                                                   'targets': '61a27aa1f990fd7c',
                                                   'weights': '0aa8f241664edc32',
                                                   'xyz': 'e4d60cb28e971293'}}}


def _recorded_here() -> bool:
    return (torch.__version__.startswith(RECORDED_WITH["torch"])
            and platform.machine() == RECORDED_WITH["machine"])


def _check(got: dict, expected: dict) -> None:
    if not _recorded_here():
        pytest.skip(f"digests recorded with torch {RECORDED_WITH['torch']} on {RECORDED_WITH['machine']}, "
                    f"this is torch {torch.__version__} on {platform.machine()}; "
                    "print the current ones with: python tests/test_device_data.py")
    bad = {f"{k} {f}": (v, expected[k][f]) for k, row in got.items() for f, v in row.items() if v != expected[k][f]}
    assert not bad, f"CPU batches changed (got, recorded): {bad}"


def test_cpu_batches_unchanged_quickstart():
    _check(compute(quickstart_param()), EXPECTED["quickstart"])


def test_cpu_batches_unchanged_perlin_density_range_spline(tmp_path):
    _check(compute(rich_param(tmp_path)), EXPECTED["rich"])


# the data path on its device ------------------------------------------------------------------------
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                reason="no CUDA device on this machine"))]


def _all_on(batch, targets, device: str) -> None:
    tensors = [batch.frames_NCHW, batch.bg_NHW, batch.bg_NCHW, batch.em.xyz, batch.em.phot, batch.em.frame_ix,
               batch.em.id, batch.em_all.xyz, *targets[0], *targets[1]]
    assert {t.device.type for t in tensors} == {device}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("config", ["quickstart", "rich"])
def test_device_path_reproducible(device, config, tmp_path):
    """Same seed, same device: the same batches, targets and weights; every tensor on that device; on the
    CPU the recorded digests."""
    from decode_var.backend import get_backend
    from decode_var.data.simulation import Simulator
    from decode_var.data.targets import MultiScaleTargets

    param = quickstart_param(device) if config == "quickstart" else rich_param(tmp_path, device)
    sim = Simulator.parse(param)
    assert sim.device.type == device
    targets = MultiScaleTargets.parse(param, get_backend("builtin"))
    batch = sim.sample(N_SAMPLES, SEEDS[0])
    _all_on(batch, targets(batch.em, batch.bg_NHW, N_SAMPLES), device)
    first, again = compute(param), compute(param)
    assert first == again
    if device == "cpu":
        _check(first, EXPECTED[config])


def test_cuda_without_cuda_falls_back_to_cpu_with_a_warning(monkeypatch, capsys):
    """DECODE's param files say ``device_simulation: cuda:0``; without CUDA the data is made on the CPU,
    the same batches as ``cpu``, and the warning names the key and the fix."""
    from decode_var.data.simulation import Simulator

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    sim = Simulator.parse(quickstart_param("cuda:0"))
    err = capsys.readouterr().err
    assert "Hardware.device_simulation is 'cuda:0' but CUDA is not available" in err
    assert "Set Hardware.device_simulation: cpu" in err
    assert sim.device == torch.device("cpu")
    assert digest(sim.sample(N_SAMPLES, 0).frames_NCHW) == EXPECTED["quickstart"][f"sample({N_SAMPLES}, 0)"][
        "frames_NCHW"] or not _recorded_here()


def test_unknown_device_is_a_param_error():
    from decode_var.core.errors import ParamError
    from decode_var.data.simulation import Simulator

    with pytest.raises(ParamError, match="Hardware.device_simulation must be a device name"):
        Simulator.parse(quickstart_param("gpu0"))


def test_a_foreign_psf_keeps_the_data_on_the_cpu(capsys):
    """The decode backend passes DECODE's PSF (and swaps in DECODE's camera): its data stays on the CPU."""
    from decode_var.data.simulation import GaussianPSF, Simulator

    param = quickstart_param("cuda")
    sim = Simulator.parse(param, psf=GaussianPSF.parse(param))
    assert "PSF from outside" in capsys.readouterr().err
    assert sim.device == torch.device("cpu")


def test_sampling_leaves_the_global_rng_alone():
    """Batches come from their own generator: the global RNG neither feeds them nor is changed by them,
    so a batch can be made in a thread while the training step draws dropout or teacher-forcing coins."""
    from decode_var.data.simulation import Simulator

    sim = Simulator.parse(quickstart_param())
    state = torch.get_rng_state()
    a = sim.sample(4, 5)
    assert torch.equal(state, torch.get_rng_state())
    torch.manual_seed(12345)
    assert torch.equal(a.frames_NCHW, sim.sample(4, 5).frames_NCHW)


def test_no_tensor_of_the_data_path_is_made_on_the_default_device(tmp_path):
    """Every tensor the simulation and the targets create names its device (or copies one of its inputs'):
    on a GPU nothing would be made on the CPU and copied or mixed. Checked here on the CPU by watching
    torch's factory functions while one batch and its targets are made (spline PSF, Perlin background)."""
    from torch.overrides import TorchFunctionMode

    from decode_var.backend import get_backend
    from decode_var.data.simulation import Simulator
    from decode_var.data.targets import MultiScaleTargets

    factories = {torch.zeros, torch.ones, torch.full, torch.empty, torch.arange, torch.linspace, torch.rand,
                 torch.randn, torch.randint, torch.tensor, torch.eye, torch.randperm}
    missing = []

    class Watch(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func in factories and kwargs.get("device") is None:
                import traceback

                here = [f for f in traceback.extract_stack() if "decode_var" in f.filename]
                missing.append(f"{func.__name__} at {here[-1].filename}:{here[-1].lineno}" if here else func.__name__)
            return func(*args, **kwargs)

    for param in (quickstart_param(), rich_param(tmp_path)):
        sim = Simulator.parse(param)
        targets = MultiScaleTargets.parse(param, get_backend("builtin"))
        with Watch():
            batch = sim.sample(4, 3)
            targets(batch.em, batch.bg_NHW, 4)
            sim.sample_seeded([1, 2])
    assert not missing, sorted(set(missing))


def test_frame_slots_rank_emitters_within_their_frame():
    from decode_var.data.accumulate import frame_slots

    assert frame_slots(torch.tensor([2, 0, 2, 1, 0, 2])).tolist() == [0, 0, 1, 0, 1, 2]
    assert frame_slots(torch.zeros(0, dtype=torch.long)).tolist() == []


def test_gpu_accumulation_path_sums_like_index_add():
    """The GPU path of the PSFs' accumulation (slot by slot, a fixed order) gives index_add_'s sums, and the same
    bits on every run; run here on the CPU."""
    from decode_var.data.accumulate import accumulate_in_order, frame_slots

    g = torch.Generator().manual_seed(0)
    frame_ix = torch.randint(0, 50, (2000,), generator=g)
    values = torch.rand(2000, 7, generator=g)
    ref = torch.zeros(50, 7).index_add_(0, frame_ix, values)
    a = accumulate_in_order(torch.zeros(50, 7), frame_ix, values, frame_slots(frame_ix))
    b = accumulate_in_order(torch.zeros(50, 7), frame_ix, values, frame_slots(frame_ix))
    assert torch.equal(a, b) and torch.equal(a, ref)  # per row, the emitters in their order, as index_add_


@pytest.mark.parametrize("config", ["quickstart", "rich"])
def test_psf_frames_on_the_gpu_path_match_the_cpu_path(config, tmp_path, monkeypatch):
    """Gaussian and spline PSF frames summed the GPU way (forced on the CPU) are the CPU's, bit for bit: per pixel,
    rank by rank within a frame is the emitter order that the CPU's sequential index_add_ follows."""
    import decode_var.data.accumulate as accumulate
    import decode_var.data.simulation as simulation

    param = quickstart_param() if config == "quickstart" else rich_param(tmp_path)
    sim = simulation.Simulator.parse(param)
    xyz, phot, frame, _ = sim._emitters(16, torch.Generator().manual_seed(4))
    ref = sim.psf.forward(xyz, phot, frame, 48)
    monkeypatch.setattr(accumulate, "IN_ORDER_ON_CPU", True)
    got = sim.psf.forward(xyz, phot, frame, 48)
    assert torch.equal(got, ref)


def test_batch_and_emitters_move_between_devices():
    from decode_var.data.simulation import Simulator

    batch = Simulator.parse(quickstart_param()).sample(2, 0)
    moved = batch.to("cpu")
    assert moved.device == torch.device("cpu") and moved.em.device == torch.device("cpu")
    assert torch.equal(moved.em.xyz, batch.em.xyz) and torch.equal(moved.em.id, batch.em.id)
    assert torch.equal(batch.em.to("cpu").xyz_nm, batch.em.xyz_nm)


if __name__ == "__main__":  # print the digests of the current code, in EXPECTED's form
    import pprint
    import tempfile

    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as d:
        pprint.pprint({"quickstart": compute(quickstart_param()), "rich": compute(rich_param(Path(d)))},
                      width=120, stream=sys.stdout)
