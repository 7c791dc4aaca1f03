"""Workspace: one process scores plan after plan; the student gives the teacher back exactly."""
import gc

import pytest
import torch
from conftest import write_tiny_space

from lbsearch import LBSearchError, Plan
from lbsearch.models import load_teacher
from lbsearch.workspace import Workspace


@pytest.fixture(scope="module")
def ws(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("ws")
    space = write_tiny_space(root, tokenizer)
    return Workspace.open(space, device="cpu", cache=root / "cache", progress=False)


def live_tensor_bytes() -> int:
    gc.collect()
    seen, total = set(), 0
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor):
            try:  # fake tensors (left by torch.compile in this process) have no data
                storage = obj.untyped_storage()
                ptr = storage.data_ptr()
            except RuntimeError:
                continue
            if ptr not in seen:
                seen.add(ptr)
                total += storage.nbytes()
    return total


def test_workspace_holds_the_splits_logits_and_library(ws):
    assert set(ws.blocks) == {"train", "calibration", "heldout"}
    assert ws.heldout.blocks.shape[1] == 32 and ws.heldout.blocks.numel() <= 128
    assert ws.heldout.teacher.logprobs.shape[:2] == ws.heldout.blocks.shape
    assert ws.defaults.transfer_steps == 50 and ws.library.config.steps == 3  # the space overrides the device
    cfg = ws.heal_config(100)
    assert cfg.lora_rank == 2 and (cfg.batch_size, cfg.grad_accum) == (1, 4)  # CPU: 4 blocks a step, 1 at a time
    assert ws.heal_config(100, batch_size=2).batch_size == 2
    assert not hasattr(ws.model, "lbsearch_key") and not hasattr(ws.model, "lbsearch_handle")


def test_data_key_names_the_corpus_and_the_evaluation_text(ws, monkeypatch):
    """What Ray workers compare: the same workspace gives the same key; another corpus, another key."""
    import dataclasses

    key = ws.data_key()
    assert key == ws.data_key() and len(key) == 12
    monkeypatch.setattr(ws, "corpus", dataclasses.replace(ws.corpus, key="another-corpus"))
    assert ws.data_key() != key


def test_five_students_in_a_row_leave_the_teacher_bit_identical(ws, tmp_path):
    ids = ws.heldout.blocks[:2]
    ref = ws.model(ids).logits.clone()
    fresh = load_teacher(ws.space.model)
    assert torch.equal(fresh(ids).logits, ref)
    names = sorted(n for n, _ in ws.model.named_parameters())
    n_params = sum(p.numel() for p in ws.model.parameters())
    plans = ["SL8NL16", "NNSS", "L8L8L8L8", "SNL16N", "L16SSN"]
    sizes = []
    for i, text in enumerate(plans):
        heal = ws.heal_config(128, tune="full" if i == 3 else "lora") if i % 2 else None
        session = ws.student(Plan.parse(text), heal)
        with session as model:
            out = model(ids).logits
            assert not torch.equal(out, ref)
            if heal:
                assert session.heal_state.tokens == 128  # one step of 4 blocks of 32
                assert any("lora_" in n for n, _ in model.named_parameters()) == (heal.tune == "lora")
        assert torch.equal(ws.model(ids).logits, ref), text
        assert sorted(n for n, _ in ws.model.named_parameters()) == names
        assert sum(p.numel() for p in ws.model.parameters()) == n_params
        assert not any(p.requires_grad for p in ws.model.parameters())
        sizes.append(live_tensor_bytes())
    assert sizes[-1] <= sizes[1] + 2**20, sizes  # nothing accumulates after the first plans warmed up


def test_heal_seq_len_trains_on_longer_blocks(ws, monkeypatch):
    import lbsearch.workspace as workspace

    shapes, real = [], workspace.heal
    monkeypatch.setattr(workspace, "heal", lambda model, handle, blocks, *a, **kw:
                        shapes.append(tuple(blocks.shape)) or real(model, handle, blocks, *a, **kw))
    train = ws.healing_blocks.numel()
    for seq_len, want in ((0, 32), (64, 64)):
        session = ws.student(Plan.parse("SL8NS"), ws.heal_config(128, seq_len=seq_len, batch_size=1, grad_accum=2))
        with session:
            assert session.heal_state.tokens == 128
        assert shapes[-1] == (train // want, want)
    with pytest.raises(LBSearchError, match="not enough text for one block"):
        ws.student(Plan.parse("SL8NS"), ws.heal_config(128, seq_len=10 * train)).__enter__()
    assert not ws._busy


def test_longer_heal_blocks_come_fewer_per_batch_unless_the_recipe_sets_the_batch(ws, monkeypatch):
    """A step trains on as many tokens at any block length: the device's batch is scaled by
    data.seq_len / heal.seq_len (never below 1 block); an explicit batch_size wins."""
    from dataclasses import replace

    seq = ws.space.data.seq_len
    monkeypatch.setattr(ws, "defaults", replace(ws.defaults, heal_batch_size=8))
    assert ws.heal_config(64).batch_size == 8
    assert ws.heal_config(64, seq_len=seq).batch_size == 8
    assert ws.heal_config(64, seq_len=4 * seq).batch_size == 2
    assert ws.heal_config(64, seq_len=100 * seq).batch_size == 1
    assert ws.heal_config(64, seq_len=4 * seq, batch_size=5).batch_size == 5
    monkeypatch.setattr(ws, "space", ws.space.model_copy(update={"heal": {"seq_len": 2 * seq}}))
    assert (ws.heal_config(64).seq_len, ws.heal_config(64).batch_size) == (2 * seq, 4)


def test_long_context_perplexity_per_span_of_the_model_as_it_is(ws, monkeypatch):
    from lbsearch.evaluate import perplexity_by_position

    with pytest.raises(LBSearchError, match="needs held-out real text: set data.eval_sources"):
        ws.long_context((16, 48), 96)
    data = ws.space.data.model_copy(update={"eval_sources": ["python-docs"]})
    monkeypatch.setattr(ws, "space", ws.space.model_copy(update={"data": data}))
    window = ws.model.config.max_position_embeddings
    with pytest.raises(LBSearchError, match=rf"{window + 1} tokens is past the model's context window \({window}\)"):
        ws.long_context((16, window + 1), 96)
    teacher = ws.long_context((48, 16), 96)  # any order: spans from 0 up
    assert list(teacher) == ["0-16", "16-48"] and all(v > 1 for v in teacher.values())
    blocks = ws._long[(48, 96)]
    assert blocks.shape == (2, 48)
    assert list(teacher.values()) == perplexity_by_position(ws.model, blocks, (0, 16, 48))
    with ws.student(Plan.parse("SL8NS")):
        student = ws.long_context((16, 48), 96)
    assert student != teacher and ws.long_context((16, 48), 96) == teacher  # the teacher is back


def test_student_restores_when_the_body_raises(ws):
    ids = ws.heldout.blocks[:1]
    ref = ws.model(ids).logits.clone()
    with pytest.raises(ZeroDivisionError):
        with ws.student(Plan.parse("NL8NS"), ws.heal_config(64)):
            1 / 0
    assert torch.equal(ws.model(ids).logits, ref)
    with ws.student(Plan.parse("SSSS")):  # usable again
        with pytest.raises(RuntimeError, match="already a student"):
            ws.student(Plan.parse("NNNN")).__enter__()
    assert torch.equal(ws.model(ids).logits, ref)


def test_assembled_evaluation_reuses_teacher_states_and_equals_a_full_forward(ws):
    for text in ("SSNL8", "L16NSS", "SSSS", "NNNN"):
        plan = Plan.parse(text)
        with ws.student(plan):
            fast, full = ws.evaluate_assembled(plan), ws.evaluate()
        for name in full:
            assert fast[name].kl == pytest.approx(full[name].kl, rel=1e-5, abs=1e-7)
            assert fast[name].perplexity == pytest.approx(full[name].perplexity, rel=1e-5)


def test_bad_device_and_plan_are_one_line_errors(ws, tmp_path):
    if not torch.cuda.is_available():
        with pytest.raises(LBSearchError, match="no CUDA GPU"):
            Workspace.open(ws.space, device="cuda")
    with pytest.raises(LBSearchError, match="the model has 4"):
        ws.parse_plan("SSN")
