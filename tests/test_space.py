import subprocess
import sys

import pytest

from lbsearch import LBSearchError, Plan
from lbsearch.space import load_space

GOOD = """
model: smollm2-135m
kinds:
  default: [softmax, lswa, none]
  layers: {0: [softmax], 29: [softmax, lswa]}
lswa: {windows: [32, 64], sinks: [4], feature_dims: [64]}
constraints: {min_softmax_layers: 2, max_removed_layers: 3}
objectives: [kl, throughput, memory]
"""


def write(tmp_path, text):
    path = tmp_path / "space.yaml"
    path.write_text(text)
    return path


def test_packaged_default_space_loads():
    space = load_space()
    assert space.model == "smollm2-135m"
    assert space.allowed_kinds(0) == ["softmax"]
    assert space.default_lswa().window == space.lswa.windows[0]


def test_packaged_healing_recipe_is_valid_and_cpu_keeps_the_data_blocks():
    """The packaged recipe (long blocks, rank 64) builds a HealConfig on both devices; a CPU, whose corpus
    is a few 2,048-token blocks, heals on the data's own block length with the same adapters."""
    from lbsearch.distill import HealConfig

    gpu, cpu = load_space().on("cuda"), load_space().on("cpu")
    assert HealConfig(**gpu.heal).seq_len > gpu.data.seq_len
    assert HealConfig(**cpu.heal).seq_len == 0
    assert HealConfig(**cpu.heal).lora_rank == HealConfig(**gpu.heal).lora_rank > HealConfig().lora_rank


def test_good_space_and_constraints(tmp_path):
    space = load_space(write(tmp_path, GOOD))
    assert space.allowed_kinds(29) == ["softmax", "lswa"]
    assert space.lswa_defaults.window == 32
    ok = Plan.parse("S" * 2 + "L" * 25 + "NNS")
    assert space.violations(ok) == []
    bad = Plan.parse("N" + "N" * 4 + "L" * 24 + "N")
    problems = " | ".join(space.violations(bad))
    assert "layer 0: none not allowed" in problems
    assert "layer 29: none not allowed" in problems
    assert "softmax layers < min_softmax_layers 2" in problems
    assert "removed layers > max_removed_layers 3" in problems


@pytest.mark.parametrize("patch, message", [
    ("objectivs: [kl]", "objectivs: unknown key; allowed: model, kinds, lswa"),
    ("lswa: {windws: [64]}", "lswa.windws: unknown key; allowed: windows, sinks, feature_dims"),
    ("kinds: {layers: {40: [softmax]}}", "kinds.layers.40: layer index out of range; the model has 30 layers (0..29)"),
    ("kinds: {default: [softmax, linear]}", "kinds.default.1: unknown kind 'linear'; allowed: softmax, lswa, none"),
    ("lswa: {windows: [0]}", "lswa.windows.0: Input should be greater than 0"),
    ("lswa: {windows: [-64]}", "lswa.windows.0: Input should be greater than 0"),
    ("objectives: [speed]", "objectives.0: Input should be"),
    ("constraints: {min_softmax_layers: many}", "constraints.min_softmax_layers"),
])
def test_bad_spaces_give_one_line(tmp_path, patch, message):
    path = write(tmp_path, "model: smollm2-135m\n" + patch + "\n")
    with pytest.raises(LBSearchError) as err:
        load_space(path)
    text = str(err.value)
    assert text.startswith(str(path) + ": ")
    assert message in text
    assert "\n" not in text


def test_missing_and_unparsable_files(tmp_path):
    with pytest.raises(LBSearchError, match="search space file not found"):
        load_space(tmp_path / "nope.yaml")
    with pytest.raises(LBSearchError, match="not valid YAML"):
        load_space(write(tmp_path, "model: [unclosed"))


@pytest.mark.parametrize("content, words", [
    ("lswa: {windows: [0]}", "lswa.windows.0"),
    ("kinds: {layers: {99: [none]}}", "kinds.layers.99"),
    (None, "search space file not found"),
])
def test_cli_bad_input_exit_code_2_no_traceback(tmp_path, content, words):
    path = tmp_path / "s.yaml"
    if content is not None:
        path.write_text(content)
    proc = subprocess.run([sys.executable, "-m", "lbsearch.cli", "sensitivity", "--space", str(path)],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0] and str(path) in lines[0]


def test_cli_bad_model_dir_exit_code_2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "lbsearch.cli", "sensitivity", "--model", str(tmp_path)],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr


def test_cpu_section_merges_over_the_space(tmp_path):
    space = load_space(write(tmp_path, "model: smollm2-135m\nbudgets: {eval_tokens: 8192}\n"
                                      "cpu: {budgets: {eval_tokens: 1024}, lswa: {windows: [64]}}\n"))
    assert space.on("cuda").budgets.eval_tokens == 8192 and space.on("cuda").lswa.windows == [64]
    cpu = space.on("cpu")
    assert cpu.budgets.eval_tokens == 1024 and cpu.budgets.calibration_tokens == space.budgets.calibration_tokens
    default = load_space()
    assert default.on("cpu").budgets.eval_tokens < default.budgets.eval_tokens


@pytest.mark.parametrize("patch, message", [
    ("cpu: {budgets: {eval_tokens: -5}}", "cpu: budgets.eval_tokens"),
    ("cpu: {budgets: {eval_tokns: 5}}", "cpu: budgets.eval_tokns: unknown key"),
    ("heal: {lora_rank: -1}", "heal: healing: lora_rank must be a number in [0, 65536]"),
    ("heal: {lora_rnk: 8}", "heal: unknown key 'lora_rnk'; allowed: batch_size"),
    ("heal: {tokens: 8}", "unknown key 'tokens'"),
    ("heal: {teacher: disk}", "teacher='disk'; allowed: auto, cached, online"),
    ("heal: {tune: adapters}", "tune='adapters'; allowed: lora, full"),
    ("heal: {full_lr: 50}", "full_lr must be a number in [0, 10]"),
    ("transfer: {steps: many}", "transfer: steps: Input should be a valid integer"),
    ("budgets: {healing_tokens: 1e30}", "budgets.healing_tokens"),
    ("target: {device: tpu}", "target.device: unknown device 'tpu'; allowed: local, h200"),
    ("target: {batch: 0}", "target.batch"),
])
def test_bad_sections_give_one_line(tmp_path, patch, message):
    path = write(tmp_path, "model: smollm2-135m\n" + patch + "\n")
    with pytest.raises(LBSearchError) as err:
        load_space(path)
    assert message in str(err.value) and "\n" not in str(err.value)
