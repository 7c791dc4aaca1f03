"""Per-layer attention transfer: train one layer's new attention parameters (LSWA's feature map
and gate) so that its output matches the layer's softmax attention on the teacher's own inputs to
that layer (relative MSE)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..attention import KINDS
from ..layers import hidden_states
from ..models import decoder_layers
from ..plan import LayerSpec
from ..recipe import TransferConfig


@dataclass(frozen=True)
class LayerData:
    """Attention inputs (after the layer's input norm) and softmax outputs for one layer."""

    x: torch.Tensor  # [N, T, hidden]
    y: torch.Tensor  # [N, T, hidden]
    cos_sin: tuple  # each [1, T, head_dim]


@torch.no_grad()
def collect_layer_data(model, blocks: torch.Tensor, layers: list[int], batch_size: int = 8) -> dict[int, LayerData]:
    """Teacher inputs and outputs of the attention of each requested layer (one teacher pass per batch)."""
    device = next(model.parameters()).device
    xs = {i: [] for i in layers}
    ys = {i: [] for i in layers}
    cos_sin = None
    for start in range(0, len(blocks), batch_size):
        states, (_, pe, _) = hidden_states(model, blocks[start:start + batch_size].to(device))
        cos_sin = tuple(t[:1] for t in pe)
        for i in layers:
            layer = decoder_layers(model)[i]
            x = layer.input_layernorm(states[i])
            xs[i].append(x)
            ys[i].append(layer.self_attn(x, position_embeddings=pe)[0])
    return {i: LayerData(torch.cat(xs[i]), torch.cat(ys[i]), cos_sin) for i in layers}


def relative_error(module, data: LayerData, idx: torch.Tensor) -> float:
    with torch.no_grad():
        pe = tuple(t.expand(len(idx), -1, -1) for t in data.cos_sin)
        out = module(data.x[idx], position_embeddings=pe)[0].float()
        ref = data.y[idx].float()
        return ((out - ref).pow(2).sum() / ref.pow(2).sum()).item()


def transfer_layer(original_attn, spec: LayerSpec, data: LayerData, cfg: TransferConfig) -> tuple[dict, dict]:
    """Train an LSWA block for one layer; returns its new parameters and before/after held-out errors."""
    torch.manual_seed(cfg.seed)
    module = KINDS[spec.kind].build(original_attn, spec)
    params = list(module.new_parameters().values())
    for p in params:
        p.requires_grad_(True)
    n = len(data.x)
    n_val = max(1, int(n * cfg.val_fraction)) if n > 1 else 0
    val, train = torch.arange(n - n_val, n), torch.arange(0, max(n - n_val, 1))
    val = val if n_val else train
    before = relative_error(module, data, val)
    opt = torch.optim.Adam(params, lr=cfg.lr)
    gen = torch.Generator().manual_seed(cfg.seed)
    use_bf16 = data.x.is_cuda
    for step in range(cfg.steps):
        idx = train[torch.randint(len(train), (min(cfg.batch_size, len(train)),), generator=gen)]
        pe = tuple(t.expand(len(idx), -1, -1) for t in data.cos_sin)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_bf16):
            out = module(data.x[idx], position_embeddings=pe)[0].float()
        ref = data.y[idx].float()
        loss = (out - ref).pow(2).mean() / ref.pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        for group in opt.param_groups:  # cosine decay to 10%
            group["lr"] = cfg.lr * (0.1 + 0.45 * (1 + torch.cos(torch.tensor(torch.pi * step / cfg.steps)).item()))
        opt.step()
    after = relative_error(module, data, val)
    tensors = {k: v.detach().cpu().clone() for k, v in module.new_parameters().items()}
    return tensors, {"rel_error_before": before, "rel_error_after": after, "steps": cfg.steps,
                     "tokens": cfg.steps * cfg.batch_size * data.x.shape[1]}
