"""Teacher load time: first load (GGUF conversion into an empty cache) vs later loads.

Usage: python benchmarks/bench_load.py [--model smollm2-135m]
Each load runs in a fresh process (imports included), as a user would see it.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

LOAD = "from lbsearch import load_teacher; load_teacher({ref!r})"


def timed(ref: str, cache: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", LOAD.format(ref=ref)], check=True, capture_output=True,
                   env=dict(os.environ, LBSEARCH_CACHE=cache))
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as cache:
        first = timed(args.model, cache)
        later = [timed(args.model, cache) for _ in range(3)]
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import transformers.models.llama.modeling_llama"], check=True)
    imports = time.perf_counter() - start
    result = {"model": args.model, "first_s": first, "later_s": later, "imports_only_s": imports}
    print(json.dumps(result))
    print(f"first load {first:.1f} s; later loads {min(later):.1f}-{max(later):.1f} s "
          f"(of which importing python + transformers' llama code {imports:.1f} s)")


if __name__ == "__main__":
    main()
