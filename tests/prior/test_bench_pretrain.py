"""scripts/bench_pretrain.py: times the real training loop per precision and training size (tiny preset)."""

import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_pretrain.py"


def test_bench_pretrain_rows(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("bench_pretrain_script", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "b.json"
    assert mod.main(["--preset", "tiny", "--precision", "fp32,bf16", "--crop", "0,16", "--steps", "3",
                     "--warmup", "1", "--threads", "1", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [(r["size"], r["precision"]) for r in rows] == [(32, "fp32"), (32, "bf16"), (16, "fp32"), (16, "bf16")]
    assert all(r["s_per_step"] > 0 and r["threads"] == 1 and r["batch"] == 8 for r in rows)
    assert "images/s" in capsys.readouterr().out
