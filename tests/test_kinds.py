"""One conformance file run over every registered attention kind (the way Optuna runs one test
file over all samplers): a fourth kind passes these by adding its module and registry line."""
import pytest
import torch
from conftest import tiny_model

from lbsearch import LBSearchError, LayerSpec, Plan, apply_plan, plan_cache
from lbsearch.attention import BY_LETTER, KINDS, ORIGINAL
from lbsearch.attention.common import CountingCacheLayer
from lbsearch.cost import DEVICES, ModelShape, analytic_layer, kv_bytes_per_seq, spec_key
from lbsearch.engine import DecodeEngine
from lbsearch.models import decoder_layers
from lbsearch.plan import DEFAULTS

NAMES = list(KINDS)


def spec_of(name: str) -> LayerSpec:
    """A spec of the kind with small numbers (window 8, sinks 2, feature dim 8 for lswa)."""
    small = {"window": 8, "sinks": 2, "feature_dim": 8}
    return LayerSpec(kind=name, **{f.name: small[f.name] for f in KINDS[name].fields})


def mixed_plan(name: str) -> Plan:
    """Four layers: the kind under test in layers 1 and 3, the original attention elsewhere."""
    s, x = LayerSpec(kind=ORIGINAL), spec_of(name)
    return Plan((s, x, s, x))


def randomize(model, plan):
    """Give trainable kinds non-default parameters, so a test cannot pass on an initial value."""
    g = torch.Generator().manual_seed(3)
    for layer, spec in zip(decoder_layers(model), plan.layers):
        if KINDS[spec.kind].trainable:
            for p in layer.self_attn.new_parameters().values():
                p.data.add_(torch.randn(p.shape, generator=g) * 0.5)


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("name", NAMES)
def test_module_equals_its_reference(name):
    model = tiny_model("qwen3", layers=4)
    plan = mixed_plan(name)
    hidden = torch.randn(2, 40, 64, generator=torch.Generator().manual_seed(1))
    pos = torch.arange(40)[None].expand(2, -1)
    cos_sin = model.model.rotary_emb(hidden, pos)
    with apply_plan(model, plan):
        randomize(model, plan)
        attn = decoder_layers(model)[1].self_attn
        out = attn(hidden, position_embeddings=cos_sin, attention_mask=None)[0]
        ref = KINDS[name].reference(attn, hidden, cos_sin)
    assert out.shape == hidden.shape and torch.isfinite(out).all()
    if ref.abs().max() == 0:
        assert out.abs().max() == 0
    else:
        assert rel(out, ref) < 1e-5


@pytest.mark.parametrize("name", NAMES)
def test_cache_holds_what_the_cost_model_says(name):
    model = tiny_model("llama", layers=4)
    plan = mixed_plan(name)
    shape = ModelShape.from_config(model.config, dtype_bytes=4)
    cache = plan_cache(plan)
    ids = torch.randint(0, 96, (2, 50), generator=torch.Generator().manual_seed(2))
    sizes = []
    with apply_plan(model, plan):
        model(ids[:, :20], cache=cache, use_cache=True)
        for t in range(20, 50):
            model(ids[:, t:t + 1], cache=cache, use_cache=True)
            layer = cache.layers[1]
            sizes.append(layer.nbytes() if isinstance(layer, CountingCacheLayer)
                         else 2 * layer.keys.numel() * layer.keys.element_size())
    assert cache.get_seq_length() == 50
    assert sizes[-1] == 2 * KINDS[name].kv_bytes(shape, spec_of(name), 50)
    grows = KINDS[name].kv_bytes(shape, spec_of(name), 4096) > KINDS[name].kv_bytes(shape, spec_of(name), 50)
    assert (sizes[-1] > sizes[0]) == grows


@pytest.mark.parametrize("name", NAMES)
def test_engine_equals_generate(name):
    model = tiny_model("qwen2", layers=4)
    model.generation_config.eos_token_id = None
    plan = mixed_plan(name)
    ids = torch.randint(0, 96, (3, 21), generator=torch.Generator().manual_seed(4))
    with apply_plan(model, plan):
        randomize(model, plan)
        ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False,
                             pad_token_id=0)
        out = DecodeEngine(model, 3, 40, prefill_rows=2).generate(ids, 10)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("name", NAMES)
def test_cost_entry(name):
    kind, spec = KINDS[name], spec_of(name)
    shape = ModelShape(hidden=2048, layers=16, heads=32, kv_heads=8, head_dim=64, intermediate=8192, vocab=128256)
    nbytes, flops = kind.decode_traffic(shape, spec, 64, 1024)
    assert nbytes >= 0 and flops >= 0
    assert 0 < analytic_layer(shape, DEVICES["h200"], spec, 64, 1024) < 1.0
    assert kind.kv_bytes(shape, spec, 1024) <= kind.kv_bytes(shape, spec, 8192)
    assert kind.prefill_span(spec, 1024) >= 0
    assert spec_key(spec) == (spec.token() if kind.fields else name)
    base = Plan.softmax(16)
    assert kv_bytes_per_seq(shape, Plan.uniform(16, spec), 1024) <= kv_bytes_per_seq(shape, base, 1024) or grows(kind)


def grows(kind) -> bool:
    return not kind.fields and kind.name == ORIGINAL


@pytest.mark.parametrize("name", NAMES)
def test_codec_round_trip_and_validation(name):
    kind, spec = KINDS[name], spec_of(name)
    assert BY_LETTER[kind.letter] is kind
    assert Plan.parse(spec.token()) == Plan((spec,))
    bare = Plan.parse(kind.letter)[0]
    assert all(getattr(bare, f.name) == getattr(DEFAULTS, f.name) for f in kind.fields)
    assert LayerSpec(**spec.to_dict()) == spec
    for f in kind.fields:
        with pytest.raises(LBSearchError, match=f.name):
            LayerSpec(**{**spec.to_dict(), f.name: f.minimum - 1})
    others = [n for n in ("window", "sinks", "feature_dim") if n not in {f.name for f in kind.fields}]
    for n in others:
        with pytest.raises(LBSearchError, match="take no"):
            LayerSpec(**{**spec.to_dict(), n: 8})


def test_letters_are_unique_and_upper_case():
    letters = [k.letter for k in KINDS.values()]
    assert len(set(letters)) == len(letters) and all(len(x) == 1 and x.isupper() for x in letters)
    assert ORIGINAL in KINDS


@pytest.mark.parametrize("name", NAMES)
def test_left_padded_batch_equals_each_row_alone(name):
    """Forward and generate(): a left-padded row gives what the row gives alone (pads are no sinks)."""
    model = tiny_model("llama", layers=4)
    model.generation_config.eos_token_id = None
    plan = mixed_plan(name)
    rows = [torch.randint(1, 96, (n,), generator=torch.Generator().manual_seed(n)) for n in (30, 17, 9)]
    width = max(len(r) for r in rows)
    ids = torch.stack([torch.cat([torch.zeros(width - len(r), dtype=torch.long), r]) for r in rows])
    mask = (torch.arange(width)[None] >= torch.tensor([width - len(r) for r in rows])[:, None]).long()
    with apply_plan(model, plan):
        randomize(model, plan)
        positions = (mask.cumsum(-1) - 1).clamp_min(0)  # what generate() passes: rows start at position 0
        logits = model(ids, attention_mask=mask, position_ids=positions).logits
        gen = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
        for b, r in enumerate(rows):
            alone = model(r[None]).logits[0]
            assert rel(logits[b, width - len(r):], alone) < 1e-5, (name, b)
            alone_gen = model.generate(r[None], max_new_tokens=8, do_sample=False, pad_token_id=0)
            assert torch.equal(gen[b, width - len(r):], alone_gen[0]), (name, b)
