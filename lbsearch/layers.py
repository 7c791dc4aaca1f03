"""Run a decoder-only model layer by layer, so work before a changed layer can be reused."""
from __future__ import annotations

import torch

from .models import decoder_layers


def position_inputs(model, input_ids: torch.Tensor):
    """(position_ids, (cos, sin), causal mask or None) for full blocks starting at position 0."""
    b, t = input_ids.shape
    pos = torch.arange(t, device=input_ids.device).expand(b, t)
    dummy = torch.empty(b, t, 1, dtype=next(model.parameters()).dtype, device=input_ids.device)
    cos_sin = model.model.rotary_emb(dummy, pos)
    mask = None  # sdpa: causal from is_causal
    if model.config._attn_implementation != "sdpa":
        mask = torch.full((t, t), float("-inf"), device=input_ids.device).triu(1)[None, None].to(dummy.dtype)
    return pos, cos_sin, mask


def run_layer(layer, hidden: torch.Tensor, pos, cos_sin, mask) -> torch.Tensor:
    out = layer(hidden, attention_mask=mask, position_ids=pos, position_embeddings=cos_sin)
    return out[0] if isinstance(out, tuple) else out


def run_layers(model, hidden: torch.Tensor, start: int, pos, cos_sin, mask, stop: int | None = None) -> torch.Tensor:
    for layer in decoder_layers(model)[start:stop]:
        hidden = run_layer(layer, hidden, pos, cos_sin, mask)
    return hidden


def head(model, hidden: torch.Tensor) -> torch.Tensor:
    return model.lm_head(model.model.norm(hidden))


@torch.no_grad()
def hidden_states(model, input_ids: torch.Tensor) -> tuple[list[torch.Tensor], tuple]:
    """Inputs of every decoder layer plus the last layer's output (L + 1 tensors), and position inputs."""
    pos_inputs = position_inputs(model, input_ids)
    states = [model.model.embed_tokens(input_ids)]
    for layer in decoder_layers(model):
        states.append(run_layer(layer, states[-1], *pos_inputs))
    return states, pos_inputs
