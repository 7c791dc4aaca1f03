"""Engine sampling (HF's filters, seeded draws) and ragged prompts (token-exact with HF generate())."""
import pytest
import torch
from conftest import FAMILIES, tiny_model
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from lbsearch import Plan, apply_plan, sampling
from lbsearch.engine import DecodeEngine
from lbsearch.sampling import Sampling, filter_logits, nucleus_probs, pick

# every kind in every family, lswa with and without sinks
PLANS = {"llama": "SL8NS", "mistral": "L8s2f8SNS", "qwen2": "SNL8S", "qwen3": "L8s0L8NS"}


def prompts_of(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 96, (n,), generator=g).tolist() for n in lengths]


def hf_greedy(model, prompts, new, eos=None):
    """HF generate() on the left-padded batch: each row's new tokens, up to and including its EOS."""
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    model.generation_config.eos_token_id = None
    out = model.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False, pad_token_id=0,
                         eos_token_id=eos)
    rows = out[:, width:].tolist()
    return [r[: r.index(eos) + 1] if eos in r else r for r in rows]


@pytest.mark.parametrize("family", FAMILIES)
def test_ragged_batch_equals_hf_generate(family):
    """Left-padded prompts of different lengths, every kind, per-row EOS stop: token-exact."""
    plan = Plan.parse(PLANS[family])
    model = tiny_model(family, layers=len(plan))
    prompts = prompts_of((5, 23, 12, 1, 17))
    with apply_plan(model, plan):
        ref = hf_greedy(model, prompts, 14)
        engine = DecodeEngine(model, 6, 40, prefill_rows=3)  # two micro-batches, one parked row
        assert engine.generate(prompts, 14) == ref
        eos = ref[1][4]  # a token row 1 emits: it stops there, others run on or stop elsewhere
        ref_eos = hf_greedy(model, prompts, 14, eos)
        got = engine.generate(prompts, 14, eos_token_id=[eos])
    assert got == ref_eos and min(map(len, got)) < 14 and max(map(len, got)) == 14


def test_tensor_prompts_keep_the_hf_layout():
    model = tiny_model("llama", layers=3)
    ids = torch.randint(1, 96, (3, 9), generator=torch.Generator().manual_seed(5))
    with apply_plan(model, Plan.parse("SL8N")):
        engine = DecodeEngine(model, 3, 30)
        plain = engine.generate(ids, 10)
        eos = int(plain[0, 12])
        stopped = engine.generate(ids, 10, eos_token_id=eos, pad_token_id=0)
    assert plain.shape == (3, 19) and torch.equal(plain[:, :9], ids)
    first = plain[0, 9:].tolist().index(eos) + 9
    assert stopped[0, first] == eos and (stopped[0, first + 1:] == 0).all()
    assert torch.equal(stopped[0, :first], plain[0, :first])


def test_refilled_row_decodes_like_the_row_alone():
    """Prefilling one row of a running batch leaves the others alone and equals the prompt alone."""
    model = tiny_model("qwen3", layers=4)
    a, b, c = prompts_of((7, 11, 4), seed=2)
    with apply_plan(model, Plan.parse("SL8s2f8NS")):
        alone = DecodeEngine(model, 1, 40).generate([c], 8)[0]
        both = DecodeEngine(model, 2, 40).generate([a, b], 12)
        engine = DecodeEngine(model, 2, 40)
        engine.configure()
        engine.prefill([a, b])
        engine.decode(3)
        engine.prefill([c], rows=[1])  # row 1 starts a new sequence; row 0 is at token 4 of its answer
        engine.decode(7)
    assert engine.new_tokens(1, 8) == alone
    assert engine.new_tokens(0, 11) == both[0][:11]


@pytest.mark.parametrize("setting", [Sampling(0.7), Sampling(1.3, top_k=5), Sampling(0.9, top_p=0.8),
                                     Sampling(0.6, top_k=8, top_p=0.5)], ids=str)
def test_filters_equal_hf_warpers(setting):
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(1)) * 3
    ref = TemperatureLogitsWarper(setting.temperature)(None, logits.clone())
    if setting.top_k:
        ref = TopKLogitsWarper(setting.top_k)(None, ref)
    if setting.top_p < 1:
        ref = TopPLogitsWarper(setting.top_p)(None, ref)
    got = filter_logits(logits, setting)
    assert torch.equal(got.isinf(), ref.isinf()) and (got.isinf().sum(-1) < 50).all()
    assert torch.allclose(got[~got.isinf()], ref[~ref.isinf()])


@pytest.mark.parametrize("k", [None, 4, 3], ids=lambda k: f"k={k}")
@pytest.mark.parametrize("setting", [Sampling(0.8, top_k=4, top_p=0.9), Sampling(1.2, top_k=3)], ids=str)
def test_draws_follow_the_filtered_distribution(setting, k):
    """The draw over the filtered vocabulary: with the full sort (k >= V), among the top 4 (the nucleus
    fits) and among the top 3 (top-p's nucleus of 3 does not fit strictly inside: the fallback sorts)."""
    logits = torch.tensor([[2.0, 1.5, 1.0, 0.0, -1.0, -3.0]]).expand(40000, -1)
    freq = torch.bincount(pick(logits, setting, torch.Generator().manual_seed(0), k=k), minlength=6).double() / 40000
    probs = filter_logits(logits[:1], setting).softmax(-1)[0].double()
    assert freq[probs == 0].sum() == 0 and (probs > 0).sum() == 3  # top-p keeps 3 of the top 4; top-k 3
    assert (freq - probs).abs().max() < 0.01
    again = pick(logits, setting, torch.Generator().manual_seed(0), k=k)
    assert torch.equal(again, pick(logits, setting, torch.Generator().manual_seed(0), k=k))
    assert torch.equal(again, pick(logits, setting, torch.Generator().manual_seed(0)))  # every path: same tokens


def _batch_with_a_wide_row(rows=200, vocab=300):
    """Peaked random rows (their nuclei fit in the top 60) and, last, a flat row (nucleus wider than 60)."""
    logits = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(2)) * 4
    flat = torch.randn(1, vocab, generator=torch.Generator().manual_seed(3)) * 0.1
    return logits, torch.cat([logits, flat])


@pytest.mark.parametrize("setting", [Sampling(0.8, top_p=0.9), Sampling(1.0, top_k=100, top_p=0.7),
                                     Sampling(0.6, top_p=0.95)], ids=str)
def test_top_p_among_candidates_is_the_full_sort(setting):
    """Among the top k the nucleus, the filtered probabilities and the seeded tokens are exactly those of
    the full sort: a batch whose nuclei fit is computed among its candidates; the same rows followed by a
    row whose nucleus is wider than k make the whole batch fall back to the full sort, same numbers."""
    k = 60
    peaked, with_wide = _batch_with_a_wide_row()
    n = len(peaked)
    bound = sampling._mass_bound(setting.top_p)
    probs = sampling._scaled(peaked, setting).softmax(-1)
    log_u = torch.rand(probs.shape, generator=torch.Generator().manual_seed(5)).log()
    fast, fits = sampling._candidates(probs, log_u, bound, k)
    assert fits.all()  # this batch takes the fast path ...
    assert torch.equal(fast, sampling._full_sort(probs, log_u, bound))  # ... = the full sort
    wide = sampling._scaled(with_wide, setting).softmax(-1)
    assert sampling._candidates(wide, torch.rand(wide.shape), bound, k)[1].tolist() == [True] * n + [False]

    probs = nucleus_probs(peaked, setting, k=k)
    assert torch.equal(probs, nucleus_probs(with_wide, setting, k=k)[:n])  # candidates = full sort, bit for bit
    assert torch.equal(probs > 0, filter_logits(peaked, setting).isfinite())  # = the full-vocabulary filter
    assert (probs > 0).sum(-1).max() < k < (nucleus_probs(with_wide, setting, k=k)[n] > 0).sum()
    ref = TemperatureLogitsWarper(setting.temperature)(None, with_wide.clone())  # and HF's warpers agree
    if setting.top_k:
        ref = TopKLogitsWarper(setting.top_k)(None, ref)
    ref = TopPLogitsWarper(setting.top_p)(None, ref)
    assert torch.equal(nucleus_probs(with_wide, setting, k=k) > 0, ref.isfinite())

    for seed in range(3):  # the rows before the wide one draw the same noise in both batches
        alone = pick(peaked, setting, torch.Generator().manual_seed(seed), k=k)
        assert torch.equal(alone, pick(with_wide, setting, torch.Generator().manual_seed(seed), k=k)[:n])
        assert torch.equal(alone, pick(peaked, setting, torch.Generator().manual_seed(seed), k=k * 2))
        assert probs.gather(1, alone[:, None]).gt(0).all()


def test_top_p_keeps_ties_with_its_last_token():
    """Tokens exactly as likely as the nucleus's last one all stay, whatever order a sort gives ties."""
    logits = torch.tensor([[3.0, 1.0, 1.0, 1.0, 1.0, -2.0]])
    s = Sampling(1.0, top_p=0.75)  # p = .72, .07 x 4, .004: HF would keep the first tie only
    kept = nucleus_probs(logits, s, k=2) > 0
    assert kept.tolist() == [[True] * 5 + [False]] and torch.equal(kept, nucleus_probs(logits, s) > 0)
    assert torch.equal(kept, filter_logits(logits, s).isfinite())


_KERNEL_CHECK = """
import torch
from lbsearch import sampling
from lbsearch.sampling import Sampling

g = torch.Generator().manual_seed(2)
peaked = torch.randn(6, 5000, generator=g) * 4
flat = torch.randn(1, 5000, generator=g) * 0.1
logits = torch.cat([peaked, flat, torch.zeros(1, 5000), peaked[:1] * 0.05])  # 3 rows whose nucleus is wide
kernel = sampling._wide_rows_kernel()
assert type(kernel).__name__ == "InterpretedFunction", type(kernel)
for setting in (Sampling(0.8, top_p=0.9), Sampling(1.0, top_k=100, top_p=0.7), Sampling(3.0, top_p=0.999)):
    probs = sampling._scaled(logits, setting).softmax(-1)
    bound = sampling._mass_bound(setting.top_p)
    for seed in range(2):
        log_u = torch.rand(probs.shape, generator=torch.Generator().manual_seed(seed)).log()
        tokens, fits = sampling._candidates(probs, log_u, bound, 60)
        assert not fits[6:].any() and fits[:6].all() == (setting.temperature < 3), fits  # T=3: every row wide
        fast = tokens.clone()
        sampling._wide_rows(probs, log_u, fits, tokens, bound)
        assert torch.equal(tokens, sampling._full_sort(probs, log_u, bound)), (tokens, setting, seed)
        assert torch.equal(tokens[fits], fast[fits])
print("ok")
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter's check; on CUDA the GPU tests run it compiled")
def test_wide_row_kernel_is_the_full_sort():
    """The CUDA fallback kernel, in Triton's interpreter (a fresh process: Triton reads TRITON_INTERPRET when
    imported): rows whose nucleus is wider than the candidates get the full sort's token, bit for bit."""
    import os
    import subprocess
    import sys

    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", _KERNEL_CHECK], env=env, capture_output=True, text=True, timeout=600,
                          check=False)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_top_p_fallback_inside_a_cuda_graph():
    """A captured pick: replays whose nuclei fit among the candidates and replays where one row's does not
    (the wide-row kernel) give the eager tokens and the full sort's."""
    k = 60
    peaked, with_wide = (x.cuda() for x in _batch_with_a_wide_row())
    peaked = torch.cat([peaked, peaked[:1]])  # the same shape as with_wide
    setting = Sampling(0.8, top_p=0.9)
    gen = torch.Generator(device="cuda")
    static = peaked.clone()
    pick(static, setting, gen, k=k)  # eager warm-up: every kernel of both paths runs once
    graph = torch.cuda.CUDAGraph()
    graph.register_generator_state(gen)
    with torch.cuda.graph(graph):
        out = pick(static, setting, gen, k=k)
    for logits in (peaked, with_wide, peaked, with_wide):
        static.copy_(logits)
        gen.manual_seed(11)
        graph.replay()
        eager = pick(logits, setting, torch.Generator(device="cuda").manual_seed(11), k=k)
        assert torch.equal(out, eager)
        full = pick(logits, setting, torch.Generator(device="cuda").manual_seed(11), k=logits.shape[-1])
        assert torch.equal(out, full)  # the compiled kernel (wide rows) and the candidates = the full sort


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_engine_graph_with_top_p_candidates_equals_eager(monkeypatch):
    """The engine's captured step with few top-p candidates (fallback often, fast path often) = its eager step."""
    monkeypatch.setattr(sampling, "CANDIDATES", 8)  # of 96: at this temperature about a third of the steps fit
    model = tiny_model("llama", layers=3).cuda()
    model.generation_config.eos_token_id = None
    prompts = prompts_of((9, 30, 3, 17), seed=4)
    kw = {"temperature": 0.05, "top_p": 0.8, "seed": 3}
    with apply_plan(model, Plan.parse("SL8N")):
        graph, eager = DecodeEngine(model, 4, 64, graph=True), DecodeEngine(model, 4, 64, graph=False)
        first = graph.generate(prompts, 30, **kw)
        assert eager.generate(prompts, 30, **kw) == first
        assert graph.generate(prompts, 30, **kw) == first


def test_sampled_generation_is_seeded_and_degenerates_to_greedy():
    model = tiny_model("qwen2", layers=4)
    prompts = prompts_of((6, 13, 9), seed=3)
    with apply_plan(model, Plan.parse("SL8NS")):
        engine = DecodeEngine(model, 3, 40)
        greedy = engine.generate(prompts, 12)
        kw = dict(temperature=1.5, top_p=0.95)
        first = engine.generate(prompts, 12, seed=7, **kw)
        assert engine.generate(prompts, 12, seed=7, **kw) == first
        assert engine.generate(prompts, 12, seed=8, **kw) != first
        assert first != greedy
        assert engine.generate(prompts, 12, temperature=2.0, top_k=1, seed=9) == greedy  # one token left
        assert engine.generate(prompts, 12, temperature=0.0, seed=9) == greedy
        assert all(len(r) == 12 for r in first)


@pytest.mark.parametrize("kwargs,message", [
    (dict(temperature=-1.0), "temperature"), (dict(top_p=0.0), "top_p"), (dict(top_k=-2), "top_k"),
    (dict(eos_token_id=list(range(9))), "EOS"),
])
def test_bad_settings(kwargs, message):
    model = tiny_model("llama", layers=2)
    engine = DecodeEngine(model, 2, 20)
    with pytest.raises(ValueError, match=message):
        engine.generate([[1, 2]], 4, **kwargs)


def test_bad_prompts():
    model = tiny_model("llama", layers=2)
    engine = DecodeEngine(model, 2, 20)
    with pytest.raises(ValueError, match="batch of 2"):
        engine.generate([[1], [2], [3]], 4)
    with pytest.raises(ValueError, match="max_len"):
        engine.generate([[1] * 20], 4)
    with pytest.raises(ValueError, match="exceed max_len"):
        engine.generate([[1] * 15, [2]], 8)
    with pytest.raises(ValueError, match="rows"):
        engine.prefill([[1]], rows=[5])
