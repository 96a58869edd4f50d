"""Installation checks over the registry (``d3ip operators --check``; also used by tests).

For every :func:`~d3ip_cli.physics.registry.operator_cases` entry, in float64: the
dot-product adjoint test, the adjoint against autograd, linearity and
``normal = A^H A``. For every optional CT backend present, agreement with the native
projector on a Shepp-Logan phantom (forward and adjoint, relative L2).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from d3ip_cli.physics.base import CHECKS
from d3ip_cli.physics.registry import TASKS, backend_status, ct_backend_cases, make_operator, operator_cases

AGREEMENT_TOL = 1e-2
"""Backends must agree with the native projector within 1% relative L2."""


def summary() -> dict[str, Any]:
    """Tasks (modality, defaults) and CT backends with availability."""
    return {
        "tasks": {n: {"modality": t.modality, "defaults": t.defaults, "description": t.description}
                  for n, t in TASKS.items()},
        "backends": backend_status(),
    }


def phantom(n: int) -> np.ndarray:
    """A modified Shepp-Logan phantom ``[n, n]`` in [0, 1] (scikit-image)."""
    from skimage.data import shepp_logan_phantom
    from skimage.transform import resize

    return resize(shepp_logan_phantom(), (n, n), anti_aliasing=True).astype(np.float64)


def backend_agreement(backend: str, reference: str = "native", n: int = 64, views: int = 45,
                      device: Any = "cpu") -> dict[str, float]:
    """Relative L2 differences ``|A_b x - A_r x| / |A_r x|`` and of the adjoints, on a phantom."""
    x = torch.from_numpy(np.stack([phantom(n), phantom(n).T]))
    a = make_operator("sparse-view", tuple(x.shape), views=views, backend=backend, device=device)
    r = make_operator("sparse-view", tuple(x.shape), views=views, backend=reference, device=device)
    x = x.to(device)
    with torch.no_grad():
        ya, yr = a.A(x), r.A(x)
        ba, br = a.A_adjoint(yr), r.A_adjoint(yr)
    return {"forward": float((ya - yr).norm() / yr.norm()), "adjoint": float((ba - br).norm() / br.norm())}


def run_checks(tol: float = 1e-5, device: Any = "cpu", seed: int = 0) -> dict[str, Any]:
    """Run every check; returns cases, agreement results, worst errors, failures and ``passed``."""
    g = torch.Generator().manual_seed(seed)
    cases, failures = [], []
    worst: dict[str, float] = {k: 0.0 for k in CHECKS}
    for case in operator_cases(device=device):
        op = case.build(g)
        errors = {k: float(f(op, dtype=torch.float64, device=device, generator=g)) for k, f in CHECKS.items()}
        limit = max(tol, case.tol)
        ok = all(np.isfinite(v) and v < limit for v in errors.values())
        for k, v in errors.items():
            worst[k] = max(worst[k], v)
        cases.append({"id": case.id, "operator": repr(op), "errors": errors, "passed": ok})
        if not ok:
            failures.append(f"{case.id}: " + ", ".join(f"{k}={v:.1e}" for k, v in errors.items() if not v < limit))
    agreement = []
    for be, ref in ct_backend_cases():
        res = backend_agreement(be, ref, device=device)
        ok = res["forward"] < AGREEMENT_TOL and res["adjoint"] < AGREEMENT_TOL
        agreement.append({"id": f"{be} vs {ref}", **res, "passed": ok})
        worst[f"agreement[{be}]"] = max(res.values())
        if not ok:
            failures.append(f"{be} disagrees with {ref}: forward {res['forward']:.1e}, adjoint {res['adjoint']:.1e}")
    return {"tolerance": tol, "agreement_tolerance": AGREEMENT_TOL, "cases": cases, "agreement": agreement,
            "worst": worst, "failures": failures, "passed": not failures}
