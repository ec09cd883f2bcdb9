"""Hostile inputs through the command lines (issue 27): each case of ``tests/hostile_cli.py`` holds.

A case holds when the command gives a clear error naming the problem, or a correct result: never exit 0
with a wrong result, never a raw traceback. ``benchmarks/bench_reliability.py --hostile`` runs the same
cases and prints held / tried.
"""
import pytest

import hostile_cli


@pytest.fixture(scope="module")
def tiny_experiment(tmp_path_factory):
    return hostile_cli.train_tiny_model(tmp_path_factory.mktemp("hostile_model"))


@pytest.mark.parametrize("case", hostile_cli.CASES, ids=[c.name for c in hostile_cli.CASES])
def test_hostile_input_holds(case, tiny_experiment, tmp_path):
    held, detail = case.fn(tmp_path, tiny_experiment)
    if held is None:
        pytest.skip(detail)
    assert held, f"issue 27 item {case.item}, {case.what}: {detail}"
