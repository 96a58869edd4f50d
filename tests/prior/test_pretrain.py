"""pretrain-phantom: one process, exact resume, checkpoint round trip, torchrun DDP, bad input."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from d3ip_cli.prior import checkpoint as ckpt
from d3ip_cli.prior import pretrain as pt


def _weights(path):
    return {k: v for k, v in load_file(str(pt.state_path(path))).items() if k.startswith(("model.", "ema."))}


def test_tiny_run_and_checkpoint_round_trip(cli, tmp_path):
    out = tmp_path / "p.safetensors"
    r = cli(["pretrain-phantom", "-o", out, "--preset", "tiny", "--steps", "6", "--seed", "3"])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "p.safetensors.json").read_text())["threads"] == torch.get_num_threads()
    model, meta = ckpt.load_prior(out)
    assert meta["steps"] == 6 and meta["images_seen"] == 6 * 8
    assert meta["data"]["real_images"] is False and meta["data"]["seed"] == 3
    assert meta["schedule"]["beta_end"] == 0.02 and meta["prediction"] == "eps"
    assert meta["architecture"]["model_channels"] == 16
    assert len(meta["sha256"]) == 64
    assert (tmp_path / "p.safetensors.json").exists() and (tmp_path / "p.loss.png").exists()
    assert (tmp_path / "p.samples.png").exists()
    # the EMA weights in the prior file are those of the state file
    state = load_file(str(pt.state_path(out)))
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[f"ema.{k}"])


@pytest.mark.parametrize("head", [["--prediction", "eps", "--precision", "fp32"],
                                  ["--prediction", "v", "--precision", "bf16"]], ids=["eps-fp32", "v-bf16"])
def test_resume_is_exact(cli, tmp_path, head):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    assert cli(["pretrain-phantom", "-o", a, "--preset", "tiny", "--steps", "4", *head]).exit_code == 0
    assert cli(["pretrain-phantom", "-o", a, "--preset", "tiny", "--steps", "8", "--resume", *head]).exit_code == 0
    assert cli(["pretrain-phantom", "-o", b, "--preset", "tiny", "--steps", "8", *head]).exit_code == 0
    meta = ckpt.read_metadata(a)
    assert (meta["prediction"], meta["training"]["precision"]) == (head[1], head[3])
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_resume_with_other_settings_refused(cli, tmp_path):
    a = tmp_path / "a.safetensors"
    assert cli(["pretrain-phantom", "-o", a, "--preset", "tiny", "--steps", "2"]).exit_code == 0
    r = cli(["pretrain-phantom", "-o", a, "--preset", "tiny", "--steps", "4", "--resume", "--seed", "9"])
    assert r.exit_code == 3 and "different settings (seed 0 (now 9))" in r.output
    r = cli(["pretrain-phantom", "-o", a, "--preset", "tiny", "--steps", "4", "--resume", "--precision", "bf16"])
    assert r.exit_code == 3 and "precision 'fp32' (now 'bf16')" in r.output


def test_pickle_prior_refused(tmp_path):
    bad = tmp_path / "model.safetensors"
    torch.save({"w": torch.zeros(3)}, bad)
    with pytest.raises(Exception, match="pickle"):
        ckpt.load_prior(bad)


def test_corrupt_prior_refused(tmp_path):
    bad = tmp_path / "c.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(Exception, match="safetensors"):
        ckpt.load_prior(bad)


@pytest.mark.parametrize(
    "args, code, text",
    [
        (["--steps", "-3"], 2, "steps"),
        (["--resolution", "33"], 2, "divisible"),
        (["--preset", "huge"], 2, "preset"),
        (["--lr", "0"], 2, "--lr"),
        (["--warmup", "-1"], 2, "--warmup"),
        (["--anneal", "-1"], 2, "--anneal"),
        (["--steps", "10", "--anneal", "11"], 2, "--anneal"),
        (["--precision", "fp16"], 2, "--precision"),
        (["--prediction", "x0"], 2, "--prediction"),
        (["--crop", "64"], 2, "--crop 64"),  # larger than the tiny preset's 32 pixels: refused, not dropped
        (["--crop", "-8"], 2, "--crop -8"),
    ],
)
def test_bad_options(cli, tmp_path, args, code, text):
    out = tmp_path / "p.safetensors"
    r = cli(["pretrain-phantom", "-o", out, "--preset", "tiny", *args])
    assert r.exit_code == code, r.output
    assert text in r.output
    assert not out.exists()


def test_unwritable_output(cli, tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    r = cli(["pretrain-phantom", "-o", blocker / "p.safetensors", "--preset", "tiny"])
    assert r.exit_code == 4, r.output


def test_existing_output_not_overwritten(cli, tmp_path):
    out = tmp_path / "p.safetensors"
    out.write_bytes(b"keep")
    r = cli(["pretrain-phantom", "-o", out, "--preset", "tiny"])
    assert r.exit_code == 4 and out.read_bytes() == b"keep"


def test_an_interrupted_run_leaves_its_state_but_no_prior_that_looks_finished(cli, tmp_path):
    out = tmp_path / "p.safetensors"
    cfg = pt.PretrainConfig.from_preset("tiny", steps=6, checkpoint_every=2, sample_every=0)

    def stop_at_3(info):
        if info["step"] == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        pt.train(cfg, out, progress=stop_at_3)
    assert pt.state_path(out).exists() and not out.exists()  # the state of step 2 only
    r = cli(["pretrain-phantom", "-o", out, "--preset", "tiny", "--steps", "6", "--checkpoint-every", "2",
             "--sample-every", "0", "--resume"])
    assert r.exit_code == 0, r.output
    assert ckpt.read_metadata(out)["steps"] == 6 and (tmp_path / "p.samples.png").exists()
    # stopped after the last step, before the figures: --resume writes what the end of a run writes
    out.unlink()
    (tmp_path / "p.samples.png").unlink()
    r = cli(["pretrain-phantom", "-o", out, "--preset", "tiny", "--steps", "6", "--checkpoint-every", "2",
             "--sample-every", "0", "--resume"])
    assert r.exit_code == 0, r.output
    assert ckpt.read_metadata(out)["steps"] == 6 and (tmp_path / "p.samples.png").exists()
    assert (tmp_path / "p.safetensors.json").exists()
    # fewer steps than the state holds: refused, and the prior of step 6 stays
    before = out.read_bytes()
    r = cli(["pretrain-phantom", "-o", out, "--preset", "tiny", "--steps", "4", "--checkpoint-every", "2",
             "--sample-every", "0", "--resume"])
    assert r.exit_code == 2 and "holds 6 steps, more than --steps 4" in r.output, r.output
    assert out.read_bytes() == before


def test_an_interrupted_overwrite_leaves_nothing_of_the_previous_prior(cli, tmp_path, monkeypatch):
    out = tmp_path / "p.safetensors"
    assert cli(["pretrain-phantom", "-o", out, "--preset", "tiny", "--steps", "2"]).exit_code == 0
    assert out.exists() and (tmp_path / "p.safetensors.json").exists()

    def interrupted(cfg, output, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(pt, "train", interrupted)
    r = cli(["pretrain-phantom", "-o", out, "--preset", "tiny", "--steps", "4", "--overwrite"])
    assert r.exit_code == 130 and "before the first checkpoint" in r.stderr, r.output
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith("p.")]  # not the old prior, record or state


def test_an_interrupt_names_the_state_to_resume(cli, tmp_path, monkeypatch):
    out = tmp_path / "p.safetensors"

    def interrupted(cfg, output, **kw):
        pt.state_path(output).write_bytes(b"state")
        raise KeyboardInterrupt

    monkeypatch.setattr(pt, "train", interrupted)
    r = cli(["pretrain-phantom", "-o", out, "--preset", "tiny", "--steps", "6"])
    assert r.exit_code == 130 and "continue with --resume" in r.stderr and not out.exists(), r.output


@pytest.mark.slow
def test_torchrun_two_processes_identical_parameters(cli, tmp_path):
    torchrun = Path(sys.executable).parent / "torchrun"
    assert torchrun.exists()
    out = tmp_path / "ddp.safetensors"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [str(torchrun), "--nproc-per-node", "2", "--master-port", "29531", "-m", "d3ip_cli", "pretrain-phantom",
         "-o", str(out), "--preset", "tiny", "--steps", "4", "--device", "cpu", "--json"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    meta = ckpt.read_metadata(out)
    assert meta["training"]["world_size"] == 2 and meta["images_seen"] == 4 * 8 * 2
    r = cli(["pretrain-phantom", "-o", out, "--preset", "tiny", "--steps", "6", "--resume"])  # one process
    assert r.exit_code == 3 and "trained by 2 process(es), this run has 1" in r.stderr, r.output
    # each rank dumps a parameter checksum when D3IP_DUMP_PARAMS is set; compare via a second run
    env["D3IP_DUMP_PARAMS"] = str(tmp_path / "rank{rank}.pt.safetensors")
    out2 = tmp_path / "ddp2.safetensors"
    proc = subprocess.run(
        [str(torchrun), "--nproc-per-node", "2", "--master-port", "29532", "-m", "d3ip_cli", "pretrain-phantom",
         "-o", str(out2), "--preset", "tiny", "--steps", "3", "--device", "cpu"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    r0 = load_file(str(tmp_path / "rank0.pt.safetensors"))
    r1 = load_file(str(tmp_path / "rank1.pt.safetensors"))
    assert r0.keys() == r1.keys() and len(r0) > 10
    assert all(torch.equal(r0[k], r1[k]) for k in r0)


def test_slim_state_resumes_as_warm_start(cli, tmp_path):
    a = tmp_path / "a.safetensors"
    assert cli(["pretrain-phantom", "-o", a, "--preset", "tiny", "--steps", "3"]).exit_code == 0
    full = pt.state_path(a)
    slim = tmp_path / "slim.state.safetensors"
    meta = pt.slim_state(full, slim)
    assert meta["optimizer"] == "reset" and slim.stat().st_size < full.stat().st_size
    slim.replace(full)
    r = cli(["pretrain-phantom", "-o", a, "--preset", "tiny", "--steps", "5", "--resume"])
    assert r.exit_code == 0, r.output
    assert ckpt.read_metadata(a)["steps"] == 5


def test_init_starts_a_new_stage_from_a_prior(cli, tmp_path):
    parent, child, fresh = (tmp_path / f"{n}.safetensors" for n in ("parent", "child", "fresh"))
    assert cli(["pretrain-phantom", "-o", parent, "--preset", "tiny", "--steps", "4"]).exit_code == 0
    # a near-zero learning rate: the child's weights are its parent's
    r = cli(["pretrain-phantom", "-o", child, "--preset", "tiny", "--steps", "2", "--crop", "16",
             "--init", parent, "--lr", "1e-12", "--warmup", "0"])
    assert r.exit_code == 0, r.output
    assert cli(["pretrain-phantom", "-o", fresh, "--preset", "tiny", "--steps", "2"]).exit_code == 0
    p, _ = ckpt.load_prior(parent)
    c, meta = ckpt.load_prior(child)
    f, _ = ckpt.load_prior(fresh)
    for (k, vp), vc, vf in zip(p.state_dict().items(), c.state_dict().values(), f.state_dict().values()):
        assert torch.allclose(vp, vc, atol=1e-8), k
    assert any(not torch.allclose(vp, vf) for vp, vf in zip(p.state_dict().values(), f.state_dict().values()))
    # the lineage is recorded and survives --resume
    assert meta["init"]["sha256"] == ckpt.file_sha256(parent) and meta["init"]["steps"] == 4
    assert meta["data"]["recipe"]["crop"] == 16 and meta["init"]["crop"] is None
    assert meta["images_seen_total"] == 2 * 8 + 4 * 8
    assert meta["data_step_offset"] == 4  # its phantoms follow the parent's, never repeat them
    r = cli(["pretrain-phantom", "-o", child, "--preset", "tiny", "--steps", "3", "--crop", "16",
             "--lr", "1e-12", "--warmup", "0", "--resume"])
    assert r.exit_code == 0, r.output
    meta = ckpt.read_metadata(child)
    assert meta["steps"] == 3 and meta["images_seen_total"] == 3 * 8 + 4 * 8 and meta["init"]["steps"] == 4
    assert meta["data_step_offset"] == 4


def test_init_may_change_the_head(cli, tmp_path):
    """An ε prior starts a v-head stage: same weights, the new head recorded with the parent's."""
    parent, child = tmp_path / "eps.safetensors", tmp_path / "v.safetensors"
    assert cli(["pretrain-phantom", "-o", parent, "--preset", "tiny", "--steps", "3"]).exit_code == 0
    r = cli(["pretrain-phantom", "-o", child, "--preset", "tiny", "--steps", "1", "--prediction", "v",
             "--init", parent, "--lr", "1e-12", "--warmup", "0"])
    assert r.exit_code == 0, r.output
    p, pmeta = ckpt.load_prior(parent)
    c, meta = ckpt.load_prior(child)
    assert pmeta["architecture"].get("prediction", "eps") == "eps" and meta["architecture"]["prediction"] == "v"
    assert meta["init"]["prediction"] == "eps"
    for (k, vp), vc in zip(p.state_dict().items(), c.state_dict().values()):
        assert torch.allclose(vp, vc, atol=1e-8), k
    # same weights, another reading of them: the v net's ε̂ differs from the ε net's except as t -> 0
    x, t = torch.randn(2, 1, 32, 32), torch.tensor([900, 900])
    with torch.no_grad():
        assert not torch.allclose(p(x, t), c(x, t), atol=1e-3)


def test_a_bad_init_file_fails_before_training(cli, tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a prior")
    r = cli(["pretrain-phantom", "-o", tmp_path / "c.safetensors", "--preset", "tiny", "--steps", "2", "--init", bad])
    assert r.exit_code == 3 and "pretrain" not in r.stderr.split("error:")[0], r.output
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "c.safetensors").exists()


def test_init_refuses_another_architecture_and_resume(cli, tmp_path):
    parent, child = tmp_path / "parent.safetensors", tmp_path / "child.safetensors"
    assert cli(["pretrain-phantom", "-o", parent, "--preset", "tiny", "--steps", "2"]).exit_code == 0
    r = cli(["pretrain-phantom", "-o", child, "--preset", "cpu", "--steps", "1", "--init", parent])
    assert r.exit_code == 3 and "architecture differs" in r.output and "model_channels 16 vs 32" in r.output
    assert not child.exists()
    r = cli(["pretrain-phantom", "-o", parent, "--preset", "tiny", "--steps", "3", "--init", parent, "--resume"])
    assert r.exit_code == 2 and "--init starts a new run" in r.output


def test_ema_only_slim_state_resumes(cli, tmp_path):
    a = tmp_path / "a.safetensors"
    assert cli(["pretrain-phantom", "-o", a, "--preset", "tiny", "--steps", "3"]).exit_code == 0
    full = pt.state_path(a)
    size = full.stat().st_size
    meta = pt.slim_state(full, full, ema_only=True)
    assert meta["model"] == "ema" and full.stat().st_size < size / 2
    assert not any(k.startswith(("model.", "optim.")) for k in load_file(str(full)))
    r = cli(["pretrain-phantom", "-o", a, "--preset", "tiny", "--steps", "5", "--resume"])
    assert r.exit_code == 0, r.output
    assert ckpt.read_metadata(a)["steps"] == 5


def test_init_from_a_training_state_uses_its_ema(cli, tmp_path):
    parent, child = tmp_path / "parent.safetensors", tmp_path / "child.safetensors"
    assert cli(["pretrain-phantom", "-o", parent, "--preset", "tiny", "--steps", "3"]).exit_code == 0
    r = cli(["pretrain-phantom", "-o", child, "--preset", "tiny", "--steps", "1", "--init", pt.state_path(parent),
             "--lr", "1e-12", "--warmup", "0"])
    assert r.exit_code == 0, r.output
    p, _ = ckpt.load_prior(parent)
    c, meta = ckpt.load_prior(child)
    assert all(torch.allclose(a, b, atol=1e-8) for a, b in zip(p.state_dict().values(), c.state_dict().values()))
    assert meta["init"]["steps"] == 3 and meta["init"]["file"] == "parent.state.safetensors"


def test_bf16_v_head_run_is_recorded_and_resumes(cli, tmp_path):
    """The cpu preset's choices (bf16 autocast, v head) on the tiny net: recorded, resumable, loadable."""
    out = tmp_path / "v.safetensors"
    cfg = pt.PretrainConfig.from_preset("tiny", steps=4, precision="bf16")
    cfg.architecture = dict(cfg.architecture, prediction="v")
    meta = pt.train(cfg, out)
    assert meta["prediction"] == "v" and meta["training"]["precision"] == "bf16"
    assert meta["loss"]["last"] < 10  # finite, sane
    cfg.steps = 6
    assert pt.train(cfg, out, resume=True)["steps"] == 6
    model, meta = ckpt.load_prior(out)
    assert model.config.prediction == "v" and "abar" not in model.state_dict()


def test_state_written_before_the_prediction_field_resumes(cli, tmp_path):
    """States written before the head and precision were settings (like the bundled ε prior's) resume as
    an ε head in float32."""
    out = tmp_path / "p.safetensors"
    assert cli(["pretrain-phantom", "-o", out, "--preset", "tiny", "--steps", "2"]).exit_code == 0
    tensors, meta = ckpt.load_tensors(pt.state_path(out))
    del meta["identity"]["architecture"]["prediction"], meta["identity"]["precision"]
    ckpt.save_tensors(pt.state_path(out), tensors, meta)
    r = cli(["pretrain-phantom", "-o", out, "--preset", "tiny", "--steps", "3", "--resume"])
    assert r.exit_code == 0, r.output
    r = cli(["pretrain-phantom", "-o", out, "--preset", "tiny", "--steps", "4", "--resume", "--prediction", "v"])
    assert r.exit_code == 3 and "prediction" in r.output


def test_the_bundled_states_recipe_resumes_from_the_cli(cli, tmp_path):
    """The committed state of the bundled prior (cpu preset before the v head: ε head, 64² windows,
    float32) is continued with the options training/README.md gives; checked on its real header."""
    from pathlib import Path

    state = Path(__file__).resolve().parents[2] / "training" / "prior_cpu" / "phantom_cpu.state.safetensors"
    cfg = pt.PretrainConfig.from_preset("cpu", crop=64, precision="fp32")
    cfg.architecture = dict(cfg.architecture, prediction="eps")
    assert pt.stored_identity(ckpt.read_metadata(state), state) == pt._jsonable(cfg.identity())


def test_prior_with_unknown_head_or_schedule_refused(tmp_path):
    from d3ip_cli.core.errors import InputDataError

    out = tmp_path / "p.safetensors"
    pt.train(pt.PretrainConfig.from_preset("tiny", steps=1), out)
    tensors, meta = ckpt.load_tensors(out)
    for change, text in ((lambda m: m["architecture"].update(prediction="x0"), "architecture"),
                         (lambda m: m["schedule"].update(beta_end=0.03), "noise schedule")):
        bad = {**meta, "architecture": dict(meta["architecture"]), "schedule": dict(meta["schedule"])}
        change(bad)
        ckpt.save_tensors(tmp_path / "bad.safetensors", tensors, bad)
        with pytest.raises(InputDataError, match=text):
            ckpt.load_prior(tmp_path / "bad.safetensors")


def test_anneal_decays_the_learning_rate_to_zero_over_the_last_steps():
    cfg = pt.PretrainConfig.from_preset("tiny", steps=100, warmup=10, anneal=40, lr=1e-3)
    lrs = [pt.lr_at(s, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4)  # warm-up
    assert all(v == pytest.approx(1e-3) for v in lrs[9:61])  # constant until the last 40 steps
    assert lrs[80] == pytest.approx(5e-4)  # half-way down the cosine
    assert all(a > b for a, b in zip(lrs[60:], lrs[61:]))  # strictly decreasing
    assert 0 < lrs[99] < 1e-5
    assert pt.lr_at(50, pt.PretrainConfig.from_preset("tiny", steps=100, warmup=10, lr=1e-3)) == pytest.approx(1e-3)


def test_anneal_is_part_of_what_resume_must_share(cli, tmp_path):
    out = tmp_path / "p.safetensors"
    assert cli(["pretrain-phantom", "-o", out, "--preset", "tiny", "--steps", "4", "--anneal", "4"]).exit_code == 0
    assert ckpt.read_metadata(out)["training"]["anneal"] == 4
    r = cli(["pretrain-phantom", "-o", out, "--preset", "tiny", "--steps", "6", "--anneal", "2", "--resume"])
    assert r.exit_code == 3 and "anneal 4 (now 2)" in r.output
    # the schedule ends at --steps: extending an annealed run would restart the decayed rate
    r = cli(["pretrain-phantom", "-o", out, "--preset", "tiny", "--steps", "8", "--anneal", "4", "--resume"])
    assert r.exit_code == 3 and "anneal_end 4 (now 8)" in r.output
