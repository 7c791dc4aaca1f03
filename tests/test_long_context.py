"""Perplexity by position span: the long-context check of healed plans."""
import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lbsearch.evaluate import perplexity_by_position


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return LlamaForCausalLM(cfg).eval()


def test_spans_match_a_direct_computation(tiny):
    blocks = torch.randint(0, 64, (3, 40))
    got = perplexity_by_position(tiny, blocks, (0, 8, 39), batch_size=2)
    logq = torch.log_softmax(tiny(blocks).logits[:, :-1].float(), -1)
    nll = -logq.gather(-1, blocks[:, 1:, None])[..., 0]
    assert got[0] == pytest.approx(math.exp(nll[:, :8].mean().item()), rel=1e-5)
    assert got[1] == pytest.approx(math.exp(nll[:, 8:39].mean().item()), rel=1e-5)


def test_spans_past_the_block_are_nan_and_bad_edges_refused(tiny):
    got = perplexity_by_position(tiny, torch.randint(0, 64, (1, 16)), (0, 8, 64, 128))
    assert not math.isnan(got[0]) and not math.isnan(got[1]) and math.isnan(got[2])
    with pytest.raises(ValueError):
        perplexity_by_position(tiny, torch.randint(0, 64, (1, 16)), (8, 4))
