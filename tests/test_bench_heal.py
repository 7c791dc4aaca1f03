"""benchmarks/bench_heal.py's command line: a mixture given on it is the data.sources a space takes; bad
flags stop it in one line before the teacher loads."""
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_heal.py"
sys.path.insert(0, str(BENCH.parent))


def test_sources_take_a_weight_and_options_a_space_accepts():
    import bench_heal as bench
    from lbsearch.space import SourceConfig

    entry = bench.mixture_entry("teacher-unconditional=0.2:max_new_tokens=2048:temperature=0.9")
    assert entry == {"source": "teacher-unconditional", "weight": 0.2, "max_new_tokens": 2048, "temperature": 0.9}
    assert SourceConfig(**entry).max_new_tokens == 2048
    assert bench.mixture_entry("package-docs") == {"source": "package-docs", "weight": 1.0}


@pytest.mark.parametrize("text, says", [
    ("teacher-unconditional=0.2:max_new_tokens", "'max_new_tokens' is not option=value"),
    ("teacher-unconditional=abc", "weight: Input should be a valid number"),
    ("teacher-unconditional=0.2:max_new_tokens=-5", "max_new_tokens: Input should be greater than or equal to 1"),
    ("teacher-unconditional=0.2:subset=x", "'subset' does not apply to a teacher-unconditional source"),
])
def test_a_bad_source_is_refused_in_one_line(text, says):
    import bench_heal as bench

    with pytest.raises(ValueError) as exc:
        bench.mixture_entry(text)
    message = str(exc.value)
    assert message.startswith(f"--sources: {text!r}: ") and says in message and "\n" not in message


@pytest.mark.parametrize("flags, says", [
    (["--horizons", "0", "--long-context", "64"], "--horizons: [0]: each a whole number of keys >= 1"),
    (["--horizons", "32"], "--horizons: measured on the long-context set only"),
    (["--sources", "teacher-unconditional=abc"], "weight: Input should be a valid number"),
])
def test_bad_flags_exit_2_in_one_line_before_any_work(tmp_path, flags, says):
    done = subprocess.run([sys.executable, str(BENCH), "--device", "cpu", "--out", str(tmp_path / "out"), *flags],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and says in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "out").exists()
