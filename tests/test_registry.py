import importlib.metadata as md

import pytest

from decode_var import registry
from decode_var.core.errors import ParamError


def test_builtin_names():
    assert "VARMultiScale" in registry.list_models()
    assert {"AdaptivePPXYZB", "PPXYZB"} <= set(registry.list_losses())


def test_unknown_name_lists_known_ones():
    with pytest.raises(ParamError, match=r"unknown model 'Unet'.*Known models: .*VARMultiScale"):
        registry.get_model("Unet")


class ThirdPartyNet:
    @classmethod
    def parse(cls, param):
        return cls()


def test_entry_points_are_picked_up(monkeypatch):
    ep = md.EntryPoint(name="ThirdPartyNet", value="test_registry:ThirdPartyNet", group=registry.MODEL_GROUP)

    def fake_entry_points(group=None, **kw):
        return [ep] if group == registry.MODEL_GROUP else []

    registry.list_models()  # the built-ins have registered themselves
    monkeypatch.setattr(registry.metadata, "entry_points", fake_entry_points)
    monkeypatch.setattr(registry, "_loaded", False)
    monkeypatch.setattr(registry, "_models", dict(registry._models))
    monkeypatch.setattr(registry, "_losses", dict(registry._losses))
    assert "ThirdPartyNet" not in registry._models
    assert registry.get_model("ThirdPartyNet") is ThirdPartyNet
    assert "VARMultiScale" in registry.list_models()


def test_register_decorator(monkeypatch):
    monkeypatch.setattr(registry, "_models", dict(registry._models))

    @registry.register_model("MyNet")
    class MyNet:
        pass

    assert registry.get_model("MyNet") is MyNet


def test_register_with_decode_never_replaces_a_name(monkeypatch):
    """Fake DECODE namespaces holding names decode-var's classes also have: those stay untouched."""
    import sys
    import types
    import warnings

    from decode_var import backend
    from decode_var.nn.loss import LOSSES

    class DecodesPPXYZBLoss:
        pass

    models_ns = types.ModuleType("decode.neuralfitter.models")
    loss_ns = types.ModuleType("decode.neuralfitter.loss")
    models_ns.VARMultiScale = object()  # a host name that happens to equal one of ours
    loss_ns.PPXYZBLoss = DecodesPPXYZBLoss  # the name our PPXYZB class carries in Python
    assert LOSSES["PPXYZB"].__name__ == "PPXYZBLoss"
    before = {ns: dict(vars(ns)) for ns in (models_ns, loss_ns)}
    bridge = types.ModuleType("decode_var.backend.decode")
    bridge.decode_namespaces = lambda: {"decode.neuralfitter.models": models_ns, "decode.neuralfitter.loss": loss_ns}
    monkeypatch.setitem(sys.modules, "decode_var.backend.decode", bridge)
    monkeypatch.setattr(backend, "resolve_backend_name", lambda name: name)

    with pytest.warns(UserWarning, match=r"decode\.neuralfitter\.models\.VARMultiScale exists already"):
        added = backend.register_with_decode()
    for ns, old in before.items():  # nothing that was there is reassigned
        assert all(vars(ns)[k] is v for k, v in old.items())
    assert loss_ns.PPXYZBLoss is DecodesPPXYZBLoss
    assert loss_ns.PPXYZB is LOSSES["PPXYZB"] and loss_ns.AdaptivePPXYZB is LOSSES["AdaptivePPXYZB"]
    assert sorted(added) == ["decode.neuralfitter.loss.AdaptivePPXYZB", "decode.neuralfitter.loss.PPXYZB"]
    with warnings.catch_warnings():  # a second call adds nothing and warns only about the foreign name
        warnings.simplefilter("ignore")
        assert backend.register_with_decode() == []
