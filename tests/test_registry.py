import importlib.metadata as md
import sys
import types
import warnings

import pytest

from decode_var import backend, registry
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


def _fake_decode(monkeypatch, **names):
    """DECODE's two namespaces as empty modules holding ``names`` (``models__X`` / ``loss__X``), behind a
    fake bridge; returns them."""
    registry.list_models()  # the real providers have run: the fake bridge is not asked for them
    spaces = {kind: types.ModuleType(f"decode.neuralfitter.{kind}") for kind in ("models", "loss")}
    for key, value in names.items():
        kind, _, name = key.partition("__")
        setattr(spaces[kind], name, value)
    bridge = types.ModuleType("decode_var.backend.decode")
    bridge.decode_namespaces = lambda: {f"decode.neuralfitter.{k}": ns for k, ns in spaces.items()}
    monkeypatch.setitem(sys.modules, "decode_var.backend.decode", bridge)
    monkeypatch.setattr(backend, "resolve_backend_name", lambda name: name)
    return spaces["models"], spaces["loss"]


def test_register_with_decode_never_replaces_a_name(monkeypatch):
    """Fake DECODE namespaces holding names decode-var's classes also have: those stay untouched."""
    class DecodesPPXYZBLoss:
        pass

    # VARMultiScale: a host name that happens to equal one of ours; PPXYZBLoss: the name our PPXYZB class
    # carries in Python
    models_ns, loss_ns = _fake_decode(monkeypatch, models__VARMultiScale=object(), loss__PPXYZBLoss=DecodesPPXYZBLoss)
    assert registry.get_loss("PPXYZB").__name__ == "PPXYZBLoss"
    before = {ns: dict(vars(ns)) for ns in (models_ns, loss_ns)}
    with pytest.warns(UserWarning, match=r"decode\.neuralfitter\.models\.VARMultiScale exists already"):
        added = backend.register_with_decode()
    for ns, old in before.items():  # nothing that was there is reassigned
        assert all(vars(ns)[k] is v for k, v in old.items())
    assert loss_ns.PPXYZBLoss is DecodesPPXYZBLoss
    assert loss_ns.PPXYZB is registry.get_loss("PPXYZB")
    assert loss_ns.AdaptivePPXYZB is registry.get_loss("AdaptivePPXYZB")
    assert sorted(added) == ["decode.neuralfitter.loss.AdaptivePPXYZB", "decode.neuralfitter.loss.PPXYZB"]
    with warnings.catch_warnings():  # a second call adds nothing and warns only about the foreign name
        warnings.simplefilter("ignore")
        assert backend.register_with_decode() == []


def _registered(decorator, name: str, module: str):
    cls = type(name, (), {"__module__": module})
    return decorator(name)(cls)


def test_decode_gets_exactly_the_names_decode_var_registers(monkeypatch):
    """A name written once, in its decorator, reaches DECODE; DECODE's own entries and a plugin's do not."""
    registry.list_models()  # loaded first, so that the copies below hold every provider's entries
    monkeypatch.setattr(registry, "_models", dict(registry._models))
    monkeypatch.setattr(registry, "_losses", dict(registry._losses))
    ours = _registered(registry.register_model, "SketchNet", "decode_var.nn.sketch")
    _registered(registry.register_model, "HostNet", "decode.neuralfitter.models.model_param")
    _registered(registry.register_loss, "PluginLoss", "someplugin.loss")
    models_ns, loss_ns = _fake_decode(monkeypatch)
    added = backend.register_with_decode()
    assert models_ns.SketchNet is ours and registry.get_model("SketchNet") is ours
    assert sorted(added) == sorted([f"decode.neuralfitter.models.{n}" for n in registry.models(registry.PACKAGE)]
                                   + [f"decode.neuralfitter.loss.{n}" for n in registry.losses(registry.PACKAGE)])
    assert sorted(added) == ["decode.neuralfitter.loss.AdaptivePPXYZB", "decode.neuralfitter.loss.PPXYZB",
                             "decode.neuralfitter.models.SketchNet", "decode.neuralfitter.models.VARMultiScale"]
    assert not hasattr(models_ns, "HostNet") and not hasattr(loss_ns, "PluginLoss")
