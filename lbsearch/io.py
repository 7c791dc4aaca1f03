"""Atomic file writes and the cache folder: nothing half-written survives a crash."""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path


def cache_dir(*parts: str) -> Path:
    """``$LBSEARCH_CACHE`` (default ``~/.cache/lbsearch``) joined with ``parts``, created."""
    root = Path(os.environ.get("LBSEARCH_CACHE", Path.home() / ".cache" / "lbsearch"))
    path = root.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _umask() -> int:
    """The process umask, read without changing it where Linux allows (os.umask is a global swap)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to a temporary file beside ``path`` and rename it into place, so readers
    see the old file or the new one, never half of one. The file gets the user's umask (0644
    for the usual 022), like a plain ``open(path, "w")``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
            os.fchmod(fh.fileno(), 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | Path, obj) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=1, sort_keys=False) + "\n")


def writable_dir(path: str | Path, flag: str = "--out") -> Path:
    """``path`` as a folder this process can write in (created); otherwise one-line LBSearchError."""
    from .errors import LBSearchError

    path = Path(path)
    if path.exists() and not path.is_dir():
        raise LBSearchError(f"{flag} {path}: exists and is not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".lbsearch-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise LBSearchError(f"{flag} {path}: cannot write there ({exc.strerror})") from None
    return path


def read_json(path: str | Path):
    """A JSON file lbsearch wrote (atomic writes: complete or absent)."""
    return json.loads(Path(path).read_text())


def save_tensors(path: str | Path, tensors: dict, metadata: dict | None = None) -> Path:
    """safetensors file, written atomically."""
    from safetensors.torch import save

    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    return atomic_write_bytes(path, save(tensors, metadata=metadata))


def stable_hash(*parts) -> str:
    """12 hex digits of sha256 over the JSON of ``parts``."""
    text = json.dumps(parts, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


MAX_YAML_BYTES = 1 << 20
MAX_YAML_NODES = 100_000


def load_yaml(path: str | Path, what: str):
    """A small YAML/JSON file as Python data, or one LBSearchError line: missing, a folder,
    unreadable, too large, not text, not YAML, empty, or an alias bomb (node count capped)."""
    import yaml

    from .errors import LBSearchError

    path = Path(path)
    if path.is_dir():
        raise LBSearchError(f"{path}: is a folder, expected a {what} file")
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise LBSearchError(f"{path}: {what} file not found") from None
    except OSError as exc:
        raise LBSearchError(f"{path}: cannot read the {what} file ({exc.strerror})") from None
    if len(raw) > MAX_YAML_BYTES:
        raise LBSearchError(f"{path}: {len(raw):,} bytes is too large for a {what} file (at most {MAX_YAML_BYTES:,})")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise LBSearchError(f"{path}: not a text file (a {what} is YAML or JSON)") from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        raise LBSearchError(f"{path}: not valid YAML ({str(exc).splitlines()[0][:160]})") from None
    if node is None:
        raise LBSearchError(f"{path}: empty; expected a {what} (a mapping)")
    if _expanded_nodes(node) > MAX_YAML_NODES:
        raise LBSearchError(f"{path}: more than {MAX_YAML_NODES:,} values once aliases are expanded (an alias bomb?)")
    return yaml.safe_load(text)


def _expanded_nodes(node, limit: int = MAX_YAML_NODES) -> int:
    """Nodes of a composed YAML graph counted with aliases expanded, stopping past ``limit``."""
    count, stack = 0, [node]
    while stack and count <= limit:
        n = stack.pop()
        count += 1
        if isinstance(n.value, list):
            for item in n.value:
                stack.extend(item if isinstance(item, tuple) else (item,))
    return count
