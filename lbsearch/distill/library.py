"""The block library: trained attention blocks on disk, so any plan can be assembled from them
without training.

One write-once safetensors file per block (``blocks/<key>.safetensors``), keyed by model, layer,
spec, calibration data and transfer config; its header metadata holds the entry (layer, spec,
transfer metrics) and a sha256 of the tensors. Writing is one atomic rename, so workers that share
a library never see half an entry, and there is no shared index to race on. A per-key file lock
makes a block that two workers need at once be trained by one of them; a file whose hash does
not match is reported, retrained and replaced, never used.
"""
from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load, save

from ..attention import KINDS
from ..errors import LBSearchError
from ..io import atomic_write_bytes, stable_hash
from ..plan import LayerSpec, Plan
from ..recipe import TransferConfig
from .transfer import collect_layer_data, transfer_layer


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _header(data: bytes) -> dict:
    (size,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + size])


class BlockLibrary:
    def __init__(self, root: str | Path, model_key: str, data_key: str, config: TransferConfig = TransferConfig()):
        self.root = Path(root)
        self.model_key, self.data_key, self.config = model_key, data_key, config
        try:
            (self.root / "blocks").mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise LBSearchError(f"{self.root}: cannot create the block library ({exc.strerror})") from None

    def key(self, layer: int, spec: LayerSpec) -> str:
        return stable_hash(self.model_key, self.data_key, layer, spec.to_dict(), asdict(self.config))

    def path(self, layer: int, spec: LayerSpec) -> Path:
        return self.root / "blocks" / f"{self.key(layer, spec)}.safetensors"

    def _read(self, path: Path) -> tuple[dict, dict] | None:
        """(entry, tensors) of a block file, or None when it is absent, unreadable or corrupt."""
        try:
            data = path.read_bytes()
            entry = json.loads(_header(data)["__metadata__"]["entry"])
            tensors = load(data)
        except FileNotFoundError:
            return None
        except Exception:  # noqa: BLE001 - truncated, garbage or foreign files are all "not a valid block"
            return None
        return (entry, tensors) if _digest(tensors) == entry.get("sha256") else None

    def get(self, layer: int, spec: LayerSpec) -> dict | None:
        """The block's tensors, or None when absent or corrupt."""
        found = self._read(self.path(layer, spec))
        return None if found is None else found[1]

    def put(self, layer: int, spec: LayerSpec, tensors: dict, metrics: dict) -> Path:
        tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
        entry = {"layer": layer, "spec": spec.to_dict(), "model": self.model_key, "data": self.data_key,
                 "config": asdict(self.config), "sha256": _digest(tensors), "metrics": metrics}
        return atomic_write_bytes(self.path(layer, spec), save(tensors, metadata={"entry": json.dumps(entry)}))

    def index(self) -> dict[str, dict]:
        """Every valid entry in the library, by key."""
        out = {}
        for path in sorted((self.root / "blocks").glob("*.safetensors")):
            found = self._read(path)
            if found is not None:
                out[path.stem] = found[0]
        return out

    def metrics(self, layer: int, spec: LayerSpec) -> dict | None:
        found = self._read(self.path(layer, spec))
        return None if found is None else found[0]["metrics"]

    def load_into(self, module, layer: int, spec: LayerSpec) -> None:
        """Copy a trained block into an installed attention module (called by ``apply_plan``)."""
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
        """Train every (layer, spec) block that is absent or corrupt; returns the new entries' metrics.

        Safe with several processes on one library: each block is trained under its own lock and
        re-checked once the lock is held, so a block another worker just wrote is not trained again.
        """
        from filelock import FileLock
        from tqdm.auto import tqdm

        from ..models import decoder_layers

        todo = self.missing(pairs)
        if not todo:
            return []
        data = collect_layer_data(model, blocks, sorted({i for i, _ in todo}))
        out = []
        for layer, spec in tqdm(todo, desc="layer transfer", unit="block", disable=not progress):
            with FileLock(str(self.path(layer, spec)) + ".lock"):
                if self.get(layer, spec) is not None:
                    continue
                original = decoder_layers(model)[layer].self_attn
                tensors, metrics = transfer_layer(original, spec, data[layer], self.config)
                self.put(layer, spec, tensors, metrics)
            out.append({"layer": layer, "spec": spec.token(), **metrics})
        return out


def trainable_pairs(plan: Plan) -> list[tuple[int, LayerSpec]]:
    """(layer, spec) of every layer whose kind has parameters the library trains."""
    return [(i, s) for i, s in enumerate(plan.layers) if KINDS[s.kind].trainable]
