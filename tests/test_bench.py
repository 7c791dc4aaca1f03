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
    (["--mode", "requests", "--calibrate"], "--mode static"),
    (["--mode", "requests", "--requests", "0"], "--requests"),
])
def test_bench_command_errors(tmp_path, capsys, argv, message):
    model = tiny_model("llama", layers=4)
    model.save_pretrained(tmp_path / "m")
    rc = main(["bench", "--model", str(tmp_path / "m"), "--device", "cpu", "--out", str(tmp_path / "o")] + argv)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("lbsearch: error:")]
    assert rc == 2 and len(errors) == 1 and message in errors[0]


# -- request mode ------------------------------------------------------------------------------
def test_draw_requests_is_seeded_and_bounded():
    from lbsearch.serving import draw_requests

    a = draw_requests(400, 20, 10, 96, "lognormal", 0.5, seed=3)
    assert a == draw_requests(400, 20, 10, 96, "lognormal", 0.5, seed=3) != draw_requests(400, 20, 10, 96, "lognormal",
                                                                                          0.5, seed=4)
    prompts = [len(r.prompt) for r in a]
    assert 1 <= min(prompts) and max(prompts) <= 80 and abs(sum(prompts) / 400 - 20) < 2
    assert all(0 <= t < 96 for r in a for t in r.prompt)
    uniform = draw_requests(200, 20, 10, 96, "uniform", 0.5)
    assert {len(r.prompt) for r in uniform} <= set(range(10, 31)) and len({r.output_len for r in uniform}) > 3
    assert {(len(r.prompt), r.output_len) for r in draw_requests(5, 7, 3, 96, "fixed")} == {(7, 3)}
    with pytest.raises(ValueError, match="choose from"):
        draw_requests(5, 7, 3, 96, "zipf")


def test_request_mode_serves_every_request_like_the_engine_alone():
    """Closed loop over 3 slots: every request completes with its output length, its tokens are what the
    engine gives its prompt alone, and the latencies add up within the wall time."""
    from lbsearch import apply_plan
    from lbsearch.engine import DecodeEngine
    from lbsearch.serving import draw_requests, engine_length, run_requests, summarize

    model = tiny_model("llama", layers=4)
    requests = draw_requests(9, 8, 6, 96, "uniform", 0.9, seed=1)
    assert len({len(r.prompt) for r in requests}) > 3 and min(r.output_len for r in requests) <= 2
    with apply_plan(model, Plan.parse("SL8s2f8NS")):
        engine = DecodeEngine(model, 3, engine_length(requests), prefill_rows=2)
        records, wall = run_requests(engine, requests)
        alone = [DecodeEngine(model, 1, engine_length(requests)).generate([list(r.prompt)], r.output_len)[0]
                 for r in requests]
    assert [r["index"] for r in records] == list(range(9))
    for rec, req, ref in zip(records, requests, alone):
        assert rec["output_len"] == req.output_len == len(rec["tokens"]) and rec["tokens"] == ref
        assert 0 < rec["ttft_s"] <= wall
        if req.output_len > 1:
            assert rec["tpot_s"] > 0 and rec["ttft_s"] + rec["tpot_s"] * (req.output_len - 1) <= wall
    stats = summarize(records, wall)
    generated = sum(r.output_len for r in requests)
    assert stats["requests"] == 9 and stats["throughput_tps"] * wall == pytest.approx(generated)
    assert 0 < stats["ttft_p50_ms"] <= stats["ttft_p99_ms"] <= 1000 * wall
    assert 0 < stats["tpot_p50_ms"] <= stats["tpot_p99_ms"] <= 1000 * wall


def test_sweep_requests_rows(cache_home):
    from lbsearch.bench import REQUEST_COLUMNS, sweep_requests

    model = tiny_model("qwen2", layers=4)
    rows = sweep_requests(model, [Plan.parse("SL8NN")], [2], 6, 4, requests=5, distribution="lognormal",
                          log=lambda *a: None)
    assert [r["plan"] for r in rows] == ["SSSS", "SL8NN"] and rows[0]["speedup"] == pytest.approx(1.0)
    assert all(r["requests"] == 5 and r["throughput_tps"] > 0 and r["mode"] == "requests" for r in rows)
    assert "TTFT p50 ms" in render(rows, REQUEST_COLUMNS)


def test_bench_command_request_mode(tmp_path, cache_home, capsys):
    model = tiny_model("llama", layers=4)
    model.save_pretrained(tmp_path / "m")
    rc = main(["bench", "--model", str(tmp_path / "m"), "--plans", "SNL8N", "--concurrency", "2", "--mode", "requests",
               "--requests", "4", "--prompt-len", "6", "--output-len", "3", "--lengths", "uniform",
               "--out", str(tmp_path / "out"), "--device", "cpu"])
    text = capsys.readouterr().out
    assert rc == 0 and "TTFT p50 ms" in text and "wrote png" in text
    data = json.loads((tmp_path / "out" / "bench_requests.json").read_text())
    assert [r["plan"] for r in data["rows"]] == ["SSSS", "SNL8N"] and data["meta"]["mode"] == "requests"
