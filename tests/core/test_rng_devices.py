"""Every random draw from a run's generator happens on the generator's device.

``torch.randint(..., generator=g)`` without ``device=`` draws on the CPU and fails with
"Expected a 'cpu' device type for generator but found 'cuda'" when ``g`` lives on a GPU:
that broke every adapted method under ``--device cuda`` until a GPU run found it (session 7).
CI has no GPU, so this reads the source instead:

* a factory that takes ``device=`` (``rand``, ``randn``, ``randint``, ``randperm``) must name
  it whenever it is given a generator, whatever the call is spelled (``torch.randn``,
  ``th.randn``, a bare ``randn``);
* a draw that takes its device from an input tensor (``multinomial``, ``poisson``,
  ``bernoulli``, ``normal``, the ``*_like`` factories, in-place ``random_``/``uniform_``/...)
  cannot be checked by reading, so each one is listed below by file and function after a
  review that its input is moved to the generator's device; a new one fails until reviewed.
"""

from __future__ import annotations

import ast
from pathlib import Path

import d3ip_cli

TAKES_DEVICE = {"rand", "randn", "randint", "randperm"}
INPUT_DEVICE = {"multinomial", "poisson", "bernoulli", "normal", "rand_like", "randn_like", "randint_like",
                "random_", "uniform_", "normal_", "exponential_", "bernoulli_", "geometric_", "cauchy_",
                "log_normal_", "kaiming_uniform_", "kaiming_normal_", "xavier_uniform_", "xavier_normal_"}
# (file, enclosing function, draw): reviewed to run on the generator's device
REVIEWED = {
    ("physics/masks.py", "gaussian1d", "multinomial"),  # density.to(generator.device)
    ("physics/noise.py", "ct_poisson", "poisson"),      # expected.to(generator.device)
    ("prior/phantoms.py", "_counts", "poisson"),        # rate built on generator.device
}


def _name(func: ast.expr) -> str | None:
    if isinstance(func, ast.Attribute):
        return func.attr
    if isinstance(func, ast.Name):
        return func.id
    return None


def _draws(tree: ast.AST) -> list[tuple[int, str, str, set[str]]]:
    """(line, enclosing function, called name, keyword names) of every call given ``generator=``."""
    out = []

    def visit(node: ast.AST, fn: str) -> None:
        for child in ast.iter_child_nodes(node):
            inner = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else fn
            if isinstance(child, ast.Call):
                kwargs = {k.arg for k in child.keywords}
                name = _name(child.func)
                if "generator" in kwargs and name is not None:
                    out.append((child.lineno, fn, name, kwargs))
            visit(child, inner)

    visit(tree, "<module>")
    return out


def _problems(source: str, rel: str) -> list[str]:
    found = []
    for line, fn, name, kwargs in _draws(ast.parse(source)):
        if name in TAKES_DEVICE and "device" not in kwargs:
            found.append(f"{rel}:{line} {name}(generator=...) without device=")
        elif name in INPUT_DEVICE and (rel, fn, name) not in REVIEWED:
            found.append(f"{rel}:{line} {name}(generator=...) in {fn}: not reviewed for the generator's device")
    return found


def test_the_checker_catches_draws_that_would_fail_on_cuda():
    assert _problems("torch.randint(0, 5, (1,), generator=g)", "x.py")
    assert _problems("import torch as th\nth.randn(3, generator=g)", "x.py")
    assert _problems("from torch import randperm\nrandperm(4, generator=g)", "x.py")
    assert _problems("def f(p, g):\n    return torch.multinomial(p, 2, generator=g)", "x.py")
    assert _problems("def f(w, g):\n    w.uniform_(generator=g)", "x.py")
    assert not _problems("torch.randint(0, 5, (1,), generator=g, device=g.device)", "x.py")
    assert not _problems("torch.randn(3, generator=g, device=x.device)", "x.py")
    assert not _problems("def _counts(r, g):\n    return torch.poisson(r, generator=g)", "prior/phantoms.py")


def test_every_generator_draw_in_the_package_runs_on_the_generators_device():
    root = Path(d3ip_cli.__file__).parent
    found = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        found += _problems(path.read_text(), rel)
    assert not found, "draws that would fail with a CUDA generator:\n" + "\n".join(found)


def test_every_reviewed_draw_still_exists():
    root = Path(d3ip_cli.__file__).parent
    present = set()
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        present |= {(rel, fn, name) for _, fn, name, _ in _draws(ast.parse(path.read_text()))}
    assert REVIEWED <= present, f"stale entries: {REVIEWED - present}"
