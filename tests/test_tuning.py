"""Full tuning (``HealConfig.tune="full"``): the projections' weights train in copies, the teacher
stays exactly reachable (teacher_mode, remove_tuning), checkpoints resume bit-exactly and healed
folders reload to the same logits."""
import pytest
import torch
from conftest import tiny_model

from lbsearch import LBSearchError, LayerSpec, Plan, apply_plan
from lbsearch.distill import HealConfig, add_tuning, heal, remove_tuning, teacher_mode, trainable_parameters
from lbsearch.distill.healing import HealStep
from lbsearch.evaluate import evaluate, teacher_logits
from lbsearch.export import load_healed, save_healed

SPEC = LayerSpec(kind="lswa", window=4, sinks=1, feature_dim=8)
PLAN = Plan((LayerSpec(kind="softmax"), SPEC, LayerSpec(kind="none"), SPEC))
FULL = dict(tune="full", full_lr=1e-3, lr=1e-2, checkpoint_tokens=10**9)


def blocks(n=12, t=32, seed=0):
    return torch.randint(0, 96, (n, t), generator=torch.Generator().manual_seed(seed))


def student(cfg: HealConfig):
    model = tiny_model("llama")
    frozen = {k: v.clone() for k, v in model.state_dict().items()}
    handle = apply_plan(model, PLAN)
    add_tuning(model, cfg)
    return model, handle, frozen


def test_trains_the_targeted_projections_of_the_student_only():
    model, _, _ = student(HealConfig(**FULL))
    names = set(trainable_parameters(model))
    assert not any("lora_" in n for n in names)
    assert "model.layers.0.self_attn.q_proj.weight" in names  # a kept softmax layer
    assert any(n.startswith("model.layers.1.") and n.endswith("q_proj.weight") for n in names)  # LSWA uses them
    assert not any(n.startswith("model.layers.2.self_attn") for n in names)  # removed attention: not trained
    assert "model.layers.2.mlp.down_proj.weight" in names
    assert not any("embed" in n or "norm" in n or "lm_head" in n for n in names)
    attn_only = student(HealConfig(**FULL, lora_mlp=False))[0]
    assert not any(".mlp." in n for n in trainable_parameters(attn_only))


def test_heals_and_gives_the_teacher_back_bit_identical(tmp_path):
    model = tiny_model("llama")
    held = blocks(4, seed=3)
    ref = model(held).logits.detach().clone()
    frozen = {k: v.clone() for k, v in model.state_dict().items()}
    handle = apply_plan(model, PLAN)
    cfg = HealConfig(tokens=32 * 4 * 30, **FULL)
    add_tuning(model, cfg)
    with torch.no_grad(), teacher_mode(model, handle):
        assert torch.equal(model(held).logits, ref)
        teacher = teacher_logits(model, held)
    before = evaluate(model, held, teacher)
    heal(model, handle, torch.cat([held, blocks(4)]), cfg, tmp_path, progress=False)
    assert evaluate(model, held, teacher).kl < 0.8 * before.kl
    q = model.model.layers[0].self_attn.q_proj.weight
    assert not torch.equal(q, frozen["model.layers.0.self_attn.q_proj.weight"])  # trained in place...
    with torch.no_grad(), teacher_mode(model, handle):  # ...and the teacher is still exactly there
        assert torch.equal(model(held).logits, ref)
    assert remove_tuning(model) > 0
    handle.restore()
    assert all(torch.equal(v, frozen[k]) for k, v in model.state_dict().items())
    assert torch.equal(model(held).logits, ref)


@pytest.mark.parametrize("teacher", ["online", "cached"])
def test_resume_matches_uninterrupted(tmp_path, teacher):
    """Resumed runs load trained weights first; their teacher targets must still come from the originals."""
    cfg = HealConfig(tokens=32 * 4 * 8, teacher=teacher, **{**FULL, "checkpoint_tokens": 32 * 4 * 3})

    def run(out, **kw):
        model, handle, _ = student(cfg)
        heal(model, handle, blocks(16), cfg, tmp_path / out, progress=False, **kw)
        return {k: p.detach().clone() for k, p in trainable_parameters(model).items()}

    whole = run("whole")
    run("part", stop_after_steps=5)
    resumed = run("part")
    assert whole.keys() == resumed.keys()
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)


def test_healed_folder_reloads_to_the_same_logits(tmp_path):
    cfg = HealConfig(tokens=32 * 4 * 4, **FULL)
    model, handle, _ = student(cfg)
    heal(model, handle, blocks(16), cfg, tmp_path / "out", progress=False)
    save_healed(model, PLAN, cfg, tmp_path / "healed")
    x = blocks(2, 20, seed=5)
    fresh = tiny_model("llama")
    load_healed(fresh, tmp_path / "healed")
    assert torch.equal(fresh(x).logits, model(x).logits)
    assert not torch.equal(fresh(x).logits, tiny_model("llama")(x).logits)


def test_optimizer_gives_each_kind_its_learning_rate():
    cfg = HealConfig(**FULL)
    model, handle, _ = student(cfg)
    groups = HealStep(model, handle, cfg, trainable_parameters(model)).opt.param_groups
    assert [g["lr"] for g in groups] == [cfg.lr, cfg.full_lr]
    lora = HealConfig(lora_rank=2)
    model, handle, _ = student(lora)
    assert [g["lr"] for g in HealStep(model, handle, lora, trainable_parameters(model)).opt.param_groups] == \
        [lora.lr, lora.lora_lr]


def test_config_rejects_unknown_tuning_and_tuning_twice():
    with pytest.raises(LBSearchError, match="tune='adapters'; allowed: lora, full"):
        HealConfig(tune="adapters")
    model, _, _ = student(HealConfig(**FULL))
    with pytest.raises(RuntimeError, match="already being tuned"):
        add_tuning(model, HealConfig(**FULL))
