"""The benchmark runner on a tiny suite: files, columns, tuning on a held-out slice, skips, refusals."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from d3ip_cli.bench import runner
from d3ip_cli.bench.report import OUTPUT_FILES
from d3ip_cli.bench.suites import SUITES, TASK_SETTINGS, CaseSpec, Suite
from d3ip_cli.core.errors import MissingComponentError, OutputError, UsageError

TINY = Suite(name="tiny", description="test suite", cases=(CaseSpec("sv30", "phantom"), CaseSpec("mri4", "phantom")),
             methods=("fbp", "tv", "zero-filled", "dds"), slices=3, grid=32, preset="fast",
             tune_grid={"tv": (1e-4, 1e-3, 1e-2)}, engine={"steps": 2, "adapt_iters": 1}, data_tasks=("sv30",),
             data_methods=("fbp", "cgls"))


@pytest.fixture(scope="module")
def tiny_prior(tmp_path_factory):
    from d3ip_cli.prior.pretrain import PretrainConfig, train

    path = tmp_path_factory.mktemp("prior") / "tiny.safetensors"
    train(PretrainConfig.from_preset("tiny", steps=3), path)
    return str(path)


@pytest.fixture(scope="module")
def tiny_run(tiny_prior, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "out"
    doc = runner.run_benchmark(TINY, out, prior=tiny_prior, seed=0, device="cpu", isolate=False)  # CLI test: isolated
    return out, doc


def test_writes_every_output(tiny_run):
    out, doc = tiny_run
    for name in OUTPUT_FILES:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    for name in ("psnr_vs_time.png", "montage.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "results.json").read_text())["rows"] == json.loads(json.dumps(doc["rows"]))
    md = (out / "results.md").read_text()
    assert "| case | method | PSNR dB |" in md and "psnr_vs_time.png" in md and "montage.png" in md


def test_rows_columns_and_skips(tiny_run):
    out, doc = tiny_run
    with open(out / "results.csv", newline="") as fh:
        reader = csv.DictReader(fh)
        assert reader.fieldnames == list(runner.ROW_COLUMNS)
        rows = list(reader)
    pairs = {(r["case"], r["method"]) for r in rows}
    assert pairs == {("sv30_phantom", "fbp"), ("sv30_phantom", "tv"), ("sv30_phantom", "dds"),
                     ("mri4_phantom", "tv"), ("mri4_phantom", "zero-filled"), ("mri4_phantom", "dds")}
    assert {(s["case"], s["method"]) for s in doc["skipped"]} == {("sv30_phantom", "zero-filled"),
                                                                   ("mri4_phantom", "fbp")}
    for r in doc["rows"]:
        assert r["status"] == "ok", r["error"]
        assert np.isfinite(r["psnr"]) and 0 < r["ssim"] <= 1 and r["z_rel_l2"] is not None
        assert r["data_range"] > 0 and r["wall_time_s"] >= 0 and r["cpu_time_s"] > 0 and r["peak_rss_mb"] > 0
        assert r["shape"] == "3x32x32" and r["seed"] == 0
        assert (r["model_evaluations"] or 0) > 0 if r["method"] == "dds" else r["model_evaluations"] is None
        rec = json.loads((out / r["record"]).read_text())
        assert rec["benchmark"]["case"] == r["case"] and rec["metrics"]["psnr"] == r["psnr"]
        assert rec["peak_memory_mb"] == r["peak_rss_mb"]
    assert doc["failed"] == 0 and doc["prior"]["sha256"]
    assert doc["memory_method"]


def test_weights_tuned_on_a_held_out_slice(tiny_run):
    out, doc = tiny_run
    cases = {c["id"]: c for c in doc["cases"]}
    assert {t["case"] for t in doc["tuning"]} == {"sv30_phantom", "mri4_phantom"}
    for t in doc["tuning"]:
        a, b = map(int, cases[t["case"]]["slices"].split(":"))
        assert t["held_out"] and not a <= t["slice"] < b
        assert t["best"] in t["weights"] and len(t["psnr"]) == 3
        assert t["best"] == t["weights"][int(np.argmax(t["psnr"]))]
        row = next(r for r in doc["rows"] if r["case"] == t["case"] and r["method"] == "tv")
        assert row["weight"] == t["best"] and row["tuning_time_s"] > 0
        assert (out / "runs" / t["case"] / "tuning" / f"tv_w{t['best']:g}.json").is_file()


def test_same_measurement_for_every_method(tiny_run):
    _, doc = tiny_run
    ranges = {}
    for r in doc["rows"]:
        ranges.setdefault(r["case"], set()).add(r["data_range"])
    assert all(len(v) == 1 for v in ranges.values())


def test_existing_results_need_overwrite(tiny_run, tiny_prior):
    out, _ = tiny_run
    with pytest.raises(OutputError):
        runner.run_benchmark(TINY, out, prior=tiny_prior, methods=["fbp"])


def test_data_volume_methods_filter_and_overwrite(tmp_path):
    from d3ip_cli.core.types import Volume
    from d3ip_cli.io.volumes import write_volume

    rng = np.random.default_rng(0)
    data = rng.random((5, 32, 32)).astype(np.float32) * 100
    path = write_volume(Volume(data=data, affine=np.eye(4), meta={"modality": "CT", "units": "a.u."}),
                        tmp_path / "scan.nii.gz")
    out = tmp_path / "out"
    (out).mkdir()
    for name in ("results.json", "results.csv", "results.md", "montage.png"):
        (out / name).write_text("old")
    (out / "notes.txt").write_text("mine")
    suite = Suite(name="t", description="t", cases=(), methods=("fbp",), slices=2, grid=32, preset="fast",
                  tune_grid={}, data_tasks=("sv8",), data_methods=("fbp",))
    with pytest.raises(UsageError):  # a rerun that fails after the folder was taken leaves no old results
        runner.run_benchmark(suite, out, data=[path], overwrite=True, methods=["zero-filled"], isolate=False)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    suite = Suite(name="t", description="t", cases=(), methods=("fbp",), slices=2, grid=32, preset="fast",
                  tune_grid={}, data_tasks=("sv8",), data_methods=("fbp", "zero-filled"))
    doc = runner.run_benchmark(suite, out, data=[path], overwrite=True, isolate=False)
    assert [(r["case"], r["method"]) for r in doc["rows"]] == [("sv8_scan", "fbp")]
    assert doc["cases"][0]["in_distribution"] is False and doc["cases"][0]["slices"] == "1:3"
    assert doc["prior"] is None  # classical only: no prior needed
    doc = runner.run_benchmark(suite, out, data=[path], overwrite=True, methods=["cgls", "fbp"], isolate=False)
    assert [r["method"] for r in doc["rows"]] == ["fbp", "cgls"]  # table order, not option order


def test_missing_bundled_prior_fails_before_running(tmp_path, monkeypatch):
    import d3ip_cli.prior.checkpoint as ck

    monkeypatch.setattr(ck, "bundled_prior_path", lambda: tmp_path / "absent.safetensors")
    with pytest.raises(MissingComponentError, match="--prior"):
        runner.run_benchmark(TINY, tmp_path / "out", methods=["fbp", "dds"])
    assert not (tmp_path / "out" / "results.json").exists()


def test_unknown_method_and_suite():
    with pytest.raises(UsageError):
        runner.run_benchmark("nope", "/tmp/never")
    with pytest.raises(UsageError):
        runner._check_methods(["fbp", "magic"])


@pytest.mark.parametrize("z,n,expected", [
    (20, 4, (8, 12, 6, True)),
    (7, 4, (1, 5, 6, True)),
    (5, 4, (0, 4, 4, True)),
    (2, 4, (0, 1, 1, True)),
    (1, 4, (0, 1, 0, False)),
])
def test_choose_slab(z, n, expected):
    assert runner.choose_slab(z, n) == expected


def test_suites_are_consistent():
    from d3ip_cli.bench.suites import ALL_METHODS, VOLUMES

    assert {"quick", "standard", "paper"} <= set(SUITES)
    for s in SUITES.values():
        for c in s.cases:
            assert c.task in TASK_SETTINGS and c.volume in VOLUMES
            assert set(c.methods or s.methods) <= set(ALL_METHODS)
        assert set(s.data_tasks) <= set(TASK_SETTINGS)
        assert s.grid % 8 == 0 or s.name == "smoke"


def test_peak_memory_is_per_run():
    with runner.PeakMemory("cpu") as pm:
        big = np.ones(20_000_000)  # ~150 MiB
        del big
    first = pm.result()
    with runner.PeakMemory("cpu") as pm:
        pass
    second = pm.result()
    assert first["peak_rss_mb"] > 0
    if first["memory_method"].startswith("VmHWM"):
        assert first["peak_rss_delta_mb"] > 100 and second["peak_rss_delta_mb"] < 50


def test_a_case_can_have_its_own_slab_size(tmp_path):
    suite = Suite(name="mixed", description="test", cases=(CaseSpec("sv30", "phantom", ("fbp",), slices=5),
                                                           CaseSpec("mri4", "phantom", ("zero-filled",))),
                  methods=("fbp",), slices=2, grid=16, preset="fast", tune_grid={})
    cases, _ = runner.plan_cases(suite, tmp_path)
    sizes = {c.id: c.slab[1] - c.slab[0] for c in cases}
    assert sizes == {"sv30_phantom": 5, "mri4_phantom": 2}
    assert cases[0].path == cases[1].path  # one phantom, big enough for both (held-out slice included)
    assert "claims" in SUITES and {c.slices for c in SUITES["claims"].cases} == {16, None}


def test_preset_override(tiny_prior, tmp_path):
    with pytest.raises(UsageError, match="--preset"):
        runner.run_benchmark(TINY, tmp_path / "bad", prior=tiny_prior, preset="turbo")
    assert not (tmp_path / "bad").exists()
    doc = runner.run_benchmark(TINY, tmp_path / "out", methods=["dds"], prior=tiny_prior, preset="standard",
                               seed=0, device="cpu", isolate=False)
    assert doc["suite"]["preset"] == "standard" and "this run overrides: preset standard" in doc["suite"]["description"]
    rows = [r for r in doc["rows"] if r["method"] == "dds"]
    assert rows and all(r["preset"] == "standard" for r in rows)


def test_unreadable_data_leaves_no_results_folder(tmp_path):
    fake = tmp_path / "fake.nii.gz"
    fake.write_text("not a volume")
    for data, exc in (([tmp_path / "nope.nii.gz"], "no such file"), ([fake], "not a readable NIfTI")):
        with pytest.raises(Exception, match=exc):
            runner.run_benchmark(TINY, tmp_path / "out", data=data, methods=["fbp"], isolate=False)
        assert not (tmp_path / "out").exists()


def test_a_run_whose_record_cannot_be_written_leaves_no_reconstruction(tmp_path, monkeypatch):
    import d3ip_cli.io.atomic as atomic
    from d3ip_cli.core.types import Volume
    from d3ip_cli.io.volumes import write_volume

    data = np.random.default_rng(0).random((4, 32, 32)).astype(np.float32) * 100
    path = write_volume(Volume(data=data, affine=np.eye(4), meta={"modality": "CT", "units": "a.u."}),
                        tmp_path / "scan.nii.gz")
    real = atomic.write_json

    def failing(p, doc, overwrite=True):
        if Path(p).name == "fbp.nii.gz.json":
            raise OSError("disk full")
        return real(p, doc, overwrite=overwrite)

    monkeypatch.setattr(atomic, "write_json", failing)
    suite = Suite(name="t", description="t", cases=(), methods=("fbp",), slices=2, grid=32, preset="fast",
                  tune_grid={}, data_tasks=("sv8",), data_methods=("fbp",))
    doc = runner.run_benchmark(suite, tmp_path / "out", data=[path], isolate=False)
    assert [r["status"] for r in doc["rows"]] == ["failed"] and "disk full" in doc["rows"][0]["error"]
    assert not list((tmp_path / "out" / "runs").rglob("fbp.nii.gz"))  # no result without its record


def test_a_4d_data_file_says_how_to_take_a_frame(tmp_path):
    import nibabel as nib

    from d3ip_cli.core.errors import FrameRequired

    path = tmp_path / "four.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 4, 2), np.float32), np.eye(4)), path)
    suite = Suite(name="t", description="t", cases=(), methods=("fbp",), slices=2, grid=32, preset="fast",
                  tune_grid={}, data_tasks=("sv8",), data_methods=("fbp",))
    with pytest.raises(FrameRequired, match=r"d3ip convert .* --frame N -o frame.nii.gz"):
        runner.run_benchmark(suite, tmp_path / "out", data=[path], isolate=False)
    assert not (tmp_path / "out").exists()
