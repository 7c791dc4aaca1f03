import torch
from conftest import tiny_model

from lbsearch import Plan, apply_plan
from lbsearch.evaluate import evaluate, kl_per_token, teacher_logits, topk_of


def blocks(n=3, t=24, vocab=96):
    return torch.randint(0, vocab, (n, t), generator=torch.Generator().manual_seed(5))


def test_topk_kl_with_full_vocab_is_exact_kl():
    p_logits, q_logits = torch.randn(2, 5, 50), torch.randn(2, 5, 50)
    exact = torch.nn.functional.kl_div(q_logits.log_softmax(-1), p_logits.log_softmax(-1), log_target=True,
                                       reduction="none").sum(-1)
    assert torch.allclose(kl_per_token(q_logits, topk_of(p_logits, k=50)), exact, atol=1e-5)
    # with a small k the rest bucket still gives a non-negative bound close to the exact value
    approx = kl_per_token(q_logits, topk_of(p_logits, k=10))
    assert (approx >= -1e-6).all() and (approx <= exact + 1e-5).all()


def test_teacher_against_itself_is_perfect():
    model = tiny_model("llama")
    x = blocks()
    q = evaluate(model, x, teacher_logits(model, x), batch_size=2)
    assert abs(q.kl) < 1e-6 and q.agreement == 1.0
    logits = model(x).logits
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten())
    assert abs(q.perplexity - ce.exp().item()) < 1e-3 * q.perplexity
    assert q.tokens == x.numel()


def test_changed_model_has_positive_kl():
    model = tiny_model("llama")
    x = blocks()
    teacher = teacher_logits(model, x)
    with apply_plan(model, Plan.parse("NNSS")):
        q = evaluate(model, x, teacher)
    assert q.kl > 1e-4 and q.agreement < 1.0


def test_teacher_logits_are_cached(cache_home):
    model = tiny_model("llama")
    x = blocks()
    first = teacher_logits(model, x, k=16, model_key="tiny")
    files = list(cache_home.glob("teacher_logits/*.safetensors"))
    assert len(files) == 1
    model.forward = None  # a cached call must not run the model
    second = teacher_logits(model, x, k=16, model_key="tiny")
    assert torch.equal(first.logprobs, second.logprobs) and torch.equal(first.ids, second.ids)
