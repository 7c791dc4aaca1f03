"""Hostile and malformed input, table-driven: each case is one clear line on stderr (file or flag,
key, what is allowed), exit code 2, no traceback, and it comes before any heavy work."""
import json
import shutil

import pytest
import torch
from conftest import tiny_model, write_tiny_space

from lbsearch.cli import main

BOMB = ("a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
        "c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]\nd: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]\n"
        "e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]\nf: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e]\nmodel: *f\n")


@pytest.fixture(scope="module")
def files(tmp_path_factory, tokenizer):
    """Every kind of broken file the cases below point at, made once."""
    from lbsearch.models import REGISTRY

    root = tmp_path_factory.mktemp("bad")
    good = write_tiny_space(root / "good", tokenizer)
    spaces = {
        "unknown_top": "model: smollm2-135m\nobjectivs: [kl]\n",
        "unknown_nested": "lswa: {windws: [64]}\n",
        "wrong_type": "constraints: {min_softmax_layers: many}\n",
        "huge": "budgets: {healing_tokens: 1e30}\n",
        "negative_budget": "budgets: {eval_tokens: -4096}\n",
        "negative_memory": "constraints: {kv_memory_budget_mb: -1}\n",
        "bomb": BOMB,
        "empty": "",
        "list": "- model\n- kinds\n",
        "bad_kind": "kinds: {default: [softmax, linear]}\n",
        "layer_range": "kinds: {layers: {40: [softmax]}}\n",
        "lora_negative": "heal: {lora_rank: -1}\n",
        "heal_unknown": "heal: {lora_rnk: 8}\n",
        "batch_zero": "heal: {batch_size: 0}\n",
        "transfer_type": "transfer: {steps: lots}\n",
        "target_device": "target: {device: tpu-v9}\n",
        "cpu_section": "cpu: {budgets: {eval_tokens: 0}}\n",
        "odd_features": "lswa: {feature_dims: [33]}\n",
        "zero_window": "lswa: {windows: [0]}\n",
        "unclosed": "model: [unclosed\n",
        "tab_garbage": "model:\t\t- : : :\n",
    }
    for name, text in spaces.items():
        (root / f"{name}.yaml").write_text(text)
    (root / "binary.yaml").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe" * 20)
    (root / "folder.yaml").mkdir()
    (root / "bad_plan.json").write_text('{"layers": [{"kind": "softmax", "colour": "red"}]}')
    (root / "garbage_plan.yaml").write_bytes(b"\x00\x01\x02garbage")
    gguf = REGISTRY["smollm2-135m"].locate()
    (root / "truncated.gguf").write_bytes(gguf.read_bytes()[: 1 << 20])
    (root / "garbage.gguf").write_bytes(b"GGUF" + bytes(range(256)) * 100)
    (root / "noconfig").mkdir()
    pickled = root / "pickled"
    tiny_model("llama").save_pretrained(pickled)
    for f in pickled.glob("*.safetensors"):
        f.rename(f.with_suffix(".bin"))
    broken_config = root / "broken_config"
    shutil.copytree(good.parent / "tiny", broken_config)
    (broken_config / "config.json").write_text("{not json")
    torn = root / "torn_weights"
    shutil.copytree(good.parent / "tiny", torn)
    weights = next(torn.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:5000])
    (root / "a_file").write_text("x")
    return root, good


def case(*argv, expect):
    return pytest.param(list(argv), expect, id=" ".join(argv)[:60])


SPACE_CASES = [
    case("plan", "SSN", "--space", "{root}/unknown_top.yaml", expect="objectivs: unknown key; allowed: model"),
    case("plan", "SSN", "--space", "{root}/unknown_nested.yaml", expect="lswa.windws: unknown key; allowed: windows"),
    case("plan", "SSN", "--space", "{root}/wrong_type.yaml", expect="constraints.min_softmax_layers"),
    case("plan", "SSN", "--space", "{root}/huge.yaml", expect="budgets.healing_tokens"),
    case("plan", "SSN", "--space", "{root}/negative_budget.yaml", expect="budgets.eval_tokens"),
    case("plan", "SSN", "--space", "{root}/negative_memory.yaml", expect="constraints.kv_memory_budget_mb"),
    case("plan", "SSN", "--space", "{root}/bomb.yaml", expect="alias bomb"),
    case("plan", "SSN", "--space", "{root}/empty.yaml", expect="empty; expected a search space"),
    case("plan", "SSN", "--space", "{root}/list.yaml", expect="expected a mapping at the top level"),
    case("plan", "SSN", "--space", "{root}/bad_kind.yaml", expect="unknown kind 'linear'; allowed: softmax, lswa, none"),
    case("plan", "SSN", "--space", "{root}/layer_range.yaml", expect="kinds.layers.40: layer index out of range"),
    case("plan", "SSN", "--space", "{root}/lora_negative.yaml", expect="lora_rank must be a number in [0, 65536]"),
    case("plan", "SSN", "--space", "{root}/heal_unknown.yaml", expect="unknown key 'lora_rnk'"),
    case("plan", "SSN", "--space", "{root}/batch_zero.yaml", expect="batch_size must be a number in [1,"),
    case("plan", "SSN", "--space", "{root}/transfer_type.yaml", expect="transfer: steps"),
    case("plan", "SSN", "--space", "{root}/target_device.yaml", expect="unknown device 'tpu-v9'"),
    case("plan", "SSN", "--space", "{root}/cpu_section.yaml", expect="cpu: budgets.eval_tokens"),
    case("plan", "SSN", "--space", "{root}/odd_features.yaml", expect="feature dims must be even"),
    case("plan", "SSN", "--space", "{root}/zero_window.yaml", expect="lswa.windows.0"),
    case("plan", "SSN", "--space", "{root}/unclosed.yaml", expect="not valid YAML"),
    case("plan", "SSN", "--space", "{root}/tab_garbage.yaml", expect="not valid YAML"),
    case("plan", "SSN", "--space", "{root}/binary.yaml", expect="not a text file"),
    case("plan", "SSN", "--space", "{root}/folder.yaml", expect="is a folder, expected a search space file"),
    case("plan", "SSN", "--space", "{root}/missing.yaml", expect="search space file not found"),
]
PLAN_CASES = [
    case("plan", "SSN", expect="3 layers in plan 'SSN', the model has 30"),
    case("plan", "SSX" + "S" * 27, expect="cannot read 'XSSSSSSSSSSS...' at layer 2"),
    case("plan", "S4" + "S" * 29, expect="S takes no (number)"),
    case("plan", "L0" + "S" * 29, expect="window must be an integer >= 1"),
    case("plan", "L64f33" + "S" * 29, expect="feature_dim must be even"),
    case("plan", "S" * 100000, expect="100000 layers in plan"),
    case("plan", "{root}/bad_plan.json", expect="colour"),
    case("plan", "{root}/garbage_plan.yaml", expect="not valid YAML"),
    case("plan", "{root}/missing_plan.yaml", expect="plan file not found"),
    case("plan", expect="give a PLAN to describe, or --threshold"),
    case("plan", "--threshold", "40", "10", expect="--threshold 40 10: need 0 <= N_NONE + N_LSWA <= 30"),
    case("plan", "--threshold", "5", "5", "--table", "{root}/a_file", expect="not a sensitivity table"),
    case("heal", "--plan", "SSN", "--out", "{root}/heal_out", expect="3 layers in plan 'SSN', the model has 30"),
    case("heal", "--plan", "S" * 30, "--lora-rank", "-1", expect="lora_rank must be a number"),
    case("heal", "--plan", "S" * 30, "--lora-alpha", "-4", expect="lora_alpha must be a number"),
    case("heal", "--plan", "S" * 30, "--long-context", "512", "0", expect="--long-context 512 0: lengths must be positive"),
    case("heal", "--plan", "S" * 30, "--long-context", "512", "--long-tokens", "0", expect="--long-tokens must be positive"),
    case("heal", "--plan", "S" * 30, "--tokens", "-5", expect="--tokens must be positive"),
    case("heal", "--plan", "S" * 30, "--batch-size", "0", expect="--batch-size must be positive"),
    case("heal", "--plan", "S" * 30, "--temperature", "0", expect="temperature must be a number"),
]
MODEL_CASES = [
    case("plan", "SSN", "--model", "no-such-model", expect="not a registry alias"),
    case("plan", "SSN", "--model", "{root}/noconfig", expect="not a model directory (no config.json)"),
    case("plan", "SSN", "--model", "{root}/truncated.gguf", expect="cannot read this GGUF model"),
    case("plan", "SSN", "--model", "{root}/garbage.gguf", expect="cannot read this GGUF model"),
    case("plan", "SSN", "--model", "{root}/missing.gguf", expect="GGUF file not found"),
    case("plan", "SSN", "--model", "{root}/pickled", expect="no *.safetensors weights"),
    case("plan", "SSN", "--model", "{root}/broken_config", expect="cannot read its config"),
    case("plan", "SSN", "--model", "{root}/a_file", expect="not a model"),
    case("sensitivity", "--model", "{root}/torn_weights", "--space", "{good}", "--out", "{root}/s_out",
         expect="cannot load its weights"),
]
OUTPUT_CASES = [
    case("sensitivity", "--out", "{root}/a_file", expect="--out {root}/a_file: exists and is not a folder"),
    case("sensitivity", "--out", "{root}/a_file/sub", expect="cannot write there"),
    case("plan", "S" * 30, "--out", "{root}/a_file", expect="exists and is not a folder"),
    case("bench", "--device", "cuda", "--out", "{root}/b", expect="no CUDA GPU is available"),
    case("bench", "--device", "tpu:0", "--out", "{root}/b", expect="not a torch device"),
    case("bench", "--concurrency", "0", "--device", "cpu", "--out", "{root}/b", expect="must be >= 1"),
    case("bench", "--shape", "gpt-7", "--device", "cpu", "--out", "{root}/b", expect="choose from"),
    case("sensitivity", "--tokens", "0", "--out", "{root}/s", expect="--tokens must be positive"),
]


@pytest.mark.parametrize("argv, expect", SPACE_CASES + PLAN_CASES + MODEL_CASES + OUTPUT_CASES)
def test_bad_input_is_one_line(argv, expect, files, capsys):
    if argv[:3] == ["bench", "--device", "cuda"] and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    root, good = files
    fill = {"root": str(root), "good": str(good)}
    code = main([a.format(**fill) for a in argv])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("lbsearch: error:")]
    assert code == 2, err[-500:]
    assert "Traceback" not in err
    assert len(errors) == 1 and len(errors[0]) <= 400, errors
    assert expect.format(**fill) in errors[0]


def test_case_count():
    assert len(SPACE_CASES + PLAN_CASES + MODEL_CASES + OUTPUT_CASES) >= 55


def test_full_disk_keeps_the_earlier_file(tmp_path, monkeypatch):
    """A write that fails half way (ENOSPC) leaves the previous version intact and says where."""
    import errno
    import os

    from lbsearch import io

    path = io.atomic_write_json(tmp_path / "r.json", {"v": 1})
    real_fsync = os.fsync

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError, match="No space left"):
        io.atomic_write_json(path, {"v": 2})
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert json.loads(path.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]  # no temporary file left behind


def test_full_disk_through_the_cli_is_one_line(tmp_path, monkeypatch, capsys):
    import errno

    from lbsearch import io

    def full(path, data):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(io, "atomic_write_bytes", full)
    monkeypatch.setattr("lbsearch.plan.Plan.save", lambda self, p: full(p, b""))
    code = main(["plan", "S" * 30, "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "No space left on device" in err and "Traceback" not in err
