"""`d3ip operators`: listing, and --check over every registered operator and backend."""

from __future__ import annotations

import json


from d3ip_cli.physics.base import LinearOperator


def test_list(cli):
    r = cli(["operators"])
    assert r.exit_code == 0, r.output
    for word in ("sparse-view", "limited-angle", "cs-mri", "native", "torch-radon", "astra", "tv"):
        assert word in r.stdout


def test_check_passes_and_reports_worst_errors(cli):
    r = cli(["operators", "--check", "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    checks = doc["checks"]
    assert checks["passed"] and checks["worst"]["adjoint"] < 1e-5
    ids = {c["id"] for c in checks["cases"]}
    assert {"sparse-view[native]", "limited-angle[native]"} <= ids and any(i.startswith("cs-mri") for i in ids)
    if doc["backends"]["astra"] is None:
        assert checks["agreement"][0]["forward"] < 1e-2


class _Broken(LinearOperator):
    def __init__(self):
        super().__init__((1, 4, 4), (1, 4, 4))

    def _A(self, x):
        return x.flip(-1)

    def _A_adjoint(self, y):
        return y  # wrong on purpose


def test_check_fails_loudly(cli, monkeypatch):
    import d3ip_cli.physics.checks as checks
    from d3ip_cli.physics.registry import OperatorCase

    monkeypatch.setattr(checks, "operator_cases", lambda device="cpu": [OperatorCase("broken", lambda g: _Broken())])
    monkeypatch.setattr(checks, "ct_backend_cases", lambda: [])
    r = cli(["operators", "--check"])
    assert r.exit_code == 1
    assert "FAIL" in r.stdout and "broken" in r.stderr
