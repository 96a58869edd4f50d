"""Diffusion methods end to end on tiny volumes; checkpoint/resume bitwise; refusal of foreign checkpoints."""

import pytest
import torch

from d3ip_cli.core.errors import InputDataError, Interrupted, UsageError
from d3ip_cli.engine.checkpointing import Checkpointer, run_identity
from d3ip_cli.engine.diffusion import DIFFUSION_METHODS, reconstruct, settings_for


@pytest.mark.parametrize("method", DIFFUSION_METHODS)
def test_every_method_runs_on_ct(method, tiny_prior, ct_case):
    _, model, _ = tiny_prior
    x, op, y, x0 = ct_case
    s = settings_for(method, "fast", "CT", steps=4, adapt_iters=1, meta_outer=2, meta_inner=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    r = reconstruct(method, model, op, y, x0, s, generator=torch.Generator().manual_seed(0))
    assert r.image.shape == x.shape and torch.isfinite(r.image).all()
    assert r.stats["nfe_sample"] > 0
    assert (r.stats["adapt_steps"] > 0) == (method != "dds")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # caller's prior untouched


@pytest.mark.parametrize("method", ["dds", "d3ip"])
def test_a_v_head_prior_serves_the_engine(method, ct_case, tmp_path):
    """The cpu preset's v head: the engine sees ε̂ as from any prior; adapters train, the base stays put."""
    from d3ip_cli.prior import pretrain as pt
    from d3ip_cli.prior.checkpoint import load_prior

    cfg = pt.PretrainConfig.from_preset("tiny", steps=3)
    cfg.architecture = dict(cfg.architecture, prediction="v")
    pt.train(cfg, tmp_path / "v.safetensors")
    model, _ = load_prior(tmp_path / "v.safetensors")
    x, op, y, x0 = ct_case
    before = {k: v.clone() for k, v in model.state_dict().items()}
    s = settings_for(method, "fast", "CT", steps=4, adapt_iters=1)
    r = reconstruct(method, model, op, y, x0, s, generator=torch.Generator().manual_seed(0))
    assert r.image.shape == x.shape and torch.isfinite(r.image).all()
    assert (r.stats["adapt_steps"] > 0) == (method == "d3ip")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize("method", ["dds", "d3ip", "d3ip-mbir"])
def test_every_method_runs_on_mri(method, tiny_prior):
    from d3ip_cli.physics.registry import make_operator

    _, model, _ = tiny_prior
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 32, 32, generator=g)
    op = make_operator("cs-mri", (3, 32, 32), acceleration=4, coils=2, generator=g)
    y = op.A(x.to(torch.complex64))
    s = settings_for(method, "fast", "MR", steps=3, adapt_iters=1)
    r = reconstruct(method, model, op, y, op.pinv(y), s, generator=torch.Generator().manual_seed(0))
    assert r.image.is_complex() and r.image.shape == x.shape


def test_shared_adapter_changes_with_adaptation(tiny_prior, ct_case):
    _, model, _ = tiny_prior
    x, op, y, x0 = ct_case
    s = settings_for("d3ip", "fast", "CT", steps=3, adapt_iters=2)
    r = reconstruct("d3ip", model, op, y, x0, s, generator=torch.Generator().manual_seed(0))
    ups = [v for k, v in r.adapter.items() if ".up." in k]
    assert any(float(u.abs().max()) > 0 for u in ups)  # zero-initialised up-projections moved


@pytest.mark.parametrize("method", ["d3ip", "ddip"])
def test_resume_after_interrupt_is_bitwise_identical(method, tiny_prior, ct_case, tmp_path):
    _, model, _ = tiny_prior
    x, op, y, x0 = ct_case
    s = settings_for(method, "fast", "CT", steps=5, adapt_iters=1)
    ref = reconstruct(method, model, op, y, x0, s, generator=torch.Generator().manual_seed(3)).image

    key = run_identity(y, method, s.to_dict(), {})
    ck = Checkpointer(tmp_path, key, every=1)
    calls = {"n": 0}

    def stop_soon(info):
        calls["n"] += 1
        if calls["n"] == 3:
            ck.stop_requested = True

    with pytest.raises(Interrupted):
        reconstruct(method, model, op, y, x0, s, generator=torch.Generator().manual_seed(3), progress=stop_soon,
                    checkpointer=ck)
    assert ck.path.exists()
    ck2 = Checkpointer(tmp_path, key, every=1, resume=True)
    out = reconstruct(method, model, op, y, x0, s, generator=torch.Generator().manual_seed(3), checkpointer=ck2).image
    assert torch.equal(out, ref)


def test_checkpoint_of_other_input_refused(tiny_prior, ct_case, tmp_path):
    _, model, _ = tiny_prior
    x, op, y, x0 = ct_case
    s = settings_for("d3ip", "fast", "CT", steps=4, adapt_iters=1)
    ck = Checkpointer(tmp_path, run_identity(y, "d3ip", s.to_dict(), {"seed": 0}), every=1)
    ck.save({"x": torch.zeros(1)}, {"stage": "sample", "step": 0})
    other = Checkpointer(tmp_path, run_identity(y * 2, "d3ip", s.to_dict(), {"seed": 0}), every=1, resume=True)
    with pytest.raises(InputDataError, match=r"another input.*\(the measurement \(another input"):
        reconstruct("d3ip", model, op, y * 2, x0, s, generator=torch.Generator().manual_seed(0), checkpointer=other)
    s2 = settings_for("d3ip", "fast", "CT", steps=3, adapt_iters=1)  # the refusal names what differs
    other = Checkpointer(tmp_path, run_identity(y, "d3ip", s2.to_dict(), {"seed": 1}), every=1, resume=True)
    with pytest.raises(InputDataError, match=r"\(seed 0 \(now 1\), --steps 4 \(now 3\)\)"):
        other.load()


def test_shard_covers_all_slices():
    from d3ip_cli.engine.distributed import shard

    for n in (1, 5, 16, 17):
        for ws in (1, 2, 3):
            parts = [range(n)[shard(n, r, ws)] for r in range(ws)]
            assert [i for p in parts for i in p] == list(range(n))


def test_memory_plan_linear_and_refusal():
    from d3ip_cli.core.errors import ResourceError
    from d3ip_cli.engine.memory import plan

    dev = torch.device("cpu")
    kw = dict(model_channels=32, complex_=False, adapt_batch=3, device=dev, available=8 * 1024**3)
    p16 = plan(16, (128, 128), 60 * 185, **kw)
    p64 = plan(64, (128, 128), 60 * 185, **kw)
    assert p16.per_slice_bytes == p64.per_slice_bytes and p16.chunk >= 1
    with pytest.raises(ResourceError, match="at most .* slices fit"):
        plan(10**6, (512, 512), 60 * 725, **kw)
    # --samples K: K copies of every slice, in memory and as rows the network may batch together
    p4 = plan(4, (64, 64), 60 * 90, **kw, n_samples=4)
    assert p4.per_slice_bytes == 4 * plan(4, (64, 64), 60 * 90, **kw).per_slice_bytes and p4.chunk == 16
    with pytest.raises(ResourceError, match="--samples 4 holds 4 copies"):
        plan(10**5, (512, 512), 60 * 725, **kw, n_samples=4)


def test_bf16_autocast_runs_the_network_in_bf16_and_stays_close(tiny_prior, ct_case):
    """``precision="bf16"``: the sampler and the adaptation loss see the network under
    bfloat16 autocast (a different result, so it really ran) that stays close to float32;
    the adapter still trains and the base weights stay put."""
    from d3ip_cli.engine.diffusion import Autocast

    _, model, _ = tiny_prior
    x, op, y, x0 = ct_case
    xt, t = torch.randn(2, 1, 32, 32), torch.tensor([500, 500])
    with torch.no_grad():
        assert torch.equal(Autocast(model, False)(xt, t), model(xt, t))
        low = Autocast(model, True)(xt, t)
    assert low.dtype == torch.float32 and not torch.equal(low, model(xt, t))
    images = {}
    for prec in ("fp32", "bf16"):
        before = {k: v.clone() for k, v in model.state_dict().items()}
        s = settings_for("d3ip", "fast", "CT", steps=4, adapt_iters=2, precision=prec)
        r = reconstruct("d3ip", model, op, y, x0, s, generator=torch.Generator().manual_seed(0))
        assert any(float(v.abs().max()) > 0 for k, v in r.adapter.items() if ".up." in k)
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
        images[prec] = r.image
    diff = float((images["bf16"] - images["fp32"]).norm() / images["fp32"].norm())
    assert 0 < diff < 0.05, diff


def test_precision_is_checked():
    from d3ip_cli.core.device import resolve_precision
    from d3ip_cli.core.errors import UsageError

    with pytest.raises(UsageError, match="--precision 'fp16'"):
        settings_for("dds", "fast", "CT", precision="fp16")
    assert resolve_precision("auto", "cpu") in ("fp32", "bf16")
    assert settings_for("dds", "fast", "CT").precision == "auto"
    assert settings_for("dds", "standard", "CT").precision == "fp32"


def test_presets_resolve_per_modality_and_explicit_options_win():
    ct = settings_for("d3ip", "fast", "CT", "limited-angle")
    assert (ct.adapt_iters, ct.lora_rank) == (10, 4)
    sparse = settings_for("d3ip", "fast", "CT", "sparse-view")  # the task's own budget
    assert (sparse.adapt_iters, sparse.lora_rank) == (15, 16)
    assert settings_for("d3ip", "fast", "CT", "sparse-view", lora_rank=8).lora_rank == 8
    assert settings_for("d3ip", "standard", "CT", "sparse-view").lora_rank == 4
    mr = settings_for("d3ip", "fast", "MR")
    assert (mr.adapt_iters, mr.dc, mr.adapt_cg, mr.gamma, mr.lora_rank) == (6, "prox", 0, 10.0, 16)
    standard = settings_for("d3ip", "standard", "CT")
    assert (standard.adapt_iters, standard.lora_rank) == (10, 4)  # the paper's
    assert settings_for("d3ip", "standard", "MR").adapt_iters == 10
    assert settings_for("d3ip", "fast", "MR", adapt_iters=7).adapt_iters == 7
    assert settings_for("dds", "fast", "CT").adapt_iters == 0
    assert settings_for("d3ip-mbir", "fast", "MR").dc == "admm-tv-z"
    # d3ip-mbir's TV-along-z weight per modality (chosen on held-out volumes; the reference's is 0.01)
    assert (settings_for("d3ip-mbir", "fast", "MR").lam, settings_for("d3ip-mbir", "standard", "CT").lam) == (0.003, 0.03)
    assert settings_for("d3ip-mbir", "fast", "MR", lam=0.02).lam == 0.02
    assert settings_for("dds", "standard", "CT").t_start == 1000  # the paper's: from pure noise
    assert (settings_for("d3ip", "fast", "CT").t_start, settings_for("d3ip", "fast", "MR").t_start) == (60, 250)
    assert settings_for("d3ip", "fast", "CT").lr == 3e-3 and settings_for("d3ip", "standard", "CT").lr == 1e-3
    with pytest.raises(UsageError, match=r"--t-start must be in \[--steps, 1000\]"):
        settings_for("dds", "fast", "CT", t_start=10)  # fewer training steps than sampling steps
    with pytest.raises(UsageError, match="give --t-start too"):
        settings_for("dds", "fast", "CT", steps=100)  # more steps than the preset's t_start
    assert settings_for("dds", "fast", "CT", steps=100, t_start=1000).steps == 100
    with pytest.raises(UsageError, match="would run as dds"):
        settings_for("d3ip", "fast", "CT", steps=20, t_start=20)  # no step at t >= 20: no adaptation
    assert settings_for("dds", "fast", "CT", steps=20, t_start=20).t_start == 20  # dds does not adapt


@pytest.mark.parametrize("method", ["dds", "d3ip", "d3ip-meta"])
def test_the_sampler_runs_on_the_truncated_trajectory(method, tiny_prior, ct_case, monkeypatch):
    """With t_start the network only ever sees the steps below it (sampling, adaptation, Reptile)."""
    from d3ip_cli.engine import diffusion

    _, model, _ = tiny_prior
    x, op, y, x0 = ct_case
    seen: list[int] = []
    real_loss = diffusion.adaptation_loss

    def loss(net, op_, y_, smap, xt, idx, t, *args):
        seen.append(int(t))
        return real_loss(net, op_, y_, smap, xt, idx, t, *args)

    monkeypatch.setattr(diffusion, "adaptation_loss", loss)
    s = settings_for(method, "fast", "CT", steps=4, t_start=120, adapt_iters=1, meta_outer=3, meta_inner=1)
    steps: list[int] = []
    diffusion.reconstruct(method, model, op, y, x0, s, generator=torch.Generator().manual_seed(0),
                          progress=lambda info: steps.append(int(info["t"])) if "t" in info else None)
    assert steps[:4] == [90, 60, 30, 0]  # evenly spread over [0, 120), not [0, 1000)
    if method != "dds":
        assert seen and all(20 <= t <= 90 for t in seen), seen


@pytest.mark.parametrize("contiguous", [False, True])
def test_minibatch_draws(contiguous):
    """``random`` (the default) draws each minibatch alone; ``cover`` walks shuffled passes, so a
    step's minibatches visit every slice (block start) before any twice; both seeded."""
    from d3ip_cli.engine.diffusion import _minibatches

    pool = torch.arange(3, 19)  # 16 slices of a shard
    g = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    for draw in ("random", "cover"):
        a = _minibatches(pool, 3, 10, contiguous, draw, g())
        assert [x.tolist() for x in a] == [x.tolist() for x in _minibatches(pool, 3, 10, contiguous, draw, g())]
        for b in a:
            assert len(b) == 3 and len(set(b.tolist())) == 3 and set(b.tolist()) <= set(pool.tolist())
            if contiguous:
                assert b.tolist() == list(range(b[0], b[0] + 3))
    covered = _minibatches(pool, 3, 10, contiguous, "cover", g())
    if contiguous:  # 14 block starts: the first 10 batches start at 10 different slices
        assert len({int(b[0]) for b in covered}) == 10
    else:  # 30 draws over 16 slices: the first pass holds each slice once
        seq = [i for b in covered for i in b.tolist()]
        assert set(seq[:15]) | set(seq[15:18]) == set(pool.tolist()) and len(set(seq[:15])) == 15
    with pytest.raises(UsageError, match="adapt_draw"):
        settings_for("d3ip", "fast", "CT", adapt_draw="sometimes")


def test_noise_fit_lands_each_slice_on_its_noise_target(ct_case):
    """--fit noise: the data-consistency step fits from x̂0 until each slice's residual is the
    target of its recorded noise; noiseless data are fitted much closer than by the fixed 5 steps;
    an unknown noise level falls back to those steps."""
    from d3ip_cli.engine.diffusion import StateMap, make_dc
    from d3ip_cli.physics.noise import gaussian, noise_level

    x, op, y, _ = ct_case
    noisy = gaussian(y, 0.05, torch.Generator().manual_seed(1))
    smap = StateMap(x.shape[0], False)
    start = smap.to_state(torch.zeros_like(x))

    def residual(data, dc):
        out = smap.to_image(dc(start, 10))
        return ((op.A(out) - data) ** 2).reshape(x.shape[0], -1).sum(1).double()

    s = settings_for("dds", "fast", "CT", fit="noise", tau=0.5, cg_max=300)  # this tiny system is ill-conditioned
    level = noise_level(noisy, {"model": "gaussian", "sigma_absolute": 0.05})
    target = level.target(x.shape[1] * x.shape[2], 0.5)
    torch.testing.assert_close(residual(noisy, make_dc(op, noisy, smap, s, level)), target, rtol=1e-3, atol=0.0)
    exact = residual(y, make_dc(op, y, smap, s, noise_level(y, {"model": "none"})))
    steps = residual(y, make_dc(op, y, smap, settings_for("dds", "fast", "CT", fit="steps")))
    assert (exact < 0.05 * steps).all()
    unknown = residual(y, make_dc(op, y, smap, s, None))
    torch.testing.assert_close(unknown, steps)


def test_mbir_noise_fit_runs_the_admm_step_from_the_fitted_estimate(ct_case):
    """d3ip-mbir with mbir_start = fit (the fast preset's on limited-angle): each slice is first fitted
    down to its noise, then the ADMM-TV-z step couples the slices from there (nearer the data than the
    ADMM step from x̂0 alone); with the noise unknown, --fit steps, or mbir_start = x0 (the other tasks'
    preset), the ADMM step runs alone."""
    from d3ip_cli.engine import consistency
    from d3ip_cli.engine.diffusion import StateMap, make_dc
    from d3ip_cli.physics.noise import noise_level

    x, op, y, _ = ct_case
    smap = StateMap(x.shape[0], False)
    start = smap.to_state(torch.zeros_like(x))
    s = settings_for("d3ip-mbir", "fast", "CT", "limited-angle")
    assert s.fit == "noise" and s.dc == "admm-tv-z" and s.mbir_start == "fit"
    assert settings_for("d3ip-mbir", "fast", "CT", "sparse-view").mbir_start == "x0"
    assert settings_for("d3ip-mbir", "standard", "CT", "limited-angle").mbir_start == "x0"
    level = noise_level(y, {"model": "none"})
    fitted = smap.to_image(make_dc(op, y, smap, s, level)(start, 10))
    admm = consistency.admm_tv_z_dc(op, y, rho=s.rho, lam=s.lam, n_admm=s.admm_iter, n_cg=s.admm_cg_iter)
    fit = consistency.discrepancy_dc(op, y, level.target(x.shape[1] * x.shape[2], s.tau), s.cg_max)
    zero = smap.to_image(start)
    torch.testing.assert_close(fitted, admm(fit(zero)))
    alone = smap.to_image(make_dc(op, y, smap, s, None)(start, 10))
    torch.testing.assert_close(alone, admm(zero))
    for other in (settings_for("d3ip-mbir", "fast", "CT", "limited-angle", fit="steps"),
                  settings_for("d3ip-mbir", "fast", "CT", "sparse-view")):
        torch.testing.assert_close(smap.to_image(make_dc(op, y, smap, other, level)(start, 10)), alone)

    def residual(img):
        return float(((op.A(img) - y) ** 2).sum())

    assert residual(fitted) < 0.7 * residual(alone)  # about half on this case


def test_admm_tv_z_step_does_not_couple_stacked_samples(ct_case):
    """With the chains of --samples stacked along z, d3ip-mbir's TV along z (and CG's step sizes, also in
    the fixed CG and proximal steps) act within each copy of the volume: two stacked copies give what
    each gives alone."""
    from d3ip_cli.engine import consistency

    x, op, y, x0 = ct_case
    z = x.shape[0]
    alone = consistency.admm_tv_z_dc(op, y, lam=0.05)
    copies = [i for _ in range(2) for i in range(z)]
    together = consistency.admm_tv_z_dc(op.select(copies), y[copies], lam=0.05, groups=2)
    other = torch.rand(x0.shape, generator=torch.Generator().manual_seed(1))
    out = together(torch.cat([x0, other]))
    torch.testing.assert_close(out[:z], alone(x0), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out[z:], alone(other), rtol=1e-4, atol=1e-5)
    for fn in (consistency.cg_dc, consistency.prox_dc):  # the fixed CG steps: step sizes per copy
        out2 = fn(op.select(copies), y[copies], groups=2)(torch.cat([x0, other]))
        torch.testing.assert_close(out2[z:], fn(op, y)(other), rtol=1e-4, atol=1e-5)
    coupled = consistency.admm_tv_z_dc(op.select(copies), y[copies], lam=0.05)(torch.cat([x0, other]))
    assert not torch.allclose(coupled[:z], out[:z], rtol=1e-4, atol=1e-5)  # the test can fail: one stack couples


@pytest.mark.parametrize("method", ["d3ip", "d3ip-mbir", "ddip"])
def test_samples_are_drawn_together_at_the_adaptation_cost_of_one(method, tiny_prior, ct_case):
    """--samples K runs K chains side by side: K times the sampling evaluations, the same adaptation
    evaluations as one sample (each minibatch takes M slices from chains drawn at random); the result
    is the chains' mean with their standard deviation, and K = 1 has no deviation map."""
    _, model, _ = tiny_prior
    x, op, y, x0 = ct_case
    s = settings_for(method, "fast", "CT", steps=4, adapt_iters=2)
    one = reconstruct(method, model, op, y, x0, s, generator=torch.Generator().manual_seed(0))
    three = reconstruct(method, model, op, y, x0, s, generator=torch.Generator().manual_seed(0), chains=3)
    assert one.std is None and three.image.shape == three.std.shape == x.shape
    assert torch.isfinite(three.image).all() and (three.std >= 0).all() and float(three.std.max()) > 0
    assert three.stats["nfe_sample"] == 3 * one.stats["nfe_sample"]
    assert three.stats["nfe_adapt"] == one.stats["nfe_adapt"] > 0
