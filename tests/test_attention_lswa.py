"""LSWA against a float64 reference written straight from the definition, one query at a time."""
import pytest
import torch
from conftest import tiny_model

from lbsearch import LayerSpec, Plan, apply_plan
from lbsearch.attention.common import project_qkv
from lbsearch.attention.lswa import linear_horizon
from lbsearch.models import decoder_layers


def reference(q, k, v, fq, fk, gate, window, sinks, scale, horizon=None):
    """Per query: exact softmax over sinks + window, linear over the rest, one normaliser. ``horizon``:
    past that many linear keys, their weights are scaled to weigh as much as ``horizon`` of them."""
    b, t, h, d = q.shape
    group = h // k.shape[2]
    out = torch.empty_like(q)
    for bi in range(b):
        for hi in range(h):
            kh = hi // group
            for i in range(t):
                soft = [j for j in range(i + 1) if j < sinks or j > i - window]
                lin = [j for j in range(i + 1) if j not in soft]
                a = torch.stack([q[bi, i, hi] @ k[bi, j, kh] for j in soft]) * scale
                e = gate[hi] * torch.exp(a - a.max())
                num = (e[:, None] * v[bi, soft, kh]).sum(0)
                den = e.sum()
                share = min(1.0, horizon / len(lin)) if horizon and lin else 1.0
                for j in lin:
                    w = share * (1 - gate[hi]) * (fq[bi, i, hi] @ fk[bi, j, kh])
                    num, den = num + w * v[bi, j, kh], den + w
                out[bi, i, hi] = num / den
    return out


def lswa_model(window: int, sinks: int, layer: int = 2, gate_mean: float = 0.0):
    """A float64 tiny model with one trained-looking LSWA layer (normal feature map and gate logits around
    ``gate_mean``: below 0 the linear part carries most weight); (model, plan handle, the LSWA module)."""
    model = tiny_model("qwen3").double()
    spec = LayerSpec(kind="lswa", window=window, sinks=sinks, feature_dim=8)
    handle = apply_plan(model, Plan.parse("SSSS").with_layer(layer, spec))
    attn = decoder_layers(model)[layer].self_attn
    torch.nn.init.normal_(attn.feature_map.weight)
    torch.nn.init.normal_(attn.gate_logit, mean=gate_mean)
    return model, handle, attn


def module_and_reference(model, attn, x, horizon=None):
    """The LSWA module's output on ``x`` inside the model, and the per-query reference on its own inputs."""
    captured = {}
    hook = attn.register_forward_hook(lambda m, a, kw, out: captured.update(
        h=a[0] if a else kw["hidden_states"], pe=kw["position_embeddings"], out=out[0]), with_kwargs=True)
    model(x)
    hook.remove()
    q, k, v = project_qkv(attn.base, captured["h"], captured["pe"])
    fq, fk = attn.feature_map(q).double(), attn.feature_map(k).double()
    ref = reference(q, k, v, fq, fk, torch.sigmoid(attn.gate_logit), attn.window, attn.sinks, attn.base.scaling,
                    horizon)
    return captured["out"], attn.base.o_proj(ref.flatten(2))


@pytest.mark.parametrize("window,sinks", [(4, 2), (3, 0), (6, 1), (1, 3)])
def test_lswa_module_matches_float64_reference(window, sinks):
    model, handle, attn = lswa_model(window, sinks)
    x = torch.randint(0, 96, (2, 21), generator=torch.Generator().manual_seed(3))
    with handle:
        out, expected = module_and_reference(model, attn, x)
    assert (out - expected).norm() / expected.norm() < 1e-10


def test_untrained_lswa_is_closer_to_softmax_than_removal():
    model = tiny_model("llama")
    x = torch.randint(0, 96, (2, 64), generator=torch.Generator().manual_seed(4))
    ref = model(x).logits
    errors = {}
    for plan in ("SL8SS", "SNSS"):
        with apply_plan(model, Plan.parse(plan)):
            errors[plan] = ((model(x).logits - ref).norm() / ref.norm()).item()
    assert errors["SL8SS"] < errors["SNSS"]


@pytest.mark.parametrize("window,sinks,horizon", [(4, 2, 3), (3, 0, 1), (2, 1, 7)])
def test_linear_horizon_matches_the_reference(window, sinks, horizon):
    """A bounded linear part: past ``horizon`` linear keys a query weighs them as ``horizon`` average ones."""
    model, handle, attn = lswa_model(window, sinks, gate_mean=-1.0)
    x = torch.randint(0, 96, (2, 21), generator=torch.Generator().manual_seed(5))
    with handle:
        with linear_horizon(model, horizon):
            out, bounded = module_and_reference(model, attn, x, horizon)
        _, plain = module_and_reference(model, attn, x)
    assert (out - bounded).norm() / bounded.norm() < 1e-10
    assert (bounded - plain).norm() / plain.norm() > 1e-3  # the bound changed something
    assert attn.linear_horizon is None  # the setting comes back


def test_linear_horizon_decodes_like_the_full_forward():
    """Prefill then decode (one token and several at a time) through the cache = the full forward (the
    decode state's linear part is float32, hence the tolerance); a horizon beyond the context is no bound."""
    model, handle, _ = lswa_model(window=3, sinks=1, gate_mean=-1.0)
    x = torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(6))
    with handle:
        unbounded = model(x).logits
        with linear_horizon(model, 24):
            assert torch.equal(model(x).logits, unbounded)
        with linear_horizon(model, 4):
            full = model(x).logits
            out = model(x[:, :9], use_cache=True)
            cache, got = out.past_key_values, [out.logits]
            for a, b in ((9, 10), (10, 13), (13, 24)):
                out = model(x[:, a:b], past_key_values=cache, use_cache=True)
                got.append(out.logits)
    assert (torch.cat(got, 1) - full).abs().max() < 1e-6
    assert (unbounded - full).abs().max() > 1e-3


def test_linear_horizon_counts_real_tokens_of_a_left_padded_row():
    model, handle, _ = lswa_model(window=3, sinks=1, gate_mean=-1.0)
    rows = [torch.randint(1, 96, (n,), generator=torch.Generator().manual_seed(n)) for n in (22, 13)]
    width = max(len(r) for r in rows)
    ids = torch.stack([torch.cat([torch.zeros(width - len(r), dtype=torch.long), r]) for r in rows])
    mask = (torch.arange(width)[None] >= torch.tensor([width - len(r) for r in rows])[:, None]).long()
    with handle, linear_horizon(model, 3):
        logits = model(ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp_min(0)).logits
        for b, r in enumerate(rows):
            alone = model(r[None]).logits[0]
            assert (logits[b, width - len(r):] - alone).abs().max() < 1e-9, b


def test_decode_engine_refuses_a_linear_horizon_and_bad_horizons_are_one_line_errors():
    from lbsearch import LBSearchError
    from lbsearch.engine import DecodeEngine

    model, handle, _ = lswa_model(window=3, sinks=1, gate_mean=-1.0)
    with handle, linear_horizon(model, 4), pytest.raises(LBSearchError, match="linear_horizon is an evaluation option"):
        DecodeEngine(model.float(), batch=2, max_len=32)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(LBSearchError, match=r"linear_horizon: .*must be a whole number of keys >= 1"):
            with linear_horizon(model, bad):
                pass
