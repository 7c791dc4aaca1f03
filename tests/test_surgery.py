import pytest
import torch
from conftest import FAMILIES, tiny_model

from lbsearch import Plan, apply_plan, plan_cache
from lbsearch.attention.lswa import LSWAttention
from lbsearch.models import decoder_layers

PLANS = ["SSSS", "SL8s2f8NL16", "NNNN", "LLLL", "L4s0LL3s1f4N"]


def ids(batch=2, length=40, vocab=96, seed=1):
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", FAMILIES)
def test_all_softmax_plan_is_identical(family):
    model = tiny_model(family, tie=family == "qwen2")
    x = ids()
    ref = model(x).logits
    with apply_plan(model, Plan.parse("SSSS")):
        assert torch.equal(model(x).logits, ref)


@pytest.mark.parametrize("family", FAMILIES)
def test_restore_gives_back_the_original(family):
    model = tiny_model(family)
    x = ids()
    ref = model(x).logits
    handle = apply_plan(model, Plan.parse("LNLN"))
    assert not torch.equal(model(x).logits, ref)
    handle.restore()
    assert torch.equal(model(x).logits, ref)
    # plans do not stack: a changed model refuses a second plan until it is restored
    handle = apply_plan(model, Plan.parse("NSSS"))
    with pytest.raises(RuntimeError, match="already changed"):
        apply_plan(model, Plan.parse("SSNS"))
    handle.restore()
    with apply_plan(model, Plan.parse("SSSS")):
        assert torch.equal(model(x).logits, ref)


@pytest.mark.parametrize("family", FAMILIES)
def test_lswa_with_window_covering_the_sequence_is_softmax(family):
    model = tiny_model(family)
    x = ids(length=33)
    ref = model(x).logits
    with apply_plan(model, Plan.parse("L64L40L33L64")):
        out = model(x).logits
    assert (out - ref).norm() / ref.norm() < 1e-5


def test_lswa_changes_layers_only_where_the_plan_says():
    model = tiny_model("llama")
    with apply_plan(model, Plan.parse("SL8NS")):
        kinds = [type(layer.self_attn).__name__ for layer in decoder_layers(model)]
    assert kinds[1] == "LSWAttention" and kinds[2] == "NoAttention"
    assert kinds[0] == kinds[3] != "LSWAttention"


@pytest.mark.parametrize("family", FAMILIES)
def test_none_layer_adds_exactly_zero(family):
    model = tiny_model(family)
    layer = decoder_layers(model)[1]
    seen = {}
    layer.register_forward_hook(lambda m, a, kw, out: seen.update(inp=kw.get("hidden_states", a[0] if a else None), out=out),
                                with_kwargs=True)
    with apply_plan(model, Plan.parse("SNSS")):
        attn_out = {}
        layer.self_attn.register_forward_hook(lambda m, a, out: attn_out.update(v=out[0]))
        model(ids())
        h = seen["inp"]
        expected = h + layer.mlp(layer.post_attention_layernorm(h))
    assert torch.count_nonzero(attn_out["v"]) == 0
    assert torch.equal(seen["out"], expected)


def greedy_without_cache(model, prompt, steps):
    seq = prompt
    for _ in range(steps):
        nxt = model(seq).logits[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], 1)
    return seq


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("plan", PLANS)
def test_cached_generate_equals_full_forward(family, plan):
    model = tiny_model(family)
    prompt = ids(batch=2, length=9)
    with apply_plan(model, Plan.parse(plan)):
        gen = model.generate(prompt, max_new_tokens=14, do_sample=False, min_new_tokens=14)
        assert torch.equal(gen, greedy_without_cache(model, prompt, 14))
        full = model(gen).logits
        cache = plan_cache(Plan.parse(plan))
        steps = [model(gen[:, :9], cache=cache, use_cache=True).logits]
        steps += [model(gen[:, t:t + 1], cache=cache, use_cache=True).logits for t in range(9, gen.shape[1])]
    stepped = torch.cat(steps, 1)
    assert (stepped - full).norm() / full.norm() < 1e-5
    assert cache.get_seq_length() == gen.shape[1]


def test_lswa_and_none_caches_do_not_grow():
    model = tiny_model("llama")
    plan = Plan.parse("SL4s2NL8")
    cache = plan_cache(plan)
    x = ids(batch=1, length=100)
    with apply_plan(model, plan):
        model(x[:, :12], cache=cache, use_cache=True)
        before = [getattr(layer, "nbytes", lambda: layer.keys.numel() * 4)() for layer in cache.layers]
        for t in range(12, 100):
            model(x[:, t:t + 1], cache=cache, use_cache=True)
        after = [getattr(layer, "nbytes", lambda: layer.keys.numel() * 4)() for layer in cache.layers]
    assert after[0] > before[0]  # softmax KV grows with length
    assert after[1:] == before[1:]  # lswa and none stay constant
    assert after[2] == 0
    assert after[1] > 0


def test_lswa_new_parameters_are_the_only_new_ones():
    model = tiny_model("llama")
    before = {id(p) for p in model.parameters()}
    with apply_plan(model, Plan.parse("SLSL")):
        new = [p for p in model.parameters() if id(p) not in before]
        mods = [layer.self_attn for layer in decoder_layers(model) if isinstance(layer.self_attn, LSWAttention)]
        declared = [p for m in mods for p in m.new_parameters().values()]
    assert {id(p) for p in new} == {id(p) for p in declared}
    assert len(declared) == 4


def test_plan_length_checked_against_model():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="the model has 4"):
        apply_plan(model, Plan.parse("SSS"))
