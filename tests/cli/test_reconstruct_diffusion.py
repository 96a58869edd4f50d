"""`d3ip reconstruct` with diffusion methods through the real CLI (issue 6).

Checkpoint/resume with real processes and real signals (SIGKILL, SIGTERM), refusal of
foreign checkpoints, ``--samples K`` mean + standard-deviation map, and the memory
refusal. A tiny prior is trained here (machinery, not quality).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch


pytestmark = pytest.mark.usefixtures("one_thread")


def _phantom(path: Path, seed: int = 0, slices: int = 4) -> Path:
    from d3ip_cli.core.types import Volume
    from d3ip_cli.io.volumes import write_volume
    from d3ip_cli.prior.phantoms import ellipsoid_volume

    x = ellipsoid_volume(slices, 32, generator=torch.Generator().manual_seed(seed))
    return write_volume(Volume(x.numpy()), path)


@pytest.fixture(scope="module")
def volume(tmp_path_factory):
    return _phantom(tmp_path_factory.mktemp("vol") / "phantom.npy")


STEPS = 10  # long enough to interrupt mid-run


def _args(volume, prior, out, *extra):
    return ["reconstruct", str(volume), "--task", "sparse-view", "--views", "16", "--prior", str(prior),
            "--steps", str(STEPS), "--adapt-iters", "1", "--seed", "3", "--device", "cpu", "-o", str(out), *extra]


def _d3ip(*args, **kw) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "d3ip_cli", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, **kw)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    t0 = time.monotonic()
    while not path.exists():
        assert proc.poll() is None, f"finished before a checkpoint was written: {proc.communicate()[1][-2000:]}"
        assert time.monotonic() - t0 < timeout, "no checkpoint written"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def uninterrupted(prior, volume, tmp_path_factory):
    """The reference: the same run, never interrupted, no checkpoints."""
    out = tmp_path_factory.mktemp("ref") / "ref.npy"
    p = _d3ip(*_args(volume, prior, out))
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-2000:]
    return np.load(out)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_interrupted_run_resumes_bitwise(sig, prior, volume, uninterrupted, tmp_path):
    ck = tmp_path / "ck"
    out = tmp_path / "out.npy"
    p = _d3ip(*_args(volume, prior, out, "--checkpoint-dir", ck, "--checkpoint-every", "1"))
    _wait_for(ck / "sample0" / "state-rank0.safetensors", p)
    os.kill(p.pid, sig)
    _, err = p.communicate(timeout=120)
    if sig == signal.SIGKILL:
        assert p.returncode == -signal.SIGKILL
    else:  # saved at the next step boundary, documented exit code
        assert p.returncode == 130, err[-2000:]
        assert "interrupted; checkpoint saved" in err and "--resume" in err
    assert not out.exists()
    from d3ip_cli.prior.checkpoint import read_metadata

    step = read_metadata(ck / "sample0" / "state-rank0.safetensors")["step"]
    assert 0 <= step < STEPS - 2  # genuinely mid-run

    p = _d3ip(*_args(volume, prior, out, "--checkpoint-dir", ck, "--checkpoint-every", "1", "--resume", "--json"))
    stdout, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-2000:]
    assert json.loads(stdout)["engine"]["stats"]["nfe_sample"] == 4 * STEPS  # counts restored with the state
    res = np.load(out)
    assert res.dtype == uninterrupted.dtype and np.array_equal(res, uninterrupted)  # bitwise on CPU


def test_resume_refuses_foreign_checkpoint_and_missing_one(cli, prior, volume, tmp_path):
    ck = tmp_path / "ck"
    opts = ["--task", "sparse-view", "--views", "16", "--prior", prior, "--steps", "3", "--adapt-iters", "1",
            "--device", "cpu", "--checkpoint-dir", ck, "--checkpoint-every", "1"]
    r = cli(["reconstruct", volume, *opts, "-o", tmp_path / "a.npy"])
    assert r.exit_code == 0, r.output
    assert (ck / "sample0" / "state-rank0.safetensors").exists()
    assert "holds an earlier run's sampler state" not in r.stderr
    r = cli(["reconstruct", volume, *opts, "-o", tmp_path / "a2.npy"])  # again without --resume: said, then afresh
    assert r.exit_code == 0 and "holds an earlier run's sampler state: this run starts afresh" in r.stderr, r.output

    other = _phantom(tmp_path / "other.npy", seed=1)
    for args in (["reconstruct", other, *opts, "--resume"],  # another input
                 ["reconstruct", volume, *opts, "--resume", "--lr", "0.01"]):  # another configuration
        r = cli([*args, "-o", tmp_path / "b.npy"])
        assert r.exit_code == 3 and "another input or configuration" in r.output, r.output
    r = cli(["reconstruct", volume, *opts[:-4], "--checkpoint-dir", tmp_path / "none", "--resume",
             "-o", tmp_path / "b.npy"])
    assert r.exit_code == 3 and "no checkpoint" in r.output, r.output
    assert not (tmp_path / "b.npy").exists()


def _samples(cli, volume, prior, out, acceleration):
    r = cli(["reconstruct", volume, "--task", "cs-mri", "--acceleration", acceleration, "--coils", "1",
             "--prior", prior, "--steps", "4", "--adapt-iters", "1", "--samples", "4", "--gamma", "1e6",
             "--device", "cpu", "-o", out, "--json", "--report", out.with_suffix(".png")])
    assert r.exit_code == 0, r.output
    from PIL import Image

    # the report's rows: initial, reconstruction, reference, error and the posterior std (2.6 in. each, 90 dpi)
    assert Image.open(out.with_suffix(".png")).size[1] == round(5 * 2.6 * 90)
    doc = json.loads(r.stdout)
    std_path = out.with_name(out.name.replace(".npy", "_std.npy"))
    assert doc["engine"]["samples"] == 4 and doc["uncertainty_output"] == str(std_path.resolve())
    assert [o["role"] for o in doc["outputs"]] == ["output", "uncertainty", "report"]
    mean, std = np.load(out), np.load(std_path)
    assert mean.shape == std.shape == (2, 32, 32) and (std >= 0).all()
    return mean, std


def test_samples_write_mean_and_std(cli, prior, tmp_path):
    volume = _phantom(tmp_path / "two.npy", slices=2)
    # Fully sampled noiseless single-coil k-space with a hard proximal data consistency
    # (gamma 1e6): the data determine the image, every sample equals it up to float32
    # rounding (measured: max std ~1e-7 on a [0, 1] image; PSNR ~147 dB).
    mean, std = _samples(cli, volume, prior, tmp_path / "full.npy", 1)
    ref = np.load(volume)
    assert std.max() < 1e-5 and np.abs(mean - ref).max() < 1e-4
    # 4x undersampled: the prior fills the unmeasured k-space, differently per sample
    # (measured: mean std ~0.33).
    _, std4 = _samples(cli, volume, prior, tmp_path / "under.npy", 4)
    assert std4.mean() > 0.05 and std4.mean() > 1e3 * std.max()


def test_memory_refusal_names_the_size_that_fits(cli, prior, volume, tmp_path, monkeypatch):
    """``D3IP_MEMORY_LIMIT_GB`` caps the plan; a volume over it is refused before any work (exit 5)
    with the number of slices that fit, and that many do run."""
    from d3ip_cli.engine.diffusion import settings_for
    from d3ip_cli.engine.memory import GiB, plan
    from d3ip_cli.physics.registry import make_operator
    from d3ip_cli.prior.checkpoint import read_metadata

    op = make_operator("sparse-view", (4, 32, 32), views=16)
    meas = int(np.prod(op.out_shape[1:]))
    channels = read_metadata(prior)["architecture"]["model_channels"]
    p = plan(1, (32, 32), meas, model_channels=channels, complex_=False,
             adapt_batch=settings_for("d3ip", "fast", "CT").adapt_batch, device=torch.device("cpu"), available=64 * GiB)
    fixed = p.fixed_bytes + p.per_image_activation_bytes
    monkeypatch.setenv("D3IP_MEMORY_LIMIT_GB", repr((fixed + 2.5 * p.per_slice_bytes) / 0.7 / GiB))

    args = ["--task", "sparse-view", "--views", "16", "--prior", prior, "--steps", "2", "--adapt-iters", "1",
            "--device", "cpu"]
    r = cli(["reconstruct", volume, *args, "-o", tmp_path / "all.npy"])
    assert r.exit_code == 5, r.output
    assert "4 slices of 32x32" in r.output and "at most 2 slices fit" in r.output and "D3IP_MEMORY_LIMIT_GB" in r.output
    import re

    need, may = map(float, re.search(r"need about ([\d.]+) GiB free but d3ip may use ([\d.]+) GiB", r.output).groups())
    assert need >= may  # the message adds up: what it needs is not below what it may use (2 decimals)
    assert not (tmp_path / "all.npy").exists()
    r = cli(["reconstruct", volume, *args, "--slices", "0:2", "-o", tmp_path / "slab.npy"])
    assert r.exit_code == 0, r.output
    assert np.load(tmp_path / "slab.npy").shape == (2, 32, 32)


def test_a_grid_far_from_the_priors_scale_is_warned(cli, prior, volume, tmp_path):
    def warnings_at(grid):
        r = cli(["reconstruct", volume, "--task", "sparse-view", "--views", "16", "--prior", prior, "--method", "dds",
                 "--steps", "2", "--grid", str(grid), "-o", tmp_path / f"g{grid}.npy", "--json"])
        assert r.exit_code == 0, r.output
        return [w for w in json.loads(r.stdout)["warnings"] if "pixel scale" in w]

    assert warnings_at(32) == []  # the tiny prior's own 32x32
    assert "trained on 32x32 phantoms and this grid is 136x136" in warnings_at(136)[0]


def test_an_existing_std_map_is_refused_before_sampling(cli, prior, volume, tmp_path):
    out = tmp_path / "r.npy"
    (tmp_path / "r_std.npy").write_bytes(b"keep")
    r = cli(["reconstruct", volume, "--task", "sparse-view", "--views", "16", "--prior", prior, "--method", "dds",
             "--steps", "2", "--samples", "2", "-o", out])
    assert r.exit_code == 4 and "r_std.npy" in r.output and "dds:" not in r.output
    assert (tmp_path / "r_std.npy").read_bytes() == b"keep" and not out.exists()


def test_an_empty_folder_at_a_file_output_is_refused_before_sampling(cli, prior, volume, tmp_path):
    """`mkdir r.nii.gz` by mistake: refused (exit 4) before the sampler runs, for reconstruct and
    convert alike; only a DICOM series may go into an empty folder."""
    for name in ("r.nii.gz", "r.npy"):
        out = tmp_path / name
        out.mkdir()
        r = cli(["reconstruct", volume, "--task", "sparse-view", "--views", "16", "--prior", prior, "--method", "dds",
                 "--steps", "2", "-o", out])
        assert r.exit_code == 4 and f"{name} exists" in r.stderr and "dds:" not in r.output, r.output
        assert out.is_dir() and not any(out.iterdir()) and not (tmp_path / f"{name}.json").exists()
        r = cli(["convert", volume, "-o", out])
        assert r.exit_code == 4 and f"{name} exists" in r.stderr, r.output
    series = tmp_path / "series"
    series.mkdir()
    assert cli(["convert", volume, "-o", series, "--format", "dicom"]).exit_code == 0 and any(series.glob("*.dcm"))


def test_precision_is_recorded_resolved_and_a_bad_one_refused(cli, prior, volume, tmp_path):
    base = ["reconstruct", volume, "--task", "sparse-view", "--views", "16", "--prior", prior, "--method", "dds",
            "--steps", "2", "--json"]
    r = cli([*base, "--precision", "bf16", "-o", tmp_path / "b.npy"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["engine"]["settings"]["precision"] == "bf16"
    r = cli([*base, "-o", tmp_path / "a.npy"])  # the fast preset's "auto" is recorded as what ran
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["engine"]["settings"]["precision"] in ("fp32", "bf16")
    r = cli([*base, "--precision", "fp16", "-o", tmp_path / "c.npy"])
    assert r.exit_code == 2 and "--precision" in r.output and not (tmp_path / "c.npy").exists()


def test_fit_and_tau_reach_the_engine_and_bad_ones_are_refused(cli, prior, volume, tmp_path):
    """--fit noise (the fast preset's) fits a retrospective study down to its recorded noise; --fit steps
    runs the fixed CG steps; --cg-iter under --fit noise is said to be ignored; bad values are usage errors."""
    base = ["reconstruct", volume, "--task", "sparse-view", "--views", "16", "--prior", prior, "--method", "dds",
            "--steps", "2", "--json", "--noise", "gaussian", "--sigma", "0.01"]
    r = cli([*base, "--tau", "0.9", "-o", tmp_path / "n.npy"])
    assert r.exit_code == 0, r.output
    fit = json.loads(r.stdout)["engine"]["data_fit"]
    assert fit == {"fit": "noise", "dc": "cg", "noise": "gaussian", "tau": 0.9, "cg_steps": 50}
    r = cli([*base, "--fit", "steps", "-o", tmp_path / "s.npy"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["engine"]["data_fit"]["fit"] == "steps"
    r = cli([*base, "--fit", "steps", "--tau", "0.9", "-o", tmp_path / "t.npy"])
    assert r.exit_code == 0 and any("--tau is ignored" in w for w in json.loads(r.stdout)["warnings"]), r.output
    r = cli([*base, "--cg-iter", "9", "-o", tmp_path / "c.npy"])
    assert r.exit_code == 0 and any("--cg-iter is ignored" in w for w in json.loads(r.stdout)["warnings"]), r.output
    for bad in (["--fit", "exact"], ["--tau", "0"]):
        r = cli([*base, *bad, "-o", tmp_path / "x.npy"])
        assert r.exit_code == 2 and bad[0] in r.output and not (tmp_path / "x.npy").exists(), r.output


def test_mbir_start_reaches_d3ip_mbir_and_bad_values_are_refused(cli, prior, volume, tmp_path):
    """--mbir-start fit: d3ip-mbir's ADMM step starts from x̂0 fitted down to the recorded noise (the run
    record says the data were fitted to the noise); the sparse-view preset keeps x0; other methods say
    the option is unused; a bad value is a usage error with no output."""
    base = ["reconstruct", volume, "--task", "sparse-view", "--views", "16", "--prior", prior, "--steps", "2",
            "--adapt-iters", "1", "--json"]
    r = cli([*base, "--method", "d3ip-mbir", "-o", tmp_path / "x0.npy"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["engine"]["settings"]["mbir_start"] == "x0"
    assert doc["engine"]["data_fit"] == {"fit": "steps", "dc": "admm-tv-z", "noise": "none", "tau": None, "cg_steps": None,
                                         "admm_steps": [5, 5]}
    r = cli([*base, "--method", "d3ip-mbir", "--mbir-start", "fit", "-o", tmp_path / "fit.npy"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["engine"]["settings"]["mbir_start"] == "fit"
    assert doc["engine"]["data_fit"] == {"fit": "noise", "dc": "admm-tv-z", "noise": "none", "tau": 0.7, "cg_steps": 50,
                                         "admm_steps": [5, 5]}
    r = cli([*base, "--method", "d3ip-mbir", "--mbir-start", "fit", "--gamma", "5", "-o", tmp_path / "g.npy"])
    assert r.exit_code == 0, r.output  # the noise fit does not use gamma either: said, as without it
    assert json.loads(r.stdout)["warnings"] == ["--gamma is ignored: it weights the proximal data consistency (MRI), "
                                                "and d3ip-mbir here runs admm-tv-z"]
    la = ["reconstruct", volume, "--task", "limited-angle", "--arc", "90", "--prior", prior, "--steps", "2",
          "--adapt-iters", "1", "--json", "--method", "d3ip-mbir"]  # the fast preset's own mbir_start = fit there
    r = cli([*la, "--fit", "steps", "-o", tmp_path / "la.npy"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["warnings"] == ["--fit steps: d3ip-mbir's ADMM step starts from x̂0, not from the fit "
                                                "down to the noise that the fast preset's --mbir-start fit asks for on "
                                                "--task limited-angle"]
    for extra, why in ((["--fit", "steps"], "(here --fit steps)"), (["--preset", "standard"], "the standard preset")):
        r = cli([*base, "--method", "d3ip-mbir", "--mbir-start", "fit", *extra, "-o", tmp_path / "s.npy"])
        assert r.exit_code == 2 and "--mbir-start fit" in r.stderr and "needs --fit noise" in r.stderr, r.output
        assert why in r.stderr and "1/2" not in r.stderr and not (tmp_path / "s.npy").exists()  # before any work
    r = cli([*base, "--method", "d3ip-mbir", "--cg-iter", "7", "-o", tmp_path / "c.npy"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["warnings"] == ["--cg-iter is ignored: d3ip-mbir's data consistency is its ADMM step "
                                                "(5 x 5 CG steps)"]
    r = cli([*base, "--method", "d3ip", "--mbir-start", "fit", "-o", tmp_path / "d.npy"])
    assert r.exit_code == 2 and "--mbir-start does not apply to method d3ip" in r.stderr, r.output
    assert not (tmp_path / "d.npy").exists()
    r = cli([*base, "--method", "d3ip-mbir", "--mbir-start", "middle", "-o", tmp_path / "b.npy"])
    assert r.exit_code == 2 and "--mbir-start" in r.output and not (tmp_path / "b.npy").exists(), r.output


def test_lam_reaches_d3ip_mbir_and_is_refused_by_other_methods(cli, prior, volume, tmp_path):
    base = ["reconstruct", volume, "--task", "sparse-view", "--views", "16", "--prior", prior, "--steps", "2",
            "--adapt-iters", "1", "--json"]
    r = cli([*base, "--method", "d3ip-mbir", "--lam", "0.02", "-o", tmp_path / "m.npy"])
    assert r.exit_code == 0, r.output
    settings = json.loads(r.stdout)["engine"]["settings"]
    assert (settings["dc"], settings["lam"]) == ("admm-tv-z", 0.02)
    assert not json.loads(r.stdout)["warnings"]
    r = cli([*base, "--method", "d3ip", "--lam", "0.02", "-o", tmp_path / "d.npy"])  # only d3ip-mbir takes it
    assert r.exit_code == 2 and "--lam does not apply to method d3ip" in r.stderr, r.output
    assert "1/2" not in r.stderr and not (tmp_path / "d.npy").exists()  # refused before any work
    for flag in (["--lr", "0.1"], ["--adapt-iters", "3"], ["--lora-rank", "8"], ["--train-bias"]):  # dds does not adapt
        r = cli(["reconstruct", volume, "--task", "sparse-view", "--views", "16", "--prior", prior, "--steps", "2",
                 "--method", "dds", *flag, "-o", tmp_path / "dds.npy"])
        assert r.exit_code == 2 and f"{flag[0]} does not apply to method dds" in r.stderr, r.output
        assert not (tmp_path / "dds.npy").exists()
    r = cli(["reconstruct", volume, "--task", "sparse-view", "--views", "16", "--method", "tv", "--lam", "0.02",
             "-o", tmp_path / "t.npy"])
    assert r.exit_code == 2 and "--lam does not apply to method tv" in r.output and not (tmp_path / "t.npy").exists()
    r = cli([*base, "--method", "tv", "--lam", "0.02", "-o", tmp_path / "t.npy"])  # several: one line naming all
    assert r.exit_code == 2 and "--adapt-iters, --lam, --steps do not apply to method tv" in r.output


def test_sigterm_without_checkpoints_exits_130_and_leaves_nothing(prior, volume, tmp_path):
    """A scheduler's SIGTERM stops a run as Ctrl-C does: one line, exit 130, no output."""
    out = tmp_path / "out.npy"
    p = _d3ip("reconstruct", volume, "--task", "sparse-view", "--views", "16", "--prior", prior, "--method", "dds",
              "--steps", "1000", "--t-start", "1000", "--device", "cpu", "-o", out)
    first = p.stderr.readline()  # the first progress line: sampling has begun (100 of 1000 steps)
    assert first.startswith("dds: "), first
    os.kill(p.pid, signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130, first + err[-2000:]
    assert err.strip().splitlines()[-1].endswith("error: interrupted") and "wrote" not in err
    assert not out.exists() and not (tmp_path / "out.npy.json").exists()


def test_adapter_options_are_checked_before_any_work(cli, prior, volume, tmp_path):
    base = ["reconstruct", volume, "--task", "sparse-view", "--views", "16", "--prior", prior, "--steps", "2",
            "--adapt-iters", "1"]
    r = cli([*base, "--method", "ddip", "--save-adapter", tmp_path / "a.safetensors", "-o", tmp_path / "o1.npy"])
    assert r.exit_code == 2 and "fresh adapter per slice" in r.output and not (tmp_path / "o1.npy").exists()
    r = cli([*base, "--save-adapter", tmp_path / "a.txt", "-o", tmp_path / "o1t.npy"])
    assert r.exit_code == 2 and "must end in .safetensors" in r.stderr and not (tmp_path / "o1t.npy").exists()
    r = cli([*base, "--method", "dds", "--adapter", tmp_path / "a.safetensors", "-o", tmp_path / "o2.npy"])
    assert r.exit_code == 2 and "--adapter" in r.output
    r = cli([*base, "--adapter", tmp_path / "missing.safetensors", "-o", tmp_path / "o2b.npy"])
    assert r.exit_code == 3 and "--adapter" in r.stderr and "prior" not in r.stderr and not (tmp_path / "o2b.npy").exists()
    r = cli([*base, "--save-adapter", tmp_path / "no" / "dir" / "a.safetensors", "-o", tmp_path / "o3.npy"])
    assert r.exit_code == 0, r.output  # a missing folder is created, as for any output
    from d3ip_cli.core.record import sha256_path

    outputs = json.loads((tmp_path / "o3.npy.json").read_text())["outputs"]
    saved_entry = [o for o in outputs if o["role"] == "adapter"]  # the run record lists the saved adapter
    assert len(saved_entry) == 1 and saved_entry[0]["sha256"] == sha256_path(tmp_path / "no" / "dir" / "a.safetensors")
    about = cli(["info", tmp_path / "no" / "dir" / "a.safetensors"])  # what the saved adapter is, and for what
    assert about.exit_code == 0 and "LoRA adapter (d3ip)" in about.stdout, about.output
    assert "reconstruct --method d3ip --task sparse-view" in about.stdout and "rank" in about.stdout
    r = cli([*base, "--adapter", tmp_path / "no" / "dir" / "a.safetensors", "-o", tmp_path / "o3b.npy"])
    assert r.exit_code == 0, r.output
    doc = json.loads((tmp_path / "o3b.npy.json").read_text())
    inputs = doc["inputs"]  # a reused adapter is an input
    assert [i["sha256"] for i in inputs if i["role"] == "adapter"] == [saved_entry[0]["sha256"]]
    assert not [w for w in doc["warnings"] if "--adapter" in w]  # same task: nothing to say
    mri = ["reconstruct", volume, "--task", "cs-mri", "--prior", prior, "--steps", "2", "--adapt-iters", "1"]
    r = cli([*mri, "--adapter", tmp_path / "no" / "dir" / "a.safetensors", "-o", tmp_path / "o3m.npy"])
    assert r.exit_code == 0 and "was adapted on --task sparse-view data; this run is --task cs-mri" in r.stderr, r.output
    said = r.stderr.index("was adapted on --task")  # said once, before the sampling steps, not after the run
    assert r.stderr.count("was adapted on --task") == 1 and said < r.stderr.index("2/2"), r.stderr
    assert json.loads((tmp_path / "o3m.npy.json").read_text())["engine"]["settings"]["lora_rank"] == 16
    # the fast preset's sparse-view adapter (rank 16) on limited-angle, whose preset rank is 4: the adapter's rank wins
    la = ["reconstruct", volume, "--task", "limited-angle", "--prior", prior, "--steps", "2", "--adapt-iters", "1"]
    r = cli([*la, "--adapter", tmp_path / "no" / "dir" / "a.safetensors", "-o", tmp_path / "o3l.npy"])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "o3l.npy.json").read_text())["engine"]["settings"]["lora_rank"] == 16
    r = cli([*mri, "--adapter", tmp_path / "no" / "dir" / "a.safetensors", "--lora-rank", "4", "-o", tmp_path / "o3r.npy"])
    assert r.exit_code == 3 and "--lora-rank 4 contradicts --adapter" in r.stderr, r.output
    assert "lora rank 16" in r.stderr and "leave --lora-rank out" in r.stderr and not (tmp_path / "o3r.npy").exists()
    before = saved.read_bytes() if (saved := tmp_path / "no" / "dir" / "a.safetensors").exists() else None
    r = cli([*base, "--adapter", saved, "--save-adapter", saved, "--overwrite", "-o", tmp_path / "o3c.npy"])
    assert r.exit_code == 4 and "would replace the input" in r.stderr, r.output  # the adapter read is an input
    assert saved.read_bytes() == before and not (tmp_path / "o3c.npy").exists()
    taken = tmp_path / "taken.safetensors"
    taken.write_bytes(b"keep")
    r = cli([*base, "--save-adapter", taken, "-o", tmp_path / "o4.npy"])
    assert r.exit_code == 4 and "taken.safetensors exists" in r.output and "d3ip:" not in r.output
    assert taken.read_bytes() == b"keep" and not (tmp_path / "o4.npy").exists()
    (tmp_path / "file").write_text("x")
    r = cli([*base, "--save-adapter", tmp_path / "file" / "a.safetensors", "-o", tmp_path / "o5.npy"])
    assert r.exit_code == 4 and "is a file, not a folder" in r.output
    saved = tmp_path / "no" / "dir" / "a.safetensors"
    assert saved.stat().st_mode & 0o044 == 0o044 & ~_umask()  # shareable like any file the user writes


def test_two_outputs_of_one_run_must_not_share_a_path(cli, prior, volume, tmp_path):
    base = ["reconstruct", volume, "--task", "sparse-view", "--views", "16", "--prior", prior, "--steps", "2",
            "--adapt-iters", "1"]
    out = tmp_path / "o.npy"
    for extra, words in ((["--save-adapter", out], "-o and --save-adapter name the same path"),
                         (["--save-adapter", tmp_path / "o.npy.json"], "the run record and --save-adapter"),
                         (["--report", tmp_path / "r.png", "--save-adapter", tmp_path / "r.png"], "--report and --save-adapter"),
                         (["--checkpoint-dir", out], "-o and --checkpoint-dir"),
                         (["-o", tmp_path / "series", "--format", "dicom", "--report", tmp_path / "series" / "r.png"],
                          f"--report ({(tmp_path / 'series' / 'r.png').resolve()}) lies inside -o")):
        r = cli([*base, "-o", out, *extra])
        assert r.exit_code == 2 and words in r.stderr, (extra, r.output)
        assert "d3ip:" not in r.output and sorted(p.name for p in tmp_path.iterdir()) == []  # refused before any work
    # the checkpoint folder only ever touches its own sample<k> folders: an output may go beside
    # them (--checkpoint-dir .), with the states written at every step, but not into one of them
    r = cli([*base, "-o", tmp_path / "sample0", "--format", "dicom", "--checkpoint-dir", tmp_path])
    assert r.exit_code == 2 and "where --checkpoint-dir keeps its sampler states" in r.stderr, r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    r = cli([*base, "-o", out, "--checkpoint-dir", tmp_path, "--checkpoint-every", "1"])
    assert r.exit_code == 0 and out.exists(), r.output
    assert (tmp_path / "sample0" / "state-rank0.safetensors").exists()  # the states really lay beside it


def test_a_run_that_fails_writing_its_record_leaves_nothing(cli, prior, volume, tmp_path, monkeypatch):
    """The run record is written last; when that fails (a full disk), the volume, report and adapter
    written before it go again, so nothing complete-looking is left."""
    from d3ip_cli.core.errors import OutputError
    from d3ip_cli.engine import recon

    def full_disk(record, output):
        raise OutputError(f"cannot write {output}.json: No space left on device")

    monkeypatch.setattr(recon, "write_record", full_disk)
    r = cli(["reconstruct", volume, "--task", "sparse-view", "--views", "16", "--prior", prior, "--steps", "2",
             "--adapt-iters", "1", "-o", tmp_path / "o.npy", "--report", tmp_path / "r.png",
             "--save-adapter", tmp_path / "a.safetensors"])
    assert r.exit_code == 4 and "No space left" in r.stderr, r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_run_that_fails_writing_its_uncertainty_map_leaves_nothing(cli, prior, volume, tmp_path, monkeypatch):
    """With --samples 2 the standard-deviation map is written after the volume; when it fails, the
    volume goes again, and with a NumPy output its geometry sidecar too."""
    from d3ip_cli.core.errors import OutputError
    from d3ip_cli.io import volumes

    real_write = volumes.write_volume

    def failing_std(volume, path, *args, **kwargs):
        if "_std" in str(path):
            raise OutputError(f"cannot write {path}: No space left on device")
        return real_write(volume, path, *args, **kwargs)

    monkeypatch.setattr(volumes, "write_volume", failing_std)
    r = cli(["reconstruct", volume, "--task", "sparse-view", "--views", "16", "--prior", prior, "--method", "dds",
             "--steps", "2", "--samples", "2", "-o", tmp_path / "o.npy"])
    assert r.exit_code == 4 and "No space left" in r.stderr, r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_a_grid_the_prior_cannot_serve_is_a_usage_error(cli, prior, volume, tmp_path):
    r = cli(["reconstruct", volume, "--task", "sparse-view", "--views", "16", "--prior", prior, "--method", "dds",
             "--grid", "33", "-o", tmp_path / "g.npy"])
    assert r.exit_code == 2 and "--grid 33" in r.output and "try --grid 32 or 34" in r.output, r.output
