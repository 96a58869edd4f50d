"""`d3ip benchmark` end to end on the smoke suite with a tiny prior."""

import csv
import json

import pytest


@pytest.fixture(scope="module")
def tiny_prior(tmp_path_factory):
    from d3ip_cli.prior.pretrain import PretrainConfig, train

    path = tmp_path_factory.mktemp("prior") / "tiny.safetensors"
    train(PretrainConfig.from_preset("tiny", steps=3), path)
    return str(path)


def test_benchmark_json_and_files(cli, tiny_prior, tmp_path):
    out = tmp_path / "bench"
    r = cli(["benchmark", "--suite", "smoke", "--methods", "fbp,tv,dds", "--prior", tiny_prior, "-o", out,
             "--json", "--device", "cpu", "--threads", "1"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)  # exactly one JSON object on stdout
    assert doc["environment"]["torch_threads"] == 1
    assert doc["suite"]["name"] == "smoke" and doc["failed"] == 0
    assert "fresh process" in doc["memory_method"]  # each run in its own process: per-run peak memory
    for name in ("results.json", "results.csv", "results.md", "psnr_vs_time.png", "montage.png"):
        assert (out / name).is_file()
    with open(out / "results.csv", newline="") as fh:
        reader = csv.DictReader(fh)
        rows = list(reader)
    for col in ("case", "method", "psnr", "ssim", "z_rel_l2", "data_range", "wall_time_s", "peak_rss_mb",
                "model_evaluations", "weight", "record"):
        assert col in reader.fieldnames
    assert {r["method"] for r in rows} == {"fbp", "tv", "dds"}
    assert all(r["psnr"] for r in rows)
    assert "PSNR" in r.stderr  # the table went to stderr


def test_benchmark_table_and_refusals(cli, tmp_path):
    out = tmp_path / "bench"
    r = cli(["benchmark", "--suite", "smoke", "--methods", "fbp,zero-filled", "-o", out])
    assert r.exit_code == 0, r.output
    assert "fbp" in r.stdout and "zero-filled" in r.stdout and "PSNR" in r.stdout  # the table
    again = cli(["benchmark", "--suite", "smoke", "--methods", "fbp", "-o", out])
    assert again.exit_code == 4 and "--overwrite" in again.stderr
    assert cli(["benchmark", "--suite", "smoke", "--methods", "fbp", "-o", out, "--overwrite"]).exit_code == 0
    assert cli(["benchmark", "--suite", "huge", "-o", tmp_path / "x"]).exit_code == 2
    assert cli(["benchmark", "--suite", "smoke", "--threads", "0", "-o", tmp_path / "t"]).exit_code == 2
    assert cli(["benchmark", "--suite", "smoke", "--methods", "fbp,magic", "-o", tmp_path / "y"]).exit_code == 2


def test_benchmark_help_has_example(cli):
    r = cli(["benchmark", "--help"])
    assert r.exit_code == 0 and "Example" in r.stdout
