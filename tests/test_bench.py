"""Benchmark sweep and the ``lbsearch bench`` command on a tiny model (CPU)."""
import json

import pytest

from conftest import tiny_model
from lbsearch import Plan
from lbsearch.bench import bandwidth_floor, calibrate_from_rows, model_shape, render, sweep
from lbsearch.cli import main


def test_sweep_rows_speedups_and_calibration(cache_home):
    model = tiny_model("llama", layers=4)
    plans = [Plan.parse("SL8NN"), Plan.parse("NNNN")]
    rows, tables = sweep(model, plans, [1, 2], 8, 4, repeats=1, budget_bytes=2**20, log=lambda *a: None)
    assert [r["plan"] for r in rows] == ["SSSS", "SL8NN", "NNNN"] * 2
    assert all(r["speedup"] == pytest.approx(1.0) for r in rows if r["is_base"])
    assert all(r["decode_tps"] > 0 and r["prefill_s"] > 0 for r in rows)
    none = [r for r in rows if r["plan"] == "NNNN"]
    assert all(r["kv_mb_per_seq"] == 0 and r["pred_ratio"] > 1 for r in none)
    base = [r for r in rows if r["is_base"]][0]
    # 1 MiB budget - weights, over 4 layers x (k, v) x 2 kv heads x 12 tokens x 16 x fp32
    weights = model_shape(model).stored_weight_bytes()
    assert base["max_concurrency"] == (2**20 - weights) // (4 * 2 * 2 * 12 * 16 * 4)
    fitted = calibrate_from_rows(tables, rows)
    assert fitted[2].source == "calibrated" and (cache_home / "cost").exists()
    floor = bandwidth_floor(model_shape(model), 2, 8, 4, 1e10)
    assert floor["decode_tps"] > 0 and "NNNN" in render(rows + [floor])


def test_bench_command(tmp_path, cache_home, capsys):
    model = tiny_model("qwen2", layers=4)
    model.save_pretrained(tmp_path / "m")
    rc = main(["bench", "--model", str(tmp_path / "m"), "--plans", "SNL8N", "--concurrency", "1", "2",
               "--prompt-len", "8", "--output-len", "3", "--repeats", "1", "--out", str(tmp_path / "out"),
               "--device", "cpu", "--calibrate"])
    text = capsys.readouterr().out
    assert rc == 0 and "wrote png" in text and "calibrated cost table" in text
    data = json.loads((tmp_path / "out" / "bench.json").read_text())
    assert {r["plan"] for r in data["rows"]} >= {"SSSS", "SNL8N", "bound(base)"}
    assert (tmp_path / "out" / "bench.png").stat().st_size > 1000


@pytest.mark.parametrize("argv,message", [
    (["--plans", "SSS"], "3 layers"),
    (["--shape", "gpt-7"], "choose from"),
    (["--output-len", "1"], "--output-len"),
])
def test_bench_command_errors(tmp_path, capsys, argv, message):
    model = tiny_model("llama", layers=4)
    model.save_pretrained(tmp_path / "m")
    rc = main(["bench", "--model", str(tmp_path / "m"), "--device", "cpu", "--out", str(tmp_path / "o")] + argv)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("lbsearch: error:")]
    assert rc == 2 and len(errors) == 1 and message in errors[0]
