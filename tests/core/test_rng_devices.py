"""Every random draw from a run's generator names the generator's device.

``torch.randint(..., generator=g)`` without ``device=`` draws on the CPU and fails with
"Expected a 'cpu' device type for generator but found 'cuda'" when ``g`` lives on a GPU:
that broke every adapted method under ``--device cuda`` until a GPU run found it. CI has
no GPU, so this reads the source instead: a factory call that takes a generator must also
say where to draw.
"""

from __future__ import annotations

import ast
from pathlib import Path

import d3ip_cli

TAKES_DEVICE = {"rand", "randn", "randint", "randperm", "normal"}


def _offending_calls(tree: ast.AST) -> list[int]:
    bad = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        if not (isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"):
            continue
        name = node.func.attr
        kwargs = {k.arg for k in node.keywords}
        if name in TAKES_DEVICE and "generator" in kwargs and "device" not in kwargs:
            bad.append(node.lineno)
    return bad


def test_the_checker_catches_a_cpu_draw_from_a_run_generator():
    assert _offending_calls(ast.parse("torch.randint(0, 5, (1,), generator=g)")) == [1]
    assert _offending_calls(ast.parse("torch.randint(0, 5, (1,), generator=g, device=g.device)")) == []
    assert _offending_calls(ast.parse("torch.randn(3, generator=g, device=x.device)")) == []


def test_every_generator_draw_in_the_package_names_its_device():
    root = Path(d3ip_cli.__file__).parent
    found = {}
    for path in sorted(root.rglob("*.py")):
        bad = _offending_calls(ast.parse(path.read_text(), filename=str(path)))
        if bad:
            found[str(path.relative_to(root))] = bad
    assert not found, f"draws from a generator without device= (fail on CUDA): {found}"
