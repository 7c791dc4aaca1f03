import json
import subprocess
import sys

import pytest
from safetensors import safe_open
from conftest import tiny_model

from lbsearch.cli import build_parser
from lbsearch.commands import COMMANDS


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "lbsearch.cli", *args], capture_output=True, text=True, env=env)


def test_help_lists_commands_and_each_has_help():
    text = build_parser().format_help()
    for name in COMMANDS:
        assert name in text
        proc = run_cli(name, "--help")
        assert proc.returncode == 0 and "--out" in proc.stdout


@pytest.fixture()
def tiny_dir(tmp_path, tokenizer):
    model = tiny_model("llama", vocab=49152, layers=3)
    path = tmp_path / "tiny"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_sensitivity_command_end_to_end(tmp_path, tiny_dir, monkeypatch):
    space = tmp_path / "space.yaml"
    space.write_text(f"model: {tiny_dir}\ndata: {{corpus_tokens: 700, seq_len: 32}}\n"
                     "budgets: {sensitivity_tokens: 64}\nlswa: {windows: [8], feature_dims: [16]}\n")
    env = dict(__import__("os").environ, LBSEARCH_CACHE=str(tmp_path / "cache"))
    out = tmp_path / "out"
    proc = run_cli("sensitivity", "--space", str(space), "--out", str(out), env=env)
    assert proc.returncode == 0, proc.stderr
    assert "lswa KL" in proc.stdout and f"wrote png: {out}" in proc.stdout
    table = json.loads((out / "sensitivity.json").read_text())
    assert len(table["rows"]["none"]) == 3 and table["tokens"] == 64
    assert (out / "sensitivity.csv").is_file() and (out / "sensitivity.png").is_file()


def test_heal_command_end_to_end_and_resume(tmp_path, tiny_dir):
    space = tmp_path / "space.yaml"
    space.write_text(f"model: {tiny_dir}\ndata: {{corpus_tokens: 1500, seq_len: 32, eval_sources: [python-docs]}}\n"
                     "budgets: {eval_tokens: 64, calibration_tokens: 128, healing_tokens: 512}\n"
                     "lswa: {windows: [8], feature_dims: [16]}\n")
    env = dict(__import__("os").environ, LBSEARCH_CACHE=str(tmp_path / "cache"))
    out = tmp_path / "heal"
    args = ["heal", "--space", str(space), "--plan", "SL8N", "--out", str(out), "--library", str(tmp_path / "lib"),
            "--transfer-steps", "5", "--lora-rank", "2", "--lora-alpha", "6"]
    proc = run_cli(*args, "--long-context", "16", "48", env=env)
    assert proc.returncode == 0, proc.stderr
    assert "python-docs, perplexity by context span:" in proc.stdout
    assert "healed on 512 tokens" in proc.stdout and "after" in proc.stdout
    healed = json.loads((out / "healed" / "heal.json").read_text())
    report = healed["report"]
    assert (healed["config"]["lora_rank"], healed["config"]["lora_alpha"]) == (2, 6)
    long = healed["report"]["long_context"]
    assert list(long) == ["teacher", "after"] and all(list(v) == ["0-16", "16-48"] for v in long.values())
    assert all(ppl > 1 for v in long.values() for ppl in v.values())
    assert report["tokens"] == 512 and report["plan"] == "SL8f16N"
    # a tiny random teacher sits at KL ~3e-5: healing must not diverge (one step cannot always lower it)
    assert report["heldout"]["after"]["kl"] < 1.1 * report["heldout"]["before"]["kl"]
    assert len(list((tmp_path / "lib" / "blocks").glob("*.safetensors"))) == 1
    # a second run finds the finished checkpoint and the library block: no new training
    again = run_cli(*args, env=env)
    assert again.returncode == 0 and "layer transfer" not in again.stderr
    bad = run_cli("heal", "--space", str(space), "--plan", "SLNNN", "--out", str(out), env=env)
    assert bad.returncode == 2 and "the model has 3" in bad.stderr and "Traceback" not in bad.stderr
    # healing on its own teacher corpus (the GPU default), cached under the cache folder
    # and with the projections' weights fully tuned instead of adapters
    own = run_cli(*args[:5], "--out", str(tmp_path / "own"), *args[7:], "--corpus-tokens", "400", "--tune", "full",
                  "--full-lr", "1e-4", env=env)
    assert own.returncode == 0, own.stderr
    assert "healing corpus: 400 tokens from the data sources" in own.stdout
    config = json.loads((tmp_path / "own" / "healed" / "heal.json").read_text())["config"]
    assert config["tune"] == "full" and config["full_lr"] == 1e-4
    with safe_open(str(tmp_path / "own" / "healed" / "weights.safetensors"), "pt") as f:
        assert "model.layers.0.self_attn.q_proj.weight" in f.keys() and not any("lora_" in k for k in f.keys())
    assert len(list((tmp_path / "cache" / "corpora").iterdir())) == 2
