import importlib.metadata as md

import pytest

from decode_var import registry
from decode_var.errors import ParamError


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

    monkeypatch.setattr(registry.metadata, "entry_points", fake_entry_points)
    monkeypatch.setattr(registry, "_loaded", False)
    monkeypatch.setattr(registry, "_models", {})
    monkeypatch.setattr(registry, "_losses", {})
    assert registry.get_model("ThirdPartyNet") is ThirdPartyNet
    assert "VARMultiScale" in registry.list_models()


def test_register_decorator(monkeypatch):
    monkeypatch.setattr(registry, "_models", dict(registry._models))

    @registry.register_model("MyNet")
    class MyNet:
        pass

    assert registry.get_model("MyNet") is MyNet
