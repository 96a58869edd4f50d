"""scripts/eval_prior.py: one-step denoising PSNR vs tuned TV, samples, CSV row and plot (tiny prior)."""

import csv
import importlib.util
import json
from pathlib import Path

import pytest

from d3ip_cli.prior import pretrain as pt

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "eval_prior.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("eval_prior_script", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def tiny_prior(tmp_path_factory):
    out = tmp_path_factory.mktemp("prior") / "tiny.safetensors"
    pt.train(pt.PretrainConfig.from_preset("tiny", steps=5), out)
    return out


def test_eval_prior_numbers_csv_and_plot(tiny_prior, tmp_path, capsys):
    ev = _load_script()
    csv_path, plot, samples = tmp_path / "q.csv", tmp_path / "q.png", tmp_path / "s.png"
    common = [tiny_prior, "--n", 4, "--size", 32, "--tune-n", 3, "--threads", 1, "--quiet",
              "--csv", csv_path, "--plot", plot]
    assert ev.main([*common, "--json", "--samples-png", samples, "--n-samples", 4, "--sample-steps", 5,
                    "--recon-slices", 0]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["steps"] == 5 and res["images_seen"] == 5 * 8 and res["n"] == 4 and res["size"] == 32
    assert set(res["per_t"]) == {"200", "400", "600"}
    for r in res["per_t"].values():
        assert 0 < r["psnr_prior"] < 100 and 0 < r["psnr_tv"] < 100 and r["tv_weight"] > 0
        assert isinstance(r["prior_wins"], bool)
    assert samples.stat().st_size > 0 and plot.stat().st_size > 0 and res["recon"] is None
    assert set(res["high_noise"]) == {"999", "900", "800"}
    assert all(0 < r["psnr_prior"] < 100 and 0 < r["psnr_constant"] < 100 for r in res["high_noise"].values())
    st, ph = res["samples"]["stats"], res["samples"]["phantom_stats"]
    assert st.keys() == ph.keys() == {"mean", "background", "gradient"}
    assert 0 <= st["mean"] <= 1 and 0 <= st["background"] <= 1 and st["gradient"] >= 0
    assert 0.1 < ph["background"] < 1  # phantoms have a flat surround

    # a second run appends a row (plain-text table this time) with the phantom reconstruction's
    # columns, which the file did not have yet: the header becomes the union
    assert ev.main([*common, "--recon-slices", 2]) == 0
    table = capsys.readouterr().out
    assert "prior dB" in table and "TV dB" in table and "dds" in table
    with open(csv_path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 2
    assert rows[0]["recon_psnr_dds"] == "" and rows[1]["recon_slices"] == "2" and rows[1]["stages"] == "1"
    assert float(rows[0]["phantom_background"]) == pytest.approx(ph["background"], abs=1e-4)
    assert rows[1]["sample_mean"] == ""  # no samples drawn in the second run
    for k in ("recon_psnr_dds", "recon_psnr_tv", "recon_psnr_cgls"):
        assert 5 < float(rows[1][k]) < 100
    assert float(rows[1]["recon_psnr_tv"]) > float(rows[1]["recon_psnr_cgls"]) - 0.5
    assert rows[0]["steps"] == "5" and rows[0]["images_seen"] == "40" and float(rows[0]["wall_time_s"]) >= 0
    for t in (200, 400, 600):
        assert float(rows[0][f"psnr_prior_t{t}"]) == pytest.approx(res["per_t"][str(t)]["psnr_prior"], abs=1e-3)
        # seeded: the same prior and arguments give the same numbers
        assert rows[1][f"psnr_prior_t{t}"] == rows[0][f"psnr_prior_t{t}"]
        assert rows[1][f"psnr_tv_t{t}"] == rows[0][f"psnr_tv_t{t}"]


def test_image_statistics_tell_a_flat_surround_from_texture():
    import numpy as np

    ev = _load_script()
    disk = np.zeros((1, 32, 32))
    yy, xx = np.mgrid[:32, :32]
    disk[0][(yy - 16) ** 2 + (xx - 16) ** 2 < 64] = 1.0
    noise = np.random.default_rng(0).random((1, 32, 32))
    a, b = ev.image_statistics(disk), ev.image_statistics(noise)
    assert a["background"] > 0.7 > 0.1 > b["background"]
    assert a["gradient"] < b["gradient"] and a["mean"] == pytest.approx(disk.mean())


def test_eval_prior_missing_prior_is_a_clear_error(tmp_path, capsys):
    ev = _load_script()
    assert ev.main([tmp_path / "nope.safetensors"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_eval_prior_refuses_other_noise_levels_in_a_csv(tiny_prior, tmp_path, capsys):
    ev = _load_script()
    csv_path = tmp_path / "q.csv"
    common = [tiny_prior, "--n", 2, "--size", 32, "--tune-n", 2, "--threads", 1, "--quiet", "--recon-slices", 0,
              "--csv", csv_path]
    assert ev.main([*common, "--ts", 200]) == 0
    before = csv_path.read_text()
    assert ev.main([*common, "--ts", 100, "--plot", tmp_path / "q.png"]) == 2
    assert "noise levels" in capsys.readouterr().err
    assert csv_path.read_text() == before and not (tmp_path / "q.png").exists()


def test_lineage_plot_joins_the_stages_in_order(tmp_path):
    """scripts/plot_prior_lineage.py on the committed quality curves of the bundled prior's stages."""
    root = SCRIPT.parents[1]
    spec = importlib.util.spec_from_file_location("plot_prior_lineage", SCRIPT.parent / "plot_prior_lineage.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    stages = [root / "training" / s for s in ("prior_cpu", "prior_cpu_veps", "prior_cpu_anneal")]
    out_csv, out_png = tmp_path / "q.csv", tmp_path / "q.png"
    assert mod.main([*map(str, stages), "--until", "prior_cpu=6250", "--csv", str(out_csv),
                     "--plot", str(out_png)]) == 0
    with open(out_csv, newline="") as fh:
        rows = list(csv.DictReader(fh))
    steps = [int(r["steps"]) for r in rows]
    assert steps == sorted(steps) and 7250 not in steps  # the off-lineage 7,250-step row is left out
    assert "recon_psnr_dds" in rows[0] and rows[-1]["recon_psnr_dds"]  # columns of later stages kept
    assert out_png.stat().st_size > 10_000
