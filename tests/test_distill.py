import json

import pytest
import torch
from conftest import tiny_model

from lbsearch import LBSearchError, LayerSpec, Plan, apply_plan
from lbsearch.distill import (BlockLibrary, HealConfig, TransferConfig, add_lora, collect_layer_data, heal,
                              trainable_pairs, transfer_layer)
from lbsearch.export import load_healed, save_healed
from lbsearch.distill import healing as heal_module
from lbsearch.evaluate import evaluate, teacher_logits
from lbsearch.models import decoder_layers

SPEC = LayerSpec(kind="lswa", window=4, sinks=1, feature_dim=8)
PLAN = Plan((LayerSpec(kind="softmax"), SPEC, LayerSpec(kind="none"), SPEC))


def blocks(n=12, t=32, seed=0):
    return torch.randint(0, 96, (n, t), generator=torch.Generator().manual_seed(seed))


def test_transfer_lowers_held_out_error():
    model = tiny_model("llama")
    data = collect_layer_data(model, blocks(16, 64), [1])[1]
    _, metrics = transfer_layer(decoder_layers(model)[1].self_attn, SPEC, data,
                                TransferConfig(steps=120, lr=1e-2, batch_size=4))
    assert metrics["rel_error_after"] < 0.9 * metrics["rel_error_before"]


def test_library_assembles_the_trained_block_and_detects_corruption(tmp_path):
    model = tiny_model("llama")
    lib = BlockLibrary(tmp_path, "tiny", "d0", TransferConfig(steps=20))
    lib.ensure(model, trainable_pairs(PLAN), blocks(), progress=False)
    x = blocks(2, 24, seed=9)
    with apply_plan(model, PLAN, lib):
        mod = decoder_layers(model)[1].self_attn
        stored = lib.get(1, SPEC)
        assert torch.equal(mod.feature_map.weight, stored["feature_map.weight"])
        assert torch.equal(mod.gate_logit, stored["gate_logit"])
        first = model(x).logits
    with apply_plan(model, PLAN, lib):
        assert torch.equal(model(x).logits, first)
    with apply_plan(model, PLAN):
        assert not torch.equal(model(x).logits, first)  # untrained blocks differ
    # corrupt one block: detected, refused, and retrained by ensure
    path = tmp_path / "blocks" / f"{lib.key(1, SPEC)}.safetensors"
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0xFF
    path.write_bytes(bytes(raw))
    assert lib.get(1, SPEC) is None and lib.missing(trainable_pairs(PLAN)) == [(1, SPEC)]
    with pytest.raises(LBSearchError, match="no valid block for layer 1"):
        apply_plan(model, PLAN, lib)
    assert all(type(layer.self_attn).__name__ == "LlamaAttention" for layer in decoder_layers(model))
    retrained = lib.ensure(model, trainable_pairs(PLAN), blocks(), progress=False)
    assert [r["layer"] for r in retrained] == [1]
    assert lib.get(1, SPEC) is not None
    # another data key or budget is another entry
    assert BlockLibrary(tmp_path, "tiny", "d1", TransferConfig(steps=20)).get(1, SPEC) is None
    assert BlockLibrary(tmp_path, "tiny", "d0", TransferConfig(steps=21)).get(1, SPEC) is None


def prepared(tmp_path, lora_rank=4):
    model = tiny_model("llama")
    frozen = {k: v.clone() for k, v in model.state_dict().items()}
    handle = apply_plan(model, PLAN)
    add_lora(model, HealConfig(lora_rank=lora_rank))
    return model, handle, frozen


def test_healing_lowers_kl_and_keeps_frozen_weights(tmp_path):
    model, handle, frozen = prepared(tmp_path)
    train = blocks(8)
    held = train[:4]  # random tokens do not generalise; the check is that the distillation objective falls
    with handle.suspended():
        teacher = teacher_logits(model, held)
    before = evaluate(model, held, teacher)
    cfg = HealConfig(tokens=32 * 4 * 30, lr=1e-2, lora_lr=5e-3, lora_rank=4, checkpoint_tokens=10**9)
    heal(model, handle, train, cfg, tmp_path, progress=False)
    after = evaluate(model, held, teacher)
    assert after.kl < 0.8 * before.kl
    handle.restore()
    state = {k: v for k, v in model.state_dict().items() if "lora_" not in k}
    for name, value in frozen.items():
        key = name if name in state else name.replace(".weight", ".base_layer.weight")
        assert torch.equal(state[key], value), name


def final_params(model):
    return {k: v.detach().clone() for k, v in model.named_parameters() if "lora_" in k or "gate_logit" in k
            or "feature_map" in k}


def test_interrupt_and_resume_matches_uninterrupted(tmp_path):
    cfg = HealConfig(tokens=32 * 4 * 8, lr=5e-3, lora_rank=4, checkpoint_tokens=32 * 4 * 3)
    model, handle, _ = prepared(tmp_path)
    heal(model, handle, blocks(16), cfg, tmp_path / "full", progress=False)
    full = final_params(model)

    model, handle, _ = prepared(tmp_path)
    state = heal(model, handle, blocks(16), cfg, tmp_path / "part", progress=False, stop_after_steps=5)
    assert state.step == 5
    model, handle, _ = prepared(tmp_path)  # a new process: fresh model, resume from step 3's checkpoint
    state = heal(model, handle, blocks(16), cfg, tmp_path / "part", progress=False)
    assert state.step == 8
    resumed = final_params(model)
    assert full.keys() == resumed.keys()
    for name in full:
        assert torch.equal(full[name], resumed[name]), name


def test_divergence_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    model, handle, _ = prepared(tmp_path)
    calls = {"n": 0}
    real = heal_module.kd_loss

    def flaky(s, t, temp):
        calls["n"] += 1
        loss = real(s, t, temp)
        return loss * float("nan") if calls["n"] == 4 else loss

    monkeypatch.setattr(heal_module, "kd_loss", flaky)
    cfg = HealConfig(tokens=32 * 4 * 10, lora_rank=4, checkpoint_tokens=32 * 4)
    with pytest.raises(LBSearchError, match="healing stopped at step 3: loss nan.*ckpt-00000003"):
        heal(model, handle, blocks(16), cfg, tmp_path, progress=False)
    latest = json.loads((tmp_path / "checkpoints" / "latest.json").read_text())
    assert latest["stem"] == "ckpt-00000003"


def test_healed_model_saves_and_reloads_to_the_same_logits(tmp_path):
    model = tiny_model("llama")
    lib = BlockLibrary(tmp_path / "lib", "tiny", "d", TransferConfig(steps=10))
    lib.ensure(model, trainable_pairs(PLAN), blocks(6), progress=False)
    cfg = HealConfig(tokens=32 * 4 * 4, lora_rank=4)
    handle = apply_plan(model, PLAN, lib)
    add_lora(model, cfg)
    state = heal(model, handle, blocks(16), cfg, tmp_path / "out", progress=False)
    assert state.tokens == 32 * 4 * 4
    save_healed(model, PLAN, cfg, tmp_path / "out" / "healed", {"tokens": state.tokens})
    x = blocks(2, 20, seed=5)
    healed_logits = model(x).logits
    fresh = tiny_model("llama")
    load_healed(fresh, tmp_path / "out" / "healed")
    assert torch.equal(fresh(x).logits, healed_logits)
    with pytest.raises(LBSearchError, match="not a healed model folder"):
        load_healed(tiny_model("llama"), tmp_path)


def test_sensitivity_with_library_column(tmp_path):
    from lbsearch.sensitivity import sensitivity

    model = tiny_model("llama", layers=3)
    lib = BlockLibrary(tmp_path, "tiny", "d", TransferConfig(steps=15))
    lib.ensure(model, [(i, SPEC) for i in range(3)], blocks(), progress=False)
    held = blocks(2, 32, seed=6)
    teacher = teacher_logits(model, held)
    table = sensitivity(model, held, teacher, {"lswa": SPEC, "lswa_trained": SPEC},
                        libraries={"lswa_trained": lib}, progress=False)
    with apply_plan(model, Plan.parse("SSS").with_layer(1, SPEC), lib):
        direct = evaluate(model, held, teacher)
    assert abs(table.rows["lswa_trained"][1].kl - direct.kl) < 1e-6
    assert table.column("lswa") != table.column("lswa_trained")


def test_cached_teacher_with_whole_vocabulary_gives_the_online_loss(tmp_path):
    from lbsearch.distill.healing import HealStep, trainable_parameters

    model, handle, _ = prepared(tmp_path)
    ids = blocks(2)
    losses = {}
    for source in ("online", "cached"):
        cfg = HealConfig(teacher=source, top_k=10**6, lora_rank=4)
        step = HealStep(model, handle, cfg, trainable_parameters(model))
        teacher = step.teacher_targets(ids) if source == "cached" else None
        losses[source] = step.loss_and_backward(ids, teacher)
    assert losses["online"] > 1e-3
    assert abs(losses["cached"] - losses["online"]) < 1e-4 * losses["online"]


def test_cached_teacher_top_k_is_a_lower_bound_that_tightens_with_k(tmp_path):
    from lbsearch.distill.healing import HealStep, trainable_parameters

    model, handle, _ = prepared(tmp_path)
    ids = blocks(2)
    online = HealStep(model, handle, HealConfig(teacher="online", lora_rank=4), trainable_parameters(model))
    losses = [online.loss_and_backward(ids)]
    for k in (64, 16):  # merging tokens into the bucket can only lower the KL (data processing)
        cfg = HealConfig(teacher="cached", top_k=k, lora_rank=4)
        step = HealStep(model, handle, cfg, trainable_parameters(model))
        losses.append(step.loss_and_backward(ids, step.teacher_targets(ids)))
    assert losses[0] > losses[1] > losses[2] > 0


def test_heal_config_rejects_bad_teacher_options():
    with pytest.raises(LBSearchError, match="teacher='disk'; allowed: auto, cached, online"):
        HealConfig(teacher="disk")
    with pytest.raises(LBSearchError, match="attn_mse_weight needs"):
        HealConfig(attn_mse_weight=1.0, teacher="cached")
    assert HealConfig(attn_mse_weight=1.0).attn_mse_weight == 1.0


def test_blocks_used_are_exactly_the_blocks_a_run_reads():
    from lbsearch.distill.healing import batch_indices, blocks_used

    for n_blocks, steps in ((40, 3), (10, 7)):
        cfg = HealConfig(batch_size=4, grad_accum=2, seed=3)
        read = {int(i) for s in range(steps) for m in range(2) for i in batch_indices(s, m, n_blocks, 4, 2, 3)}
        assert blocks_used(steps, n_blocks, cfg).tolist() == sorted(read)


def test_quality_curve_during_healing(tmp_path):
    model, handle, _ = prepared(tmp_path)
    calls = []
    cfg = HealConfig(tokens=32 * 4 * 6, lora_rank=4, eval_tokens=32 * 4 * 2, checkpoint_tokens=10**9)
    state = heal(model, handle, blocks(16), cfg, tmp_path, progress=False,
                 evaluator=lambda: calls.append(1) or {"kl": float(len(calls))})
    assert [e["tokens"] for e in state.evals] == [256, 512, 768]
    assert [e["quality"]["kl"] for e in state.evals] == [1.0, 2.0, 3.0]


def test_auto_teacher_caches_only_when_the_budget_repeats_blocks():
    assert HealConfig(tokens=1000).teacher_source(2000) == "online"
    assert HealConfig(tokens=3000).teacher_source(2000) == "cached"
    assert HealConfig(tokens=3000, attn_mse_weight=1.0).teacher_source(2000) == "online"
    assert HealConfig(tokens=3000, teacher="online").teacher_source(2000) == "online"
