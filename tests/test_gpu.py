"""GPU-only checks: ``pytest -m gpu`` on the device runs these and the kernel tests of tests/kernels
compiled (they are marked ``gpu`` there when CUDA is present). Without CUDA everything here skips.

Covered: the Triton kernels are compiled, not interpreted; the engine (CUDA graph, Triton
kernels) is token-exact with HF ``generate()`` for the four families on ragged prompts with
every kind; CUDA-graph replay equals the eager step, greedy and sampled; slot refill in the
request loop; ``fake_fill`` / ``step_seconds`` / ``measure_layer_costs``; healing under autocast.
"""
import math

import pytest
import torch
from conftest import FAMILIES, tiny_model

from lbsearch import LayerSpec, Plan, apply_plan

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

PLANS = {"llama": "SL8NS", "mistral": "L8s2f8SNS", "qwen2": "SNL8S", "qwen3": "L8s0L8NS"}


def cuda_model(family, plan_text):
    model = tiny_model(family, layers=len(Plan.parse(plan_text))).cuda()
    model.generation_config.eos_token_id = None
    return model


def prompts_of(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 96, (n,), generator=g).tolist() for n in lengths]


def test_kernels_are_compiled():
    from triton.runtime.interpreter import InterpretedFunction

    from lbsearch.kernels.decode_attention import split_kv
    from lbsearch.kernels.lswa import chunk, fused_recurrent

    kernels = [split_kv._partial_kernel, fused_recurrent._decode_kernel]
    kernels += [v for v in vars(chunk).values() if type(v).__name__ in ("JITFunction", "InterpretedFunction")]
    assert kernels and not any(isinstance(k, InterpretedFunction) for k in kernels), \
        "TRITON_INTERPRET=1 is set: unset it to test the compiled kernels"


@pytest.mark.parametrize("family", FAMILIES)
def test_engine_equals_generate_on_gpu(family):
    """CUDA graph + Triton kernels, left-padded prompts of different lengths, EOS stop: token-exact (fp32)."""
    from lbsearch.engine import DecodeEngine

    model = cuda_model(family, PLANS[family])
    prompts = prompts_of((5, 23, 12, 1, 17, 40))
    with apply_plan(model, Plan.parse(PLANS[family])):
        engine = DecodeEngine(model, 6, 80, prefill_rows=4)
        assert engine._graphs  # the greedy step was captured
        ref = _hf_greedy_cuda(model, prompts, 24)
        assert engine.generate(prompts, 24) == ref
        eos = ref[2][6]
        assert engine.generate(prompts, 24, eos_token_id=eos) == _hf_greedy_cuda(model, prompts, 24, eos)


def _hf_greedy_cuda(model, prompts, new, eos=None):
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device="cuda")
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device="cuda")
    out = model.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False, pad_token_id=0,
                         eos_token_id=eos)
    rows = out[:, width:].tolist()
    return [r[: r.index(eos) + 1] if eos in r else r for r in rows]


def test_graph_replay_equals_eager_step():
    """Greedy and sampled decoding give the same tokens with the captured step and the eager one; a seed repeats."""
    from lbsearch.engine import DecodeEngine

    model = cuda_model("llama", "SL8NS")
    prompts = prompts_of((9, 30, 3), seed=4)
    sampled = dict(temperature=0.9, top_p=0.9, top_k=20, seed=3)
    with apply_plan(model, Plan.parse("SL8NS")):
        graph, eager = DecodeEngine(model, 3, 64, graph=True), DecodeEngine(model, 3, 64, graph=False)
        assert graph.generate(prompts, 30) == eager.generate(prompts, 30)
        first = graph.generate(prompts, 30, **sampled)
        assert len(graph._graphs) == 2  # greedy and this sampling setting
        assert graph.generate(prompts, 30, **sampled) == first
        assert eager.generate(prompts, 30, **sampled) == first
        assert graph.generate(prompts, 30, **{**sampled, "seed": 4}) != first


def test_request_loop_on_gpu():
    from lbsearch.engine import DecodeEngine
    from lbsearch.serving import draw_requests, engine_length, run_requests

    model = cuda_model("qwen3", "L8s0L8NS")
    requests = draw_requests(10, 12, 8, 96, "lognormal", 0.6, seed=2)
    with apply_plan(model, Plan.parse("L8s0L8NS")):
        records, wall = run_requests(DecodeEngine(model, 4, engine_length(requests)), requests)
        alone = DecodeEngine(model, 1, engine_length(requests))
        for rec, req in zip(records, requests):
            assert rec["tokens"] == alone.generate([list(req.prompt)], req.output_len)[0]
            assert 0 < rec["ttft_s"] <= wall


def test_profile_timers_on_gpu():
    from lbsearch.cost import ModelShape
    from lbsearch.engine import DecodeEngine
    from lbsearch.profile import fake_fill, measure_layer_costs, random_model, shape_config, step_seconds

    shape = ModelShape(hidden=256, layers=4, heads=4, kv_heads=2, head_dim=64, intermediate=512, vocab=1024)
    model = random_model(shape_config(shape), torch.bfloat16, "cuda")
    plan = Plan.parse("SL64NS")
    with apply_plan(model, plan):
        engine = DecodeEngine(model, 8, 300)
        fake_fill(engine, 200)
        engine.decode(16)
        assert engine.pos.tolist() == [216] * 8 and engine.prompt_len == 216
        lswa = [r for r in engine.runners if hasattr(r, "st")][0]
        assert lswa.st.pos.tolist() == [216] * 8
    assert 0 < step_seconds(model, plan, 8, 200) < 1
    specs = [LayerSpec(kind="softmax"), LayerSpec.lswa(64, 4, 32), LayerSpec(kind="none")]
    head, layer = measure_layer_costs(shape, 8, 256, specs, "cuda", layers=4)
    assert head >= 0 and set(layer) >= {"softmax", "none"} and all(math.isfinite(v) for v in layer.values())


def test_healing_under_autocast(tmp_path):
    """On CUDA healing runs in bf16 autocast (LSWA in the autocast dtype): finite loss that falls."""
    from lbsearch.distill import HealConfig, add_lora, heal
    from lbsearch.distill.healing import HealStep, trainable_parameters
    from lbsearch.evaluate import evaluate, teacher_logits

    spec = LayerSpec(kind="lswa", window=4, sinks=1, feature_dim=8)
    plan = Plan((LayerSpec(kind="softmax"), spec, LayerSpec(kind="none"), spec))
    model = tiny_model("llama").cuda()
    handle = apply_plan(model, plan)
    cfg = HealConfig(tokens=32 * 4 * 30, lr=1e-2, lora_lr=5e-3, lora_rank=4, checkpoint_tokens=10**9)
    add_lora(model, cfg)
    train = torch.randint(0, 96, (8, 32), generator=torch.Generator().manual_seed(0))  # blocks stay on CPU
    with handle.suspended():
        teacher = teacher_logits(model, train[:4])
    before = evaluate(model, train[:4], teacher)
    step = HealStep(model, handle, cfg, trainable_parameters(model))
    assert step.autocast["enabled"] and step.autocast["dtype"] == torch.bfloat16
    seen = []
    hook = model.model.layers[1].self_attn.register_forward_hook(lambda m, a, out: seen.append(out[0].dtype))
    state = heal(model, handle, train, cfg, tmp_path, progress=False)
    hook.remove()
    assert torch.bfloat16 in seen and all(math.isfinite(x) for x in state.losses)
    assert evaluate(model, train[:4], teacher).kl < 0.8 * before.kl
    handle.restore()
