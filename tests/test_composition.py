"""Nothing below the composition root reads the raw param.

Every part reads its keys in its own ``parse(param)`` (DECODE's convention), called once by
:func:`decode_var.training.components.build`; the settings that are no component are parsed there too, into
typed parts (``TrainSettings``, ``Protocol``, ``FrameSettings``, ``PostSettings``, ``CrlbModel``). What runs
afterwards (the training loop, the predictor, the scoring, the exports) holds those parts. Read from the source
with ``ast``: a function that reads a param section (``param.Camera``, ``self.param.VAR``, ``param.get``) must
be a parse, in the root or an entry point that loads the param, or one of the few named below with its reason.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from test_layers import CLI, ROOT

#: functions that parse: DECODE's ``parse(param)`` and its helpers
PARSERS = {"parse", "_parse_kwargs"}
#: modules that load or write the param: the config layer, the CLIs, the root, and the estimate of decode-var-init
ENTRY = {"config", "training/components.py", "data/init_param.py"} | {f"{name}.py" for name in CLI}
#: (module, function): why it may read the param
ALLOWED = {
    ("backend/decode.py", "psf"): "DECODE's PSF, built with the simulator by the root",
    ("backend/decode.py", "simulator"): "DECODE's camera, built by the root",
    ("backend/decode.py", "matcher"): "DECODE's matching, built by the root",
    ("backend/decode.py", "__init__"): "DECODE's GMM chain, built with the task by the root",
    ("backend/builtin.py", "gmm_chain"): "names the loss in its error",
    ("registry.py", "build_model"): "the model HyperParameter.architecture names, built by the root",
    ("registry.py", "build_loss"): "the loss HyperParameter.loss_impl names (DECODE's way)",
    ("data/simulation.py", "_parse_device"): "part of Simulator.parse",
    ("evaluation/model_card.py", "camera_of"): "the camera the card records, parsed by the root",
    ("training/schedules.py", "grad_clip_norm"): "part of TrainSettings.parse",
    ("training/tasks.py", "scale_factors"): "the model's scales, read when the root builds the task",
    ("training/tasks.py", "__init__"): "a task parses what it needs when the root builds it",
    ("inference/export.py", "write_fit_outputs"): "decode-var-fit's outputs: loads the param file it is given",
}


def _is_param(node) -> bool:
    """``param`` or ``<anything>.param``."""
    return (isinstance(node, ast.Name) and node.id == "param") or (isinstance(node, ast.Attribute)
                                                                    and node.attr == "param")


def param_reads(source: str) -> list[tuple[str, int, str]]:
    """(function, line, what) of every read of a param section (``param.Section``, ``x.param.Section``,
    ``param.get``) inside a function that is not a parser (:data:`PARSERS`)."""
    found = []
    for fn in ast.walk(ast.parse(source)):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)) or fn.name in PARSERS:
            continue
        for node in ast.walk(fn):
            if isinstance(node, ast.Attribute) and _is_param(node.value) and (node.attr[:1].isupper()
                                                                              or node.attr == "get"):
                found.append((fn.name, node.lineno, node.attr))
    return found


def _where(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def test_nothing_below_the_root_reads_the_raw_param():
    bad = []
    for path in sorted(ROOT.rglob("*.py")):
        where = _where(path)
        if where in ENTRY or where.split("/")[0] in ENTRY:
            continue
        for fn, line, what in param_reads(path.read_text()):
            if (where, fn) not in ALLOWED:
                bad.append(f"{where}:{line} {fn}() reads param.{what}")
    assert not bad, "parse it once into a typed part (training/components.py) instead:\n" + "\n".join(bad)


@pytest.mark.parametrize("source", [
    "class T:\n    def step(self):\n        return self.param.HyperParameter.batch_size\n",
    "def score(param, em):\n    return param.Camera.px_size\n",
    "def f(param):\n    return param.get('VAR')\n",
])
def test_a_read_below_the_root_is_found(source):
    assert param_reads(source), source


def test_parsers_may_read_it():
    assert param_reads("class C:\n    @classmethod\n    def parse(cls, param):\n        return cls(param.Camera.qe)\n") == []
    assert param_reads("def f(parts):\n    return parts.settings.seed, parts.param.to_dict()\n") == []
