import json

import pytest

from lbsearch import LBSearchError, LayerSpec, Plan
from lbsearch.plan import LSWADefaults, resolve_plan


def test_parse_and_str_round_trip():
    plan = Plan.parse("SSL128NL")
    assert [s.kind for s in plan.layers] == ["softmax", "softmax", "lswa", "none", "lswa"]
    assert plan[2].window == 128 and plan[4].window == 64 and plan[4].sinks == 4
    assert str(plan) == "SSL128NL64"
    assert Plan.parse(str(plan)) == plan


def test_sinks_and_feature_suffixes_round_trip():
    plan = Plan.parse("L32s0f32 N S")
    assert plan[0] == LayerSpec(kind="lswa", window=32, sinks=0, feature_dim=32)
    assert str(plan) == "L32s0f32NS"
    assert Plan.parse(str(plan)) == plan


def test_defaults_fill_bare_lswa():
    plan = Plan.parse("LL16", LSWADefaults(window=256, sinks=8, feature_dim=128))
    assert plan[0] == LayerSpec(kind="lswa", window=256, sinks=8, feature_dim=128)
    assert plan[1].window == 16 and plan[1].sinks == 8


def test_key_is_stable_and_distinguishes_specs():
    a, b = Plan.parse("SL64N"), Plan.parse("SL128N")
    assert a.key == Plan.parse("S L64 N").key
    assert a.key != b.key
    assert len(a.key) == 12
    # the key depends on the full specs, not on how the string was written
    assert Plan.parse("SLN").key == a.key


def test_json_and_yaml_round_trip(tmp_path):
    plan = Plan.parse("SSL128s2f32NN")
    for name in ("p.json", "p.yaml"):
        path = plan.save(tmp_path / name)
        assert Plan.load(path) == plan
        assert resolve_plan(str(path)) == plan
    data = json.loads((tmp_path / "p.json").read_text())
    assert data["plan"] == str(plan)
    assert Plan.from_dict({"plan": "SN"}) == Plan.parse("SN")


@pytest.mark.parametrize("text, words", [
    ("SXL", "cannot read"), ("S12", "S takes no"), ("", "empty"), ("L0", "window"),
    ("L64f33", "even"),
])
def test_bad_plan_strings(text, words):
    with pytest.raises(LBSearchError, match=words):
        Plan.parse(text)


def test_check_length_against_model():
    with pytest.raises(LBSearchError, match="3 layers in plan 'SSN', the model has 4"):
        Plan.parse("SSN").check(4)
    assert Plan.parse("SSNN").check(4)


def test_bad_plan_files(tmp_path):
    with pytest.raises(LBSearchError, match="not found"):
        Plan.load(tmp_path / "missing.json")
    bad = tmp_path / "bad.yaml"
    bad.write_text("layers: [{kind: softmax, color: red}]")
    with pytest.raises(LBSearchError, match="color"):
        Plan.load(bad)
    bad.write_text("layers: [{kind: lswa, window: 8, sinks: 1, feature_dim: 8}, {kind: tiny}]")
    with pytest.raises(LBSearchError, match="unknown attention kind 'tiny'"):
        Plan.load(bad)


def test_written_files_follow_the_umask(tmp_path):
    import os

    from lbsearch.io import atomic_write_text

    old = os.umask(0o027)
    try:
        path = atomic_write_text(tmp_path / "a.json", "{}")
        assert path.stat().st_mode & 0o777 == 0o640
        os.umask(0o022)
        assert atomic_write_text(tmp_path / "b.json", "{}").stat().st_mode & 0o777 == 0o644
    finally:
        os.umask(old)
