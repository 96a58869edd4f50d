"""The sampler against analytic cases: a Gaussian prior, and fully sampled data."""

import torch

from d3ip_cli.engine.samplers import ddim_sample
from d3ip_cli.prior import schedule


def gaussian_eps(mu: float, sigma: float, abar: torch.Tensor):
    """Exact ε-prediction E[ε | x_t] for data x0 ~ N(mu, sigma²) (independent pixels)."""

    def eps(x, t):
        a = float(abar[t])
        return (1 - a) ** 0.5 * (x - a**0.5 * mu) / (a * sigma**2 + 1 - a)

    return eps


def _run(eta, steps, mu=0.3, sigma=0.5, n=20000, t_start=None):
    abar = schedule.alphas_cumprod()
    g = torch.Generator().manual_seed(0)
    ts = schedule.ddim_timesteps(steps, t_start=t_start)
    a0 = float(abar[ts[0]])
    x = a0**0.5 * mu + (a0 * sigma**2 + 1 - a0) ** 0.5 * torch.randn(n, 1, 1, 1, generator=g, dtype=torch.float64)
    return ddim_sample(gaussian_eps(mu, sigma, abar), x, ts, abar, eta=eta, generator=g)


def test_gaussian_prior_mean_and_variance_ode():
    """η = 0 (probability-flow ODE) reproduces the prior's mean and variance."""
    out = _run(0.0, 250)
    assert abs(float(out.mean()) - 0.3) < 0.01
    assert abs(float(out.std()) - 0.5) < 0.01


def test_truncated_trajectory_starts_lower_and_still_reproduces_the_prior():
    """``t_start`` spreads the steps over [0, t_start): started from the marginal at that
    step, the ODE still lands on the prior's mean and variance."""
    assert schedule.ddim_timesteps(20) == list(range(950, -1, -50))
    assert schedule.ddim_timesteps(20, t_start=60) == list(range(57, -1, -3))
    assert schedule.ddim_timesteps(5, t_start=1000) == schedule.ddim_timesteps(5)
    for bad in (0, 1001):
        try:
            schedule.ddim_timesteps(5, t_start=bad)
        except ValueError:
            continue
        raise AssertionError(f"t_start={bad} accepted")
    out = _run(0.0, 100, t_start=300)
    assert abs(float(out.mean()) - 0.3) < 0.01
    assert abs(float(out.std()) - 0.5) < 0.01


def test_gaussian_prior_stochastic_mean_and_shrinkage():
    """η > 0 keeps the mean; the DDS-style noise re-draw around x̂0 shrinks the variance
    (it is not a consistent discretisation of the reverse SDE), monotonically in η."""
    stds = []
    for eta in (0.0, 0.5, 0.85):
        out = _run(eta, 50)
        assert abs(float(out.mean()) - 0.3) < 0.01, eta
        stds.append(float(out.std()))
    assert stds[0] > stds[1] > stds[2] > 0.35


def test_fully_sampled_noiseless_returns_truth():
    from d3ip_cli.engine import consistency
    from d3ip_cli.physics.registry import make_operator

    g = torch.Generator().manual_seed(1)
    truth = torch.rand(3, 12, 10, generator=g)
    op = make_operator("cs-mri", (3, 12, 10), mask_array=torch.ones(3, 12, 10))
    y = op.A(truth.to(torch.complex64))
    dc = consistency.cg_dc(op, y, n_iter=3)
    abar = schedule.alphas_cumprod()
    # a deliberately poor denoiser: the data consistency alone must recover the truth
    eps = lambda x, t: torch.zeros_like(x)  # noqa: E731
    x = torch.randn(3, 12, 10, generator=g)
    out = ddim_sample(eps, x, schedule.ddim_timesteps(10), abar, eta=0.85,
                      dc=lambda x0, t: dc(x0).real.to(x0.dtype), generator=g)
    assert torch.allclose(out, truth, atol=1e-5)
