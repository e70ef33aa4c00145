"""The numeric subset that `make test-roundings` reruns is chosen by the `numeric` marker: every test
module of a numerical library area carries it, so a new one cannot be left out silently."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
# Test modules of the numerical areas: SDEs, samplers, ODE solvers, likelihoods, scores, losses and
# the exact mixture (test_sampler_api.py, test_sampler_family.py, ... included).
NUMERIC_MODULE = re.compile(r"test_(sdes|samplers?(_\w+)?|fast_samplers|likelihood|ode|toy|score|losses)\.py")


def _marks(expr: ast.expr) -> set:
    """Names of the ``pytest.mark.<name>`` in a ``pytestmark`` value (one mark or a list/tuple)."""
    items = expr.elts if isinstance(expr, (ast.List, ast.Tuple)) else [expr]
    out = set()
    for item in items:
        node = item.func if isinstance(item, ast.Call) else item
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute) and node.value.attr == "mark":
            out.add(node.attr)
    return out


def module_marks(path: Path) -> set:
    """The marks of a test module's top-level ``pytestmark``."""
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "pytestmark" for t in node.targets):
            return _marks(node.value)
    return set()


def numeric_modules() -> list:
    return sorted(p for p in TESTS.glob("test_*.py") if NUMERIC_MODULE.fullmatch(p.name))


def test_the_pattern_finds_the_numerical_modules() -> None:
    names = {p.name for p in numeric_modules()}
    assert {"test_sdes.py", "test_samplers.py", "test_sampler_api.py", "test_likelihood.py", "test_toy.py"} <= names
    assert "test_training.py" not in names and "test_markers.py" not in names


@pytest.mark.parametrize("path", numeric_modules(), ids=lambda p: p.name)
def test_numerical_module_is_marked_numeric(path: Path) -> None:
    assert "numeric" in module_marks(path), f"{path.name}: add `pytestmark = pytest.mark.numeric` at its top"


def test_marks_are_read_from_lists_and_single_marks() -> None:
    one = ast.parse("pytestmark = pytest.mark.numeric").body[0].value
    both = ast.parse('pytestmark = [pytest.mark.numeric, pytest.mark.usefixtures("single_thread")]').body[0].value
    assert _marks(one) == {"numeric"} and _marks(both) == {"numeric", "usefixtures"}


def test_marker_is_registered_and_selects_the_roundings_run(pytestconfig: pytest.Config) -> None:
    assert any(line.split(":")[0].strip() == "numeric" for line in pytestconfig.getini("markers"))
    recipe = (ROOT / "Makefile").read_text().split("test-roundings:", 1)[1].split("\n\n", 1)[0]
    assert "ATEN_CPU_CAPABILITY=default" in recipe and "-m 'numeric and not slow'" in recipe
