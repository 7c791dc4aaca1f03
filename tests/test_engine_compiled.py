"""``DecodeEngine(compile=True)``: the fused step through torch.compile (inductor, the kernels as custom
ops) equals the eager step; where compiling fails the engine warns and runs the fused step uncompiled.
On CPU inductor compiles C++ (tens of seconds); the CUDA-graph captures are in the gpu tests."""
import pytest
import torch
from conftest import tiny_model

from lbsearch import Plan, apply_plan
from lbsearch.engine import DecodeEngine

PROMPTS = [[5, 9, 2, 7, 1, 33, 4], [3] * 12, [8, 4], [60, 2, 19, 7]]


def test_compiled_step_equals_eager():
    model = tiny_model("qwen3", layers=4)
    with apply_plan(model, Plan.parse("SL8s2f8NS")):
        eager = DecodeEngine(model, 4, 40, fused=False)
        compiled = DecodeEngine(model, 4, 40, compile=True)
        assert compiled.compiled  # compiled at build, not fallen back
        assert compiled.generate(PROMPTS, 14) == eager.generate(PROMPTS, 14)
        kw = dict(temperature=0.8, top_p=0.9, seed=5)
        assert compiled.generate(PROMPTS, 14, **kw) == eager.generate(PROMPTS, 14, **kw)


def test_compile_failure_falls_back(monkeypatch):
    def broken(fn, **kwargs):
        def run(*args):
            raise RuntimeError("no compiler here")
        return run

    monkeypatch.setattr(torch, "compile", broken)
    model = tiny_model("llama", layers=3)
    with apply_plan(model, Plan.parse("SL8N")):
        with pytest.warns(UserWarning, match="running it uncompiled"):
            engine = DecodeEngine(model, 4, 40, compile=True)
        assert not engine.compiled and engine.fused
        assert engine.generate(PROMPTS, 8) == DecodeEngine(model, 4, 40, fused=False).generate(PROMPTS, 8)
