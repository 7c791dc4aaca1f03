"""End-to-end on the real default teacher, SmolLM2-135M (loaded from the package's GGUF, cached)."""
import time

import pytest
import torch

from lbsearch import LayerSpec, Plan, apply_plan, load_teacher
from lbsearch.evaluate import evaluate, teacher_logits
from lbsearch.sensitivity import sensitivity

pytestmark = pytest.mark.slow

TEXT = (
    "The history of computing is a story of abstraction. Early machines were programmed by rewiring "
    "panels of cables; later, stored programs let the same hardware run many tasks. Assemblers gave "
    "names to instructions, compilers translated whole languages, and operating systems shared one "
    "machine between many users. Each layer hid the details of the one below it, so that people could "
    "think about problems instead of circuits. Networks then joined machines together, and the web "
    "turned documents into a shared library that anyone could read. Today, large language models are "
    "trained on much of that library, and serving them cheaply has become an engineering problem of "
    "its own: memory bandwidth, cache sizes and attention cost decide how many people one server can help."
)


def test_loads_from_cache_quickly(smollm):
    start = time.perf_counter()
    model = load_teacher("smollm2-135m")
    assert time.perf_counter() - start < 3.0
    assert model.config.num_hidden_layers == 30 and model.config.num_key_value_heads == 3


def test_mixed_plan_generates_and_sensitivity_runs(smollm):
    model, tok = smollm
    ids = torch.tensor(tok(TEXT)["input_ids"][:128]).view(2, 64)
    plan = Plan.parse("SS" + "L32N" * 14)
    chat = tok.apply_chat_template([{"role": "user", "content": "Name three colours."}], tokenize=False,
                                   add_generation_prompt=True)
    prompt = tok(chat, return_tensors="pt")["input_ids"]
    teacher = teacher_logits(model, ids)
    with apply_plan(model, plan):
        out = model.generate(prompt, max_new_tokens=12, do_sample=False)
        seq = prompt
        for _ in range(12):  # greedy without a cache gives the same tokens
            seq = torch.cat([seq, model(seq).logits[:, -1:].argmax(-1)], 1)
        mixed = evaluate(model, ids, teacher)
    assert out.shape[1] > prompt.shape[1]
    assert torch.equal(out, seq[:, : out.shape[1]])
    assert tok.decode(out[0, prompt.shape[1]:]).strip()
    table = sensitivity(model, ids[:1], teacher.batch(slice(0, 1)),
                        {"lswa": LayerSpec.lswa(window=32), "none": LayerSpec(kind="none")}, progress=False)
    none_kl = table.column("none")
    assert max(none_kl[:2]) == max(none_kl)  # layers 0-1 are the most sensitive to removal
    assert sum(table.column("lswa")) < sum(none_kl)  # linearising costs less than removing
    assert mixed.kl > max(none_kl[2:])  # 14 layers removed hurt more than any single one


def test_a_local_gguf_file_loads_like_the_alias(smollm, tmp_path, monkeypatch):
    from lbsearch.models import REGISTRY

    monkeypatch.setenv("LBSEARCH_CACHE", str(tmp_path))
    model = load_teacher(str(REGISTRY["smollm2-135m"].locate()))
    assert list(tmp_path.glob("models/SmolLM2-135M-Instruct.Q4_1-*/model.safetensors"))
    ids = torch.tensor([[1, 504, 3458, 282, 4099, 314, 253, 1345]])
    assert torch.equal(model(ids).logits, smollm[0](ids).logits)
