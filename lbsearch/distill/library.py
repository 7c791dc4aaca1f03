"""The block library: trained LSWA blocks on disk (safetensors + a JSON index), so any plan can
be assembled from them without training. Entries are keyed by model, layer, spec, data and
transfer budget; a file whose hash does not match its index entry is retrained, never used."""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path

from safetensors.torch import load

from ..errors import LBSearchError
from ..io import atomic_write_bytes, atomic_write_json, stable_hash
from ..plan import LayerSpec, Plan
from .transfer import TransferConfig, collect_layer_data, transfer_layer


class BlockLibrary:
    def __init__(self, root: str | Path, model_key: str, data_key: str, config: TransferConfig = TransferConfig()):
        self.root = Path(root)
        self.model_key, self.data_key, self.config = model_key, data_key, config
        (self.root / "blocks").mkdir(parents=True, exist_ok=True)

    @property
    def index_path(self) -> Path:
        return self.root / "index.json"

    def index(self) -> dict:
        return json.loads(self.index_path.read_text()) if self.index_path.is_file() else {}

    def key(self, layer: int, spec: LayerSpec) -> str:
        return stable_hash(self.model_key, self.data_key, layer, spec.to_dict(), asdict(self.config))

    def get(self, layer: int, spec: LayerSpec) -> dict | None:
        """The block's tensors, or None when absent or corrupt."""
        key = self.key(layer, spec)
        entry = self.index().get(key)
        path = self.root / "blocks" / f"{key}.safetensors"
        if entry is None or not path.is_file():
            return None
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() != entry["sha256"]:
            return None
        return load(data)

    def put(self, layer: int, spec: LayerSpec, tensors: dict, metrics: dict) -> None:
        from safetensors.torch import save

        key = self.key(layer, spec)
        data = save({k: v.contiguous() for k, v in tensors.items()}, metadata={"key": key})
        atomic_write_bytes(self.root / "blocks" / f"{key}.safetensors", data)
        index = self.index()
        index[key] = {"layer": layer, "spec": spec.to_dict(), "model": self.model_key, "data": self.data_key,
                      "config": asdict(self.config), "sha256": hashlib.sha256(data).hexdigest(), "metrics": metrics}
        atomic_write_json(self.index_path, index)

    def metrics(self, layer: int, spec: LayerSpec) -> dict | None:
        entry = self.index().get(self.key(layer, spec))
        return None if entry is None else entry["metrics"]

    def load_into(self, module, layer: int, spec: LayerSpec) -> None:
        """Copy a trained block into an LSWA module (called by ``apply_plan``)."""
        tensors = self.get(layer, spec)
        if tensors is None:
            raise LBSearchError(f"block library {self.root}: no valid block for layer {layer} {spec.token()}; "
                                "train it first (lbsearch heal or sensitivity --library trains missing blocks)")
        params = module.new_parameters()
        for name, value in tensors.items():
            params[name].data.copy_(value.to(params[name].device, params[name].dtype))

    def missing(self, pairs: list[tuple[int, LayerSpec]]) -> list[tuple[int, LayerSpec]]:
        return [(i, s) for i, s in pairs if self.get(i, s) is None]

    def ensure(self, model, pairs: list[tuple[int, LayerSpec]], blocks, progress: bool = True) -> list[dict]:
        """Train every (layer, spec) block that is absent or corrupt; returns the new entries' metrics."""
        from tqdm.auto import tqdm

        todo = self.missing(pairs)
        if not todo:
            return []
        from ..models import decoder_layers

        data = collect_layer_data(model, blocks, sorted({i for i, _ in todo}))
        out = []
        for layer, spec in tqdm(todo, desc="layer transfer", unit="block", disable=not progress):
            tensors, metrics = transfer_layer(decoder_layers(model)[layer].self_attn, spec, data[layer], self.config)
            self.put(layer, spec, tensors, metrics)
            out.append({"layer": layer, "spec": spec.token(), **metrics})
        return out


def lswa_pairs(plan: Plan) -> list[tuple[int, LayerSpec]]:
    return [(i, s) for i, s in enumerate(plan.layers) if s.kind == "lswa"]
