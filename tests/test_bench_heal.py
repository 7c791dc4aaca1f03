"""benchmarks/bench_heal.py's command line: a mixture given on it is the data.sources a space takes."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


def test_sources_take_a_weight_and_options_a_space_accepts():
    import bench_heal as bench
    from lbsearch.space import SourceConfig

    entry = bench.mixture_entry("teacher-unconditional=0.2:max_new_tokens=2048:temperature=0.9")
    assert entry == {"source": "teacher-unconditional", "weight": 0.2, "max_new_tokens": 2048, "temperature": 0.9}
    assert SourceConfig(**entry).max_new_tokens == 2048
    assert bench.mixture_entry("package-docs") == {"source": "package-docs", "weight": 1.0}


def test_an_option_without_a_value_is_refused_in_one_line():
    import bench_heal as bench

    with pytest.raises(SystemExit, match="max_new_tokens.*is not option=value"):
        bench.mixture_entry("teacher-unconditional=0.2:max_new_tokens")
