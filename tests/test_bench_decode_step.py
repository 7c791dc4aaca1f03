"""benchmarks/bench_decode_step.py in its CPU smoke mode: every section runs and the JSON holds its rows."""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


def test_smoke(tmp_path):
    import bench_decode_step as bench

    result = bench.main(["--smoke", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "decode_step.json").read_text())
    assert len(saved["step"]) == 5 * 2 and {r["engine"] for r in saved["step"]} == {"eager", "fused"}
    assert all(r["step_ms"] > 0 and r["floor_ms"] > 0 for r in saved["step"])
    assert len(result["serving"]) == 5
    base = [r for r in result["serving"] if r["plan_name"] == "base"][0]
    assert base["fused_x_base"] == 1.0 and base["floor_x_base"] == 1.0 and base["fused_over_eager"] > 0
    assert bench.plans_for(16)["all-lswa-but-2"] == "SS" + "L64" * 14
    assert bench.plans_for(30)["third-softmax"].count("S") == 10


def test_the_feature_map_inside_the_decode_kernel_is_a_selectable_engine(tmp_path):
    import bench_decode_step as bench

    result = bench.main(["--smoke", "--out", str(tmp_path), "--plans", "all-lswa-but-2",
                         "--engines", "fused", "fused-fmap-in", "--no-serving"])
    paths = {r["engine"]: r["fused_paths"] for r in result["step"]}
    lswa = paths["fused"]["attention_layers"] - 2
    assert paths["fused-fmap-in"]["lswa_fmap_in_decode"] == lswa > 0
    assert paths["fused"]["lswa_fmap_in_decode"] == 0


def test_profile_table_shows_each_steps_top_kernels_as_shares():
    import bench_decode_step as bench

    top = [{"kernel": "gemm_a", "launches": 30, "us": 600.0}, {"kernel": "lswa_decode", "launches": 28, "us": 300.0},
           {"kernel": "rmsnorm", "launches": 61, "us": 100.0}]
    rows = [{"shape": "s", "plan_name": "p", "engine": "fused", "step_ms": 1.2,
             "kernels": {"kernel_us": 1000.0, "top": top}},
            {"shape": "s", "plan_name": "q", "engine": "fused", "step_ms": 1.0, "kernels": None}]  # a CPU row
    lines = bench.profile_table(rows, top=2).splitlines()
    assert lines[0] == "s p fused: kernels 1.000 ms of a 1.200 ms step" and len(lines) == 3
    assert "60.0%" in lines[1] and "gemm_a" in lines[1] and "30x" in lines[1]
    assert "30.0%" in lines[2] and "lswa_decode" in lines[2]
    assert bench.profile_table(rows[1:]) == ""
