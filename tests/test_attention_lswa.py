"""LSWA against a float64 reference written straight from the definition, one query at a time."""
import pytest
import torch
from conftest import tiny_model

from lbsearch import LayerSpec, Plan, apply_plan
from lbsearch.attention.common import project_qkv
from lbsearch.models import decoder_layers


def reference(q, k, v, fq, fk, gate, window, sinks, scale):
    """Per query: exact softmax over sinks + window, linear over the rest, one normaliser."""
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
                for j in lin:
                    w = (1 - gate[hi]) * (fq[bi, i, hi] @ fk[bi, j, kh])
                    num, den = num + w * v[bi, j, kh], den + w
                out[bi, i, hi] = num / den
    return out


@pytest.mark.parametrize("window,sinks", [(4, 2), (3, 0), (6, 1), (1, 3)])
def test_lswa_module_matches_float64_reference(window, sinks):
    model = tiny_model("qwen3").double()
    x = torch.randint(0, 96, (2, 21), generator=torch.Generator().manual_seed(3))
    spec = LayerSpec(kind="lswa", window=window, sinks=sinks, feature_dim=8)
    with apply_plan(model, Plan.parse("S" * 3 + "S").with_layer(2, spec)):
        attn = decoder_layers(model)[2].self_attn
        torch.nn.init.normal_(attn.feature_map.weight)  # trained-looking feature map
        torch.nn.init.normal_(attn.gate_logit)
        captured = {}
        attn.register_forward_hook(lambda m, a, kw, out: captured.update(h=a[0] if a else kw["hidden_states"],
                                                                         pe=kw["position_embeddings"], out=out[0]),
                                   with_kwargs=True)
        model(x)
        q, k, v = project_qkv(attn.base, captured["h"], captured["pe"])
        fq, fk = attn.feature_map(q).double(), attn.feature_map(k).double()
        ref = reference(q, k, v, fq, fk, torch.sigmoid(attn.gate_logit), window, sinks, attn.base.scaling)
        expected = attn.base.o_proj(ref.flatten(2))
    assert (captured["out"] - expected).norm() / expected.norm() < 1e-10


def test_untrained_lswa_is_closer_to_softmax_than_removal():
    model = tiny_model("llama")
    x = torch.randint(0, 96, (2, 64), generator=torch.Generator().manual_seed(4))
    ref = model(x).logits
    errors = {}
    for plan in ("SL8SS", "SNSS"):
        with apply_plan(model, Plan.parse(plan)):
            errors[plan] = ((model(x).logits - ref).norm() / ref.norm()).item()
    assert errors["SL8SS"] < errors["SNSS"]
