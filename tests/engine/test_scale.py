"""Scaling out (issue 6): torchrun sharding with a shared adapter, lockstep checkpoints, memory limits.

The torchrun test runs the real CLI under ``torchrun --nproc-per-node 2`` (gloo, CPU) on a
4-slice 32x32 phantom with a tiny prior trained here: both ranks must end with bitwise
identical adapters, and the result's PSNR must be within 0.3 dB of a one-process run
(ranks draw different noise and minibatches from their shards, so the runs are not
identical; with this barely trained prior the seed-to-seed spread is about 0.1 dB).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from d3ip_cli.core.errors import InputDataError, ResourceError, UsageError
from d3ip_cli.engine import distributed
from d3ip_cli.engine.checkpointing import Checkpointer
from d3ip_cli.engine.memory import GiB, available_bytes, plan


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def volume(tmp_path_factory):
    from d3ip_cli.core.types import Volume
    from d3ip_cli.io.volumes import write_volume
    from d3ip_cli.prior.phantoms import ellipsoid_volume

    x = ellipsoid_volume(4, 32, generator=torch.Generator().manual_seed(0))
    return write_volume(Volume(x.numpy()), tmp_path_factory.mktemp("vol") / "phantom.npy")


def _recon_args(volume, prior, out):
    return ["reconstruct", str(volume), "--task", "sparse-view", "--views", "16", "--prior", str(prior),
            "--steps", "4", "--adapt-iters", "1", "--seed", "0", "--device", "cpu", "-o", str(out), "--json"]


@pytest.mark.slow
def test_torchrun_two_ranks_share_adapter_and_match_one_process(prior, volume, tmp_path):
    from safetensors.torch import load_file

    env = dict(os.environ, OMP_NUM_THREADS="1", D3IP_DUMP_ADAPTER=str(tmp_path / "adapter-rank{rank}.safetensors"))
    one = subprocess.run([sys.executable, "-m", "d3ip_cli", *_recon_args(volume, prior, tmp_path / "one.npy")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    single = load_file(str(tmp_path / "adapter-rank0.safetensors"))

    torchrun = Path(sys.executable).parent / "torchrun"
    two = subprocess.run([str(torchrun), "--nproc-per-node", "2", "--master-port", "29641", "-m", "d3ip_cli",
                          *_recon_args(volume, prior, tmp_path / "two.npy")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    doc1, doc2 = json.loads(one.stdout), json.loads(two.stdout)  # rank 0 alone prints the record
    assert doc2["world_size"] == 2 and doc2["engine"]["world_size"] == 2
    assert doc2["engine"]["stats"]["nfe_sample"] == doc1["engine"]["stats"]["nfe_sample"]  # summed over ranks

    r0 = load_file(str(tmp_path / "adapter-rank0.safetensors"))
    r1 = load_file(str(tmp_path / "adapter-rank1.safetensors"))
    assert r0.keys() == r1.keys() == single.keys() and len(r0) > 10
    assert all(torch.equal(r0[k], r1[k]) for k in r0)  # all-reduced gradients: one adapter
    assert any(float(v.abs().max()) > 0 for k, v in r0.items() if ".up." in k)  # it was adapted

    import numpy as np

    out = np.load(tmp_path / "two.npy")
    assert out.shape == (4, 32, 32) and np.isfinite(out).all()  # rank 0 gathered every shard
    assert abs(doc2["metrics"]["psnr"] - doc1["metrics"]["psnr"]) < 0.3, (doc1["metrics"], doc2["metrics"])


@pytest.mark.slow
def test_torchrun_draws_samples_together_on_every_rank(prior, volume, tmp_path):
    """--samples 2 under torchrun: each rank holds both chains of its shard under the one all-reduced
    adapter; rank 0 gathers the mean and the standard deviation of the whole volume."""
    import numpy as np
    from safetensors.torch import load_file

    env = dict(os.environ, OMP_NUM_THREADS="1", D3IP_DUMP_ADAPTER=str(tmp_path / "adapter-rank{rank}.safetensors"))
    torchrun = Path(sys.executable).parent / "torchrun"
    two = subprocess.run([str(torchrun), "--nproc-per-node", "2", "--master-port", "29643", "-m", "d3ip_cli",
                          *_recon_args(volume, prior, tmp_path / "two.npy"), "--method", "d3ip-mbir", "--samples", "2"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    doc = json.loads(two.stdout)
    assert doc["engine"]["samples"] == 2 and doc["engine"]["world_size"] == 2
    mean, std = np.load(tmp_path / "two.npy"), np.load(tmp_path / "two_std.npy")
    assert mean.shape == std.shape == (4, 32, 32) and np.isfinite(mean).all() and (std >= 0).all()
    assert (std.reshape(4, -1).max(1) > 0).all()  # every slice, on both ranks' shards, had two distinct chains
    r0 = load_file(str(tmp_path / "adapter-rank0.safetensors"))
    r1 = load_file(str(tmp_path / "adapter-rank1.safetensors"))
    assert all(torch.equal(r0[k], r1[k]) for k in r0)


@pytest.mark.slow
def test_torchrun_sigterm_then_resume_matches_uninterrupted(prior, volume, tmp_path):
    """Both ranks agree on the stop, save the same step, exit 130; the resumed run is bitwise the uninterrupted one."""
    import signal
    import time

    import numpy as np

    from d3ip_cli.prior.checkpoint import read_metadata

    torchrun = Path(sys.executable).parent / "torchrun"
    env = dict(os.environ, OMP_NUM_THREADS="1")

    def launch(port, out, *extra):
        args = _recon_args(volume, prior, out)
        args[args.index("--steps") + 1] = "8"
        return subprocess.Popen([str(torchrun), "--nproc-per-node", "2", "--master-port", str(port), "-m", "d3ip_cli",
                                 *args, *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)

    ref = launch(29651, tmp_path / "ref.npy")
    assert ref.wait(timeout=300) == 0, ref.communicate()[1][-3000:]
    ck = tmp_path / "ck"
    opts = ("--checkpoint-dir", str(ck), "--checkpoint-every", "1")
    p = launch(29652, tmp_path / "out.npy", *opts)
    t0 = time.monotonic()
    while not (ck / "sample0" / "state-rank1.safetensors").exists():
        assert p.poll() is None and time.monotonic() - t0 < 120, p.communicate()[1][-3000:]
        time.sleep(0.02)
    p.send_signal(signal.SIGTERM)  # torchrun forwards it to both ranks
    _, err = p.communicate(timeout=120)
    assert p.returncode != 0 and err.count("interrupted; checkpoint saved") == 2, err[-3000:]
    steps = {read_metadata(ck / "sample0" / f"state-rank{r}.safetensors")["step"] for r in (0, 1)}
    assert len(steps) == 1 and steps.pop() < 6  # the same step on both ranks, mid-run
    p = launch(29653, tmp_path / "out.npy", *opts, "--resume")
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-3000:]
    assert np.array_equal(np.load(tmp_path / "out.npy"), np.load(tmp_path / "ref.npy"))


def test_more_ranks_than_slices_refused(prior, monkeypatch):
    from d3ip_cli.engine.diffusion import reconstruct, settings_for
    from d3ip_cli.physics.registry import make_operator
    from d3ip_cli.prior.checkpoint import load_prior

    model, _ = load_prior(prior)
    op = make_operator("sparse-view", (2, 32, 32), views=8)
    x = torch.rand(2, 32, 32)
    monkeypatch.setattr(distributed, "world", lambda: (0, 3))
    with pytest.raises(UsageError, match="at most 2 processes"):
        reconstruct("d3ip", model, op, op.A(x), x, settings_for("d3ip", steps=2), generator=torch.Generator())


# -- lockstep checkpoints ----------------------------------------------------------------


def _save_steps(ck: Checkpointer, steps):
    for s in steps:
        ck.save({"x": torch.full((2,), float(s))}, {"stage": "sample", "step": s})


def test_checkpoint_keeps_previous_generation(tmp_path):
    ck = Checkpointer(tmp_path, {"k": 1}, every=1)
    _save_steps(ck, [0, 1, 2])
    assert ck.path.exists() and ck.prev_path.exists()
    assert not list(tmp_path.glob(".d3ip-*"))  # no temporary left
    ck.stop_requested = True
    from d3ip_cli.core.errors import Interrupted

    with pytest.raises(Interrupted):  # a stop at a step just saved does not overwrite .prev with it
        ck.check_stop({"x": torch.zeros(2)}, {"stage": "sample", "step": 2})
    back = Checkpointer(tmp_path, {"k": 1}, resume=True)
    assert back.load()[1]["step"] == 2
    ck.path.unlink()  # killed between the renames: only .prev is left
    assert back.load()[1]["step"] == 1


@pytest.mark.parametrize("mine,others_max,expect", [
    ((4, 3), 4, 4),  # every rank saved step 4
    ((4, 3), 3, 3),  # another rank was killed before saving step 4: all go back to 3
    ((3, 2), 4, 3),  # this rank is the one behind
])
def test_lockstep_resume_picks_common_step(tmp_path, monkeypatch, mine, others_max, expect):
    ck = Checkpointer(tmp_path, {"k": 1}, every=1)
    _save_steps(ck, sorted(mine))

    def fake_all_reduce(value, op="max"):  # the other rank's view: newest step `others_max`, holds both
        return min(value, others_max) if op == "min" else value

    monkeypatch.setattr(distributed, "all_reduce_int", fake_all_reduce)
    tensors, meta = Checkpointer(tmp_path, {"k": 1}, resume=True).load(agree=True)
    assert meta["step"] == expect and float(tensors["x"][0]) == expect


def test_lockstep_resume_without_common_step_refused(tmp_path, monkeypatch):
    ck = Checkpointer(tmp_path, {"k": 1}, every=1)
    _save_steps(ck, [4, 6])
    calls = iter([4, 0])  # the ranks' newest common step is 4, but some rank does not hold it

    monkeypatch.setattr(distributed, "all_reduce_int", lambda value, op="max": next(calls))
    with pytest.raises(InputDataError, match="do not share a step"):
        Checkpointer(tmp_path, {"k": 1}, resume=True).load(agree=True)


# -- memory ------------------------------------------------------------------------------


def test_memory_limit_env(monkeypatch):
    dev = torch.device("cpu")
    monkeypatch.setenv("D3IP_MEMORY_LIMIT_GB", "0.5")
    assert available_bytes(dev) == GiB // 2
    kw = dict(model_channels=32, complex_=False, adapt_batch=3, device=dev)
    with pytest.raises(ResourceError, match=r"d3ip may use 0.50 GiB \(D3IP_MEMORY_LIMIT_GB\).*at most \d+ slices"):
        plan(10_000, (128, 128), 60 * 185, **kw)
    with pytest.raises(ResourceError, match=r"per rank.* with 4 ranks"):
        plan(10_000, (128, 128), 60 * 185, ranks=4, **kw)
    monkeypatch.setenv("D3IP_MEMORY_LIMIT_GB", "lots")
    with pytest.raises(UsageError, match="D3IP_MEMORY_LIMIT_GB"):
        available_bytes(dev)
