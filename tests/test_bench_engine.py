"""The decode engine generates exactly what HF generate() (greedy) does on the same model and plan."""
import pytest
import torch

from conftest import tiny_model
from lbsearch import Plan, apply_plan
from lbsearch.engine import DecodeEngine

CASES = [("llama", "SSSS"), ("llama", "SL8NL8"), ("qwen3", "L8s0L8NS"), ("mistral", "NNNN"), ("qwen2", "SNL8S")]


def hf_greedy(model, ids, new_tokens):
    model.generation_config.eos_token_id = None
    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                          do_sample=False, pad_token_id=0)


@pytest.mark.parametrize("family,plan", CASES, ids=[f"{f}-{p}" for f, p in CASES])
def test_engine_equals_hf_generate(family, plan):
    model = tiny_model(family, layers=len(Plan.parse(plan)))
    ids = torch.randint(0, 96, (3, 20), generator=torch.Generator().manual_seed(1))
    with apply_plan(model, Plan.parse(plan)):
        ref = hf_greedy(model, ids, 12)
        out = DecodeEngine(model, 3, 40, prefill_rows=2).generate(ids, 12)  # two prefill micro-batches
    assert torch.equal(out, ref)


def test_engine_honours_trained_lswa_parameters():
    model = tiny_model("qwen2", layers=4)
    ids = torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(2))
    with apply_plan(model, Plan.parse("SL8L8N")) as handle:
        untrained = DecodeEngine(model, 2, 40).generate(ids, 10)
        for i in (1, 2):
            attn = model.model.layers[i].self_attn
            attn.gate_logit.data.fill_(-1.0)  # mostly the linear part
            attn.feature_map.weight.data.normal_(0, 1, generator=torch.Generator().manual_seed(i))
        ref = hf_greedy(model, ids, 10)
        out = DecodeEngine(model, 2, 40).generate(ids, 10)
    assert handle.originals == {}
    assert torch.equal(out, ref)
    assert not torch.equal(out, untrained)


def test_repeat_decode_from_snapshot_and_cache_bytes():
    model = tiny_model("llama", layers=4)
    ids = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(3))
    with apply_plan(model, Plan.parse("SL8s2f16NN")):
        eng = DecodeEngine(model, 2, 32)
        eng.prefill(ids)
        snap = eng.snapshot()
        eng.decode(8)
        first = eng.seq[:, :25].clone()
        eng.restore(snap)
        eng.decode(8)
        assert torch.equal(eng.seq[:, :25], first)
        with pytest.raises(ValueError, match="exceed max_len"):
            eng.decode(20)
        sizes = eng.cache_bytes()
    # softmax: 2 (k, v) x B 2 x Hkv 2 x L 32 x D 16 x 4 bytes; none: nothing; lswa: its state
    assert sizes["softmax"] == 2 * 2 * 2 * 32 * 16 * 4
    assert sizes["none"] == 0
    ring = 2 * 2 * (2 * 2 * 16 + 2 * 8 * 16 + 8 * 16) * 4  # sinks k/v, ring k/v, ring fk
    lin = 2 * 2 * (16 * 16 + 16) * 4 + 2 * 8  # lin_s, lin_z (fp32), pos
    assert sizes["lswa"] == ring + lin


def test_fake_fill_and_step_seconds():
    """The profile's timers drive the engine at a pretended context (what the cost tables measure)."""
    from lbsearch.profile import fake_fill, step_seconds

    model = tiny_model("llama", layers=4)
    plan = Plan.parse("SL8s2f16NN")
    with apply_plan(model, plan):
        eng = DecodeEngine(model, 2, 40)
        fake_fill(eng, 30)
        eng.decode(6)
        assert eng.pos.tolist() == [36, 36] and eng.prompt_len == 36
        assert [r for r in eng.runners if hasattr(r, "st")][0].st.pos.tolist() == [36, 36]
        with pytest.raises(ValueError, match="exceed max_len"):
            eng.decode(5)
    assert 0 < step_seconds(model, plan, 2, 30, steps=4, repeats=1) < 5
