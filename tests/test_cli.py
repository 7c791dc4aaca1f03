import json
import subprocess
import sys

import pytest
from conftest import tiny_model

from lbsearch.cli import COMMANDS, build_parser


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
