"""Shared fixtures: tiny random models of every supported family, and the real default teacher."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import torch

# Tests never touch the user's ~/.cache/lbsearch: they share one cache under the temp folder
# (the default teacher is converted and its corpus sampled once per machine, not once per test).
os.environ["LBSEARCH_CACHE"] = os.environ.get("LBSEARCH_TEST_CACHE") or os.path.join(tempfile.gettempdir(),
                                                                                      "lbsearch-test-cache")

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")


def tiny_config(family: str = "llama", *, layers: int = 4, vocab: int = 96, tie: bool = False, head_dim: int = 16):
    from transformers import AutoConfig

    return AutoConfig.for_model(
        family, vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, head_dim=head_dim, max_position_embeddings=512,
        tie_word_embeddings=tie, rope_theta=10000.0, attn_implementation="sdpa")


def tiny_model(family: str = "llama", seed: int = 0, **kwargs):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **kwargs), dtype=torch.float32)
    model.eval().requires_grad_(False)
    return model


@pytest.fixture(scope="session")
def smollm():
    """The real SmolLM2-135M teacher and tokenizer (first load converts the GGUF and caches it)."""
    from lbsearch import load_teacher, load_tokenizer

    return load_teacher("smollm2-135m"), load_tokenizer("smollm2-135m")


@pytest.fixture(scope="session")
def tokenizer():
    """The default teacher's tokenizer (vocab 49152); tiny models paired with it use that vocab."""
    from lbsearch import load_tokenizer

    return load_tokenizer("smollm2-135m")


@pytest.fixture()
def cache_home(tmp_path, monkeypatch):
    """A private LBSEARCH_CACHE for tests that check what gets cached."""
    monkeypatch.setenv("LBSEARCH_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


WORDS = ("model layer attention window token cache memory search plan teacher student kernel budget "
         "throughput quality sink linear softmax heal block library trial front worker driver").split()


def write_tiny_space(root, tokenizer, *, layers: int = 4, extra: str = "", docs: int = 240) -> "Path":
    """A tiny random llama (vocab of the default tokenizer), a local text corpus and a space YAML
    using both; returns the YAML's path. Cheap enough for a Workspace per test."""
    import json
    import random
    from pathlib import Path

    root = Path(root)
    model = tiny_model("llama", vocab=49152, layers=layers)
    model.save_pretrained(root / "tiny")
    tokenizer.save_pretrained(root / "tiny")
    rng = random.Random(0)
    lines = [json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 60))) + "."})
             for _ in range(docs)]
    (root / "corpus.jsonl").write_text("\n".join(lines))
    space = root / "space.yaml"
    space.write_text(f"model: {root / 'tiny'}\n"
                     f"data: {{source: {root / 'corpus.jsonl'}, seq_len: 32}}\n"
                     "budgets: {eval_tokens: 128, calibration_tokens: 128, sensitivity_tokens: 64, "
                     "healing_tokens: 256, trial_healing_tokens: 128}\n"
                     "lswa: {windows: [8, 16], feature_dims: [16]}\n"
                     "transfer: {steps: 3}\n"
                     "heal: {lora_rank: 2}\n" + extra)
    return space
