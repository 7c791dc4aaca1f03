import pytest
import torch
from conftest import tiny_model

from lbsearch import LayerSpec
from lbsearch.evaluate import teacher_logits
from lbsearch.sensitivity import SensitivityTable, sensitivity, sensitivity_naive

SPECS = {"lswa": LayerSpec(kind="lswa", window=4, sinks=1, feature_dim=8), "none": LayerSpec(kind="none")}


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_reuse_equals_naive(family):
    model = tiny_model(family, layers=5)
    x = torch.randint(0, 96, (3, 20), generator=torch.Generator().manual_seed(6))
    teacher = teacher_logits(model, x)
    fast = sensitivity(model, x, teacher, SPECS, batch_size=2, progress=False)
    slow = sensitivity_naive(model, x, teacher, SPECS, batch_size=2, progress=False)
    for kind in SPECS:
        for metric in ("kl", "perplexity", "agreement"):
            a, b = torch.tensor(fast.column(kind, metric)), torch.tensor(slow.column(kind, metric))
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-7), (kind, metric)
    assert all(v > 0 for v in fast.column("none"))
    assert fast.base.kl < 1e-6


def test_table_outputs(tmp_path):
    model = tiny_model("llama", layers=3)
    x = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(7))
    table = sensitivity(model, x, teacher_logits(model, x), SPECS, progress=False)
    paths = table.save(tmp_path)
    assert SensitivityTable.load(paths["json"]).to_dict() == table.to_dict()
    csv_lines = paths["csv"].read_text().strip().splitlines()
    assert csv_lines[0].startswith("layer,lswa_kl") and len(csv_lines) == 4
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = table.render()
    assert "none KL" in text and len(text.splitlines()) == 2 + 3


def test_threshold_plan_follows_the_table():
    from lbsearch.evaluate import Quality
    from lbsearch.sensitivity import threshold_plan

    def q(kl):
        return Quality(kl=kl, perplexity=1.0, agreement=1.0, tokens=1)

    table = SensitivityTable(model="m", tokens=1, base=q(0), specs=SPECS, rows={
        "lswa": [q(x) for x in (0.9, 0.1, 0.5, 0.2, 0.3, 0.05)],
        "none": [q(x) for x in (0.01, 2.0, 0.3, 0.02, 1.0, 0.9)],
    })
    plan = threshold_plan(table, n_none=2, n_lswa=2, pinned=(0,))
    # layer 0 pinned; removal least harmful: 3 (0.02), 2 (0.3); then lswa least harmful of 1, 4, 5: 5, 1
    assert [s.kind for s in plan.layers] == ["softmax", "lswa", "none", "none", "softmax", "lswa"]
    assert plan[1] == SPECS["lswa"]
