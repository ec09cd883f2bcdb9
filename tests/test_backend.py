import sys
import types

import pytest

from decode_var import backend as bk
from decode_var.core.errors import BackendError


@pytest.fixture
def fake_decode(monkeypatch, tmp_path):
    """Put PyPI's unrelated 'decode' look-alike on the path (no decode.neuralfitter)."""
    pkg = tmp_path / "decode"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("__version__ = '0.0.4'  # DESHIMA astronomy code\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for mod in [m for m in sys.modules if m == "decode" or m.startswith("decode.")]:
        monkeypatch.delitem(sys.modules, mod)
    bk.decode_status.cache_clear()
    bk._make.cache_clear()
    yield
    bk.decode_status.cache_clear()
    bk._make.cache_clear()


def test_unrelated_decode_is_refused_with_what_was_found(fake_decode):
    ok, found = bk.decode_status()
    assert not ok
    assert "0.0.4" in found and "no decode.neuralfitter" in found and "not DECODE" in found
    assert bk.resolve_backend_name("auto") == "builtin"
    with pytest.raises(BackendError, match="conda"):
        bk.get_backend("decode")


def test_builtin_always_available():
    assert bk.get_backend("builtin").name == "builtin"
    with pytest.raises(BackendError, match="Unknown backend"):
        bk.resolve_backend_name("cuda")


def test_only_the_bridge_imports_decode():
    import pathlib
    import re

    root = pathlib.Path(bk.__file__).parents[1]
    files = list(root.rglob("*.py"))
    assert root / "backend" / "decode.py" in files
    offenders = [str(p.relative_to(root)) for p in files if p != root / "backend" / "decode.py"
                 and re.search(r"^\s*(import decode\b|from decode\b)", p.read_text(), re.M)]
    assert offenders == []


@pytest.mark.decode
def test_real_decode_is_recognised():
    ok, found = bk.decode_status()
    assert ok and "DECODE 0.10" in found
    assert bk.get_backend("auto").name == "decode"
